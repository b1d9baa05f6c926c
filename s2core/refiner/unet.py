"""The refiners' dense 3D UNet: diffusers-style `UNet3DModel` without `conv_out` (SPARSE.md §8.1).

conv_in → down blocks (resnets, then a stride-2 conv) → mid block → up blocks on cat(h, skip) (resnets,
then a stride-2 transposed conv) → GroupNorm + SiLU. Both refiners run it on one cube at a time.

Letters: B batch, Cin / C0 input / first-level channels, P cube edge (divisible by 2^(levels-1)).
Attribute names are the checkpoint's (`down_blocks.0.resnets.1.norm1`, `downsamplers.0.conv`, ...).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .._kernels import conv3d as _conv
from .._kernels import group_norm as _gn

OFFICIAL_CHANNELS = (8, 32, 128, 512)
# A convolution whose input is larger than this runs on depth slabs (`conv3d_slabs`). On an H100, cuDNN's
# NCDHW convolution of the 40-channel 256³ concatenation (1.25 GiB) asked for another 1.50 GiB at once: the
# 1024 sign cube's peak (5.08 GiB in the chain) and, under a 5 GiB cap, an out-of-memory error. On slabs that
# convolution peaks at 0.88 GiB instead of 1.75 and a cube takes ~9% longer (bench/results/e2e.md).
SLAB_BYTES = 256 * 2**20
# Few-channel 'same' convolutions (the 256³ / 192³ level) on CUDA run as a Triton kernel (`conv3d_slabs`);
# False restores cuDNN for all of them.
USE_CONV_KERNEL = True
# True: on CUDA the UNet runs channels-last (NDHWC). cuDNN computes 3D convolutions in that layout and converts
# an NCDHW input and output around each call, a quarter of a cube's GPU time (bench/results/refiner_layout.md).
# The GroupNorm + SiLU and conv kernels, the depth slabs, the concatenations and the upsampler's writes all
# keep the layout; the weights stay as loaded (cuDNN reorders them per call: ~14 MB at the widest level). On
# the CPU the UNet always runs NCDHW. Off until timed on a GPU (no GPU was lent the session that wrote it):
# `bench/refiner_layout.py --ab` and `bench/e2e.py --channels-last on` measure it.
CHANNELS_LAST = False
_CL = torch.channels_last_3d
# the release's use_fp16 casts these to fp16; the GroupNorm parameters stay fp32, as in the original
FP16_LAYERS = (nn.Conv3d, nn.ConvTranspose3d, nn.Linear)


def _norm_silu(norm: nn.GroupNorm, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """silu(norm(x)): the norm in fp32 (fp64 for fp64 test models) cast back to x's dtype, as the original's
    fp32 norms do; inplace overwrites x. On CUDA in fp16 one Triton kernel (PyTorch's GroupNorm gives each of
    the 4 groups of a 256³ cube to a single thread block)."""
    return _gn.group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, out=x if inplace else None)


class ResnetBlock3D(nn.Module):
    """GN → SiLU → conv3 → GN → SiLU → conv3, plus a 1×1×1 shortcut when channels change."""

    def __init__(self, cin: int, cout: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """x: the input, or a one-element list through which the caller hands over its only reference (an up
        block's concatenation; the list is emptied). A handed-over input with a shortcut conv is overwritten by
        the first norm instead of copied, and freed once conv1 has read it: at 256³ its 40 fp16 channels are
        1.3 GB, which would otherwise stay alive beside conv2's output."""
        consume = isinstance(x, list)
        if consume:
            x = x.pop()
        skip = x if self.conv_shortcut is None else conv3d_slabs(self.conv_shortcut, x)
        h = _norm_silu(self.norm1, x, inplace=consume and self.conv_shortcut is not None)
        del x  # with a shortcut conv, h is now the input's last reference and conv1 below drops it
        h = conv3d_slabs(self.conv1, h)
        h = _norm_silu(self.norm2, h, inplace=True)
        h = conv3d_slabs(self.conv2, h)
        return skip + h if self.conv_shortcut is None else skip.add_(h)


class _Resample(nn.Module):
    """Holds `conv` so the key reads `downsamplers.0.conv` / `upsamplers.0.conv`."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DownBlock3D(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock3D(cin if i == 0 else cout, cout, groups) for i in range(layers))
        # kernel 2, stride 2, no padding: halves every edge exactly
        self.downsamplers = nn.ModuleList([_Resample(nn.Conv3d(cout, cout, 2, stride=2))]) if downsample else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x


class UpBlock3D(nn.Module):
    def __init__(self, cprev: int, cout: int, cskip_last: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        # resnet i sees cat(h, skip): h has cprev (first) or cout channels, the skip cout or, for the
        # last resnet, the next-shallower level's width
        self.resnets = nn.ModuleList(
            ResnetBlock3D((cprev if i == 0 else cout) + (cskip_last if i == layers - 1 else cout), cout, groups)
            for i in range(layers)
        )
        self.upsamplers = nn.ModuleList([_Resample(nn.ConvTranspose3d(cout, cout, 2, stride=2))]) if upsample else None

    # no forward: UNet3D runs the resnets in its own frame, so that no caller still holds a consumed input


class MidBlock3D(nn.Module):
    def __init__(self, channels: int, layers: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock3D(channels, channels, groups) for _ in range(1 + layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x


def unet_groups(c0: int) -> int:
    """GroupNorm groups of a refiner UNet whose first width is c0: 4 as released; one for UNets narrower
    than 4 channels (tiny-random's 2, whose pass-through weights need channels 0 and 1 in one group)."""
    return 4 if c0 >= 4 else 1


class UNet3D(nn.Module):
    """[B, Cin, P, P, P] → [B, C0, P, P, P] features (P divisible by 2^(levels-1)); no output conv."""

    def __init__(
        self, cin: int, channels: tuple[int, ...], layers_per_block: int, layers_mid_block: int, groups: int = 4
    ):
        super().__init__()
        n = len(channels)
        self.conv_in = nn.Conv3d(cin, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock3D(channels[max(i - 1, 0)], channels[i], layers_per_block, groups, downsample=i < n - 1)
            for i in range(n)
        )
        self.mid_block = MidBlock3D(channels[-1], layers_mid_block, groups)
        rev = channels[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock3D(
                rev[max(i - 1, 0)], rev[i], rev[min(i + 1, n - 1)], layers_per_block + 1, groups, upsample=i < n - 1
            )
            for i in range(n)
        )
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, Cin, P, P, P] → features [B, C0, P, P, P], channels-last on CUDA (see CHANNELS_LAST)."""
        if _runs_channels_last(x):
            x = x.contiguous(memory_format=_CL)
        x = conv3d_slabs(self.conv_in, x)
        skips = [x]  # consumed last-in-first-out, layers_per_block + 1 per up block
        for block in self.down_blocks:
            x = block(x, skips)
        x = self.mid_block(x)
        # the up path runs here rather than in UpBlock3D.forward: rebinding x in this one frame frees each
        # input (up to 32 channels at 256³) as soon as it is concatenated, and the concatenation itself is
        # normalised in place (at 256³ the two saved 1.3 GB each). An upsampler's output goes straight into
        # the next concatenation (`_upsample_cat`), so the full-size upsampled tensor never exists beside it.
        upsample = None
        for block in self.up_blocks:
            for resnet in block.resnets:
                if upsample is None:
                    held = [torch.cat([x, skips.pop()], dim=1)]
                else:
                    held = [_upsample_cat(upsample, x, skips.pop())]
                    upsample = None
                del x
                x = resnet(held)
            if block.upsamplers is not None:
                upsample = block.upsamplers[0].conv  # never the last block's (upsample=i < n - 1 above)
        return _norm_silu(self.conv_norm_out, x, inplace=True)


def _upsample_cat(conv: nn.ConvTranspose3d, x: torch.Tensor, skip: torch.Tensor, slabs: int = 8) -> torch.Tensor:
    """torch.cat([conv(x), skip], 1) for a kernel-2 stride-2 transposed conv, written into the concatenation
    a depth slab of x at a time. Each input voxel owns its own 2x2x2 output voxels, so slabs give the same
    values; what is held is the concatenation plus one slab instead of plus the whole upsampled tensor (1.1 GB
    fp16 at 256³ x 32 channels). On an H200 the cube's peak stayed where it was, at a convolution (with
    cuDNN's workspace), so this lowers the floor that a smaller workspace leaves, not today's peak."""
    b, _, d, h, w = x.shape
    cout = conv.out_channels
    out = torch.empty(
        b, cout + skip.shape[1], 2 * d, 2 * h, 2 * w, dtype=x.dtype, device=x.device, memory_format=_layout(x)
    )
    out[:, cout:] = skip
    del skip  # the caller popped it: only this frame held it
    step = -(-d // slabs)
    for d0 in range(0, d, step):
        out[:, :cout, 2 * d0 : 2 * (d0 + step)] = conv(x[:, :, d0 : d0 + step])
    return out


def _runs_channels_last(x: torch.Tensor) -> bool:
    return CHANNELS_LAST and x.is_cuda


def _layout(x: torch.Tensor) -> torch.memory_format:
    """x's layout, for a new tensor that continues it."""
    return _CL if _conv.is_channels_last(x) else torch.contiguous_format


def conv3d_slabs(conv: nn.Conv3d, x: torch.Tensor, max_bytes: int | None = None) -> torch.Tensor:
    """conv(x) for a stride-1 conv with 'same' padding (kernel 1 or 3).

    Few-channel convolutions on CUDA run as one Triton kernel (`kernels/conv3d.py`), which allocates nothing
    beyond its output. The rest run through the module on depth slabs of x of at most max_bytes each, so that
    what cuDNN allocates internally scales with a slab, not the cube. A slab's input carries the neighbouring
    depth rows the kernel reaches; the rows computed on that halo (against zero padding) are dropped. Inputs up
    to max_bytes (default SLAB_BYTES) run in one call."""
    if USE_CONV_KERNEL and _conv.suits(conv, x):
        return _conv.conv3d_same(x, conv.weight, conv.bias)
    d = x.shape[2]
    slabs = min(d, -(-x.numel() * x.element_size() // (max_bytes or SLAB_BYTES)))
    if slabs <= 1:
        return conv(x)
    halo = conv.padding[0]
    step = -(-d // slabs)
    out = None
    for d0 in range(0, d, step):
        d1 = min(d0 + step, d)
        lo = max(d0 - halo, 0)
        y = conv(x[:, :, lo : min(d1 + halo, d)])
        if out is None:
            out = torch.empty(*y.shape[:2], d, *y.shape[3:], dtype=y.dtype, device=y.device, memory_format=_layout(y))
        out[:, :, d0:d1] = y[:, :, d0 - lo : d0 - lo + d1 - d0]
        del y
    return out
