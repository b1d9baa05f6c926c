"""Interior-removal refiners: dense 3D UNets run over overlapping cubes (SPARSE.md §8).

Decoding a sparse SDF and filling the rest of the grid with +1 leaves a second, inner shell where the
negative band meets the fill (SPARSE.md §4.6). The refiners replace that fill with a proper
inside/outside field before marching cubes:

* `VoxelRefiner` (config key `refiner`, 512³): per cube, `tanh` of a UNet over the SDF and the
  decoder's 32-channel features, with three "adaptive" per-voxel 3×3×3 filters (§8.2). The 27 cube
  outputs are cross-faded along z, then y, then x into the refined field, meshed at 2 × mc_threshold.
* `VoxelRefinerSign` (config key `refiner_1024`): per cube of the 2×-downsampled SDF, a hard
  inside/outside sign; later cubes overwrite earlier ones. The 1024³ field is `|sdf| · sign` with the
  decoded values restored at the decoded voxels (§8.3), meshed at mc_threshold.

The original builds the whole grids densely (a 32-channel fp16 512³ feature grid, ~8.6 GB; fp16 1024³
grids; a 4 GiB fp32 grid for CPU marching cubes). Here `remove_interior_512` / `remove_interior_1024`
densify one cube at a time from the sparse voxels and never hold a whole 512³/1024³ tensor: the
512 path keeps one row of 9 cube outputs (the original keeps all 27) and streams x-slabs of the blended
field; the 1024 path keeps the sign bits of one row of cubes (1 bit per voxel, at most 8 MiB) and
streams the 1024 x-slabs those rows settle before computing the next row. From each slab only the
corners of marching-cubes cells whose corners straddle the level are kept (`RefinedField`), which is
all a marching cubes pass needs; `mesh_refined_field` meshes it with `mesh.marching_cubes`'s tables.
Cubes with no decoded voxel in them are computed once and reused: their inputs are bitwise equal, so
are their outputs.

Use: `field = remove_interior(model, sdf, feats, level, progress)` then
`[(vertices, faces), ...] = mesh_refined_field(field)` (one mesh per batch element, original frame).

Letters: B batch, P cube edge, S cube stride, O = P - S overlap, R grid edge (R = 2·S + P),
N decoded voxels, M kept voxels. Attribute names are the checkpoint's (`unet3d1`, `latent_mlp.net`,
`adaptive_conv1.0`), odd as some are.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._kernels import kernel_module
from .config import RefinerConfig
from .sparse.tensor import SparseTensor

log = logging.getLogger(__name__)
_gn = kernel_module("group_norm")

OFFICIAL_CHANNELS = (8, 32, 128, 512)


# ---------------------------------------------------------------------------------------------
# The UNet (diffusers-style UNet3DModel without conv_out, §8.1)

def _norm_silu(norm: nn.GroupNorm, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """silu(norm(x)): the norm in fp32 (fp64 for fp64 test models) cast back to x's dtype, as the original's
    fp32 norms do; inplace overwrites x. On CUDA in fp16 one Triton kernel (PyTorch's GroupNorm gives each of
    the 4 groups of a 256³ cube to a single thread block)."""
    return _gn.group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, out=x if inplace else None)


class ResnetBlock3D(nn.Module):
    """GN → SiLU → conv3 → GN → SiLU → conv3, plus a 1×1×1 shortcut when channels change.

    """

    def __init__(self, cin: int, cout: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, consume: bool = False) -> torch.Tensor:
        """consume: x is the caller's to discard (an up block's concatenation), so with a shortcut conv the
        first norm overwrites it instead of allocating a copy (40 channels at 256³: 1.3 GB in fp16)."""
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        h = _norm_silu(self.norm1, x, inplace=consume and self.conv_shortcut is not None)
        h = self.conv1(h)
        h = _norm_silu(self.norm2, h, inplace=True)
        h = self.conv2(h)
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
            for i in range(layers))
        self.upsamplers = (nn.ModuleList([_Resample(nn.ConvTranspose3d(cout, cout, 2, stride=2))])
                           if upsample else None)

    # no forward: UNet3D runs the resnets in its own frame, so that no caller still holds a consumed input


class MidBlock3D(nn.Module):
    def __init__(self, channels: int, layers: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock3D(channels, channels, groups) for _ in range(1 + layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x


class UNet3D(nn.Module):
    """[B, Cin, P, P, P] → [B, C0, P, P, P] features (P divisible by 2^(levels-1)); no output conv."""

    def __init__(self, cin: int, channels: tuple[int, ...], layers_per_block: int, layers_mid_block: int,
                 groups: int = 4):
        super().__init__()
        n = len(channels)
        self.conv_in = nn.Conv3d(cin, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock3D(channels[max(i - 1, 0)], channels[i], layers_per_block, groups, downsample=i < n - 1)
            for i in range(n))
        self.mid_block = MidBlock3D(channels[-1], layers_mid_block, groups)
        rev = channels[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock3D(rev[max(i - 1, 0)], rev[i], rev[min(i + 1, n - 1)], layers_per_block + 1, groups,
                      upsample=i < n - 1)
            for i in range(n))
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        skips = [x]  # consumed last-in-first-out, layers_per_block + 1 per up block
        for block in self.down_blocks:
            x = block(x, skips)
        x = self.mid_block(x)
        # the up path runs here rather than in UpBlock3D.forward: rebinding x in this one frame frees each
        # input (up to 32 channels at 256³) as soon as it is concatenated, and the concatenation itself is
        # normalised in place (at 256³ the two saved 1.3 GB each)
        for block in self.up_blocks:
            for resnet in block.resnets:
                x = torch.cat([x, skips.pop()], dim=1)
                x = resnet(x, consume=True)
            if block.upsamplers is not None:
                x = block.upsamplers[0](x)
        return _norm_silu(self.conv_norm_out, x, inplace=True)


# ---------------------------------------------------------------------------------------------
# 512 refiner pieces

class LatentMLP(nn.Module):
    """Per-voxel MLP on the decoder's features: 32 → 32 → 32 → 32 → 8 with ReLU (`latent_mlp.net.{0,2,4,6}`)."""

    def __init__(self, cin: int = 32, hidden: int = 32, cout: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _filter_head(cin: int) -> nn.Sequential:
    # predicts 27 per-voxel tap weights: conv3 → ReLU → conv3 (no bias)
    return nn.Sequential(nn.Conv3d(cin, cin, 3, padding=1), nn.ReLU(), nn.Conv3d(cin, 27, 3, padding=1, bias=False))


def adaptive_filter(x: torch.Tensor, head: nn.Module, source: torch.Tensor | None = None) -> torch.Tensor:
    """Apply 3 times a per-voxel 3×3×3 filter (shared over channels) predicted from `source` (default x).

    Weights are L1-normalised over the 27 taps. Tap t = 9a + 3b + c reads x at offset (a-1, b-1, c-1)
    with zero padding. Terms are added one tap at a time in tap order, in x's dtype, as the original
    does, so fp16 rounding matches.
    """
    w = F.normalize(head(x if source is None else source), p=1, dim=1)  # [B, 27, P, P, P]
    P0, P1, P2 = x.shape[-3:]
    for _ in range(3):
        xp = F.pad(x, (1, 1, 1, 1, 1, 1))
        out = torch.zeros_like(x)
        for t in range(27):
            a, b, c = t // 9, t // 3 % 3, t % 3
            out = out + xp[:, :, a:a + P0, b:b + P1, c:c + P2] * w[:, t:t + 1]
        x = out
    return x


def unet_groups(c0: int) -> int:
    """GroupNorm groups of a refiner UNet whose first width is c0: 4 as released; one for UNets narrower
    than 4 channels (tiny-random's 2, whose pass-through weights need channels 0 and 1 in one group)."""
    return 4 if c0 >= 4 else 1


def _half_convs(module: nn.Module) -> None:
    """The release's use_fp16: convs and linears in fp16, GroupNorm parameters stay fp32 (as the original)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d, nn.Linear)):
            m.half()


class VoxelRefiner(nn.Module):
    """`Voxel_RefinerXL` (512): one cube [B,1,P,P,P] SDF + [B,32,P,P,P] features → [B,1,P,P,P] field in (-1, 1)."""

    def __init__(self, cfg: RefinerConfig = RefinerConfig(), block_out_channels: tuple[int, ...] = OFFICIAL_CHANNELS):
        # block_out_channels is fixed in the released models; smaller values only for tests / tiny runs
        super().__init__()
        assert not cfg.sign, "use VoxelRefinerSign for the refiner_1024 config"
        self.cfg = cfg
        c0 = block_out_channels[0]
        self.unet3d1 = UNet3D(c0 + 8, block_out_channels, cfg.layers_per_block, cfg.layers_mid_block, unet_groups(c0))
        self.conv_in = nn.Conv3d(cfg.in_channels, c0, 3, padding=1)
        self.latent_mlp = LatentMLP(32, 32, 8)
        self.adaptive_conv1 = _filter_head(c0)
        self.adaptive_conv2 = _filter_head(c0)
        self.adaptive_conv3 = _filter_head(c0)
        self.mid_conv = nn.Conv3d(c0, c0, 3, padding=1)
        self.conv_out = nn.Conv3d(c0, cfg.out_channels, 3, padding=1)
        if cfg.use_fp16:
            _half_convs(self)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def refine_cube(self, sdf: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """sdf [B,1,P,P,P], latent = latent_mlp(features) [B,8,P,P,P] → tanh field [B,1,P,P,P]."""
        h = torch.cat([self.conv_in(sdf), latent], dim=1)  # [B, C0+8, P, P, P]
        u = self.unet3d1(h)                                  # [B, C0, P, P, P]
        u = adaptive_filter(u, self.adaptive_conv1)
        u = self.mid_conv(u)
        u = adaptive_filter(u, self.adaptive_conv2)
        o = self.conv_out(u)                                 # [B, 1, P, P, P]
        o = adaptive_filter(o, self.adaptive_conv3, source=u)
        return torch.tanh(o)

    def forward(self, sdf: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """The original's per-cube computation on dense inputs: sdf [B,1,P,P,P], feats [B,32,P,P,P]."""
        latent = self.latent_mlp(feats.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        return self.refine_cube(sdf, latent)


class VoxelRefinerSign(nn.Module):
    """`Voxel_RefinerXL_sign` (1024): one cube [B,1,P,P,P] of the downsampled SDF → sigmoid logits' sign."""

    def __init__(self, cfg: RefinerConfig = RefinerConfig(patch_size=256, sign=True),
                 block_out_channels: tuple[int, ...] = OFFICIAL_CHANNELS):
        super().__init__()
        assert cfg.sign, "use VoxelRefiner for the refiner (512) config"
        self.cfg = cfg
        c0 = block_out_channels[0]
        self.unet3d1 = UNet3D(c0, block_out_channels, cfg.layers_per_block, cfg.layers_mid_block, unet_groups(c0))
        self.conv_in = nn.Conv3d(cfg.in_channels, c0, 3, padding=1)
        self.conv_out = nn.Conv3d(c0, cfg.out_channels, 3, padding=1)
        if cfg.use_fp16:
            _half_convs(self)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def forward(self, sdf: torch.Tensor) -> torch.Tensor:
        """sdf [B,1,P,P,P] → ±1 in sdf's dtype: +1 where sigmoid(logit) >= 0.5, the comparison made on the
        sigmoid in that dtype (in fp16 a slightly negative logit still rounds to 0.5 and counts as +1)."""
        p = torch.sigmoid(self.conv_out(self.unet3d1(self.conv_in(sdf))))
        return torch.where(p >= 0.5, 1.0, -1.0).to(p.dtype)


def build_refiner(cfg: RefinerConfig, block_out_channels: tuple[int, ...] = OFFICIAL_CHANNELS) -> nn.Module:
    return (VoxelRefinerSign if cfg.sign else VoxelRefiner)(cfg, block_out_channels)


# ---------------------------------------------------------------------------------------------
# Cube layout and the sparse → dense → sparse glue

@dataclass(frozen=True)
class CubeGrid:
    """3 cubes of edge `patch` per axis at offsets 0, stride, 2·stride, tiling a grid of edge `resolution`.

    The original hard-codes 512/192/160 (refiner) and 512/256/128 (sign refiner, on the 2× downsampled
    grid); other values exist for tests.
    """
    resolution: int = 512
    patch: int = 192
    stride: int = 160

    def __post_init__(self):
        if self.resolution != 2 * self.stride + self.patch or not self.stride < self.patch <= 2 * self.stride:
            raise ValueError(f"cube grid {self} does not tile: need resolution = 2*stride + patch and "
                             "stride < patch <= 2*stride")

    @property
    def overlap(self) -> int:
        return self.patch - self.stride

    def origins(self) -> list[tuple[int, int, int]]:
        """Cube origins in the original's order: x outer, then y, z inner."""
        o = [0, self.stride, 2 * self.stride]
        return [(a, b, c) for a in o for b in o for c in o]


GRID_512 = CubeGrid(512, 192, 160)
GRID_1024_SIGN = CubeGrid(512, 256, 128)


@dataclass(frozen=True)
class RefinedField:
    """The refined field where marching cubes needs it.

    | field      | shape / dtype      | meaning                                                        |
    |------------|--------------------|----------------------------------------------------------------|
    | keys       | [M] int64          | ((b·R + x)·R + y)·R + z of each kept voxel, sorted, unique      |
    | values     | [M] float          | field value at those voxels (model dtype)                      |
    | resolution | int                | grid edge R (512 or 1024)                                      |
    | level      | float              | iso-level to mesh at (2 × mc_threshold for 512, mc_threshold for 1024) |

    Holds every corner of every grid cell (2×2×2 voxels, min corner in [0, R-2]) whose corners are not
    all above or all below `level` — and nothing else. Marching cubes over the cells whose 8 corners are
    all present gives the same mesh as over the original's dense grid. Vertices map to the original's
    frame by v / R * 2 - 1. One int64 key per voxel (not [M, 4] coordinates) halves what is held.
    """
    keys: torch.Tensor
    values: torch.Tensor
    resolution: int
    level: float

    @property
    def coords(self) -> torch.Tensor:
        """[M, 4] int32 (batch, x, y, z), decoded from `keys` (for inspection and tests)."""
        R, k = self.resolution, self.keys
        return torch.stack([k // R**3, k // R**2 % R, k // R % R, k % R], 1).int()


def max_crossing_corners(resolution: int) -> int:
    """Most field voxels a real surface can need: 128·R² (a sphere of radius 0.45 R needs about 10·R²;
    R³/8 at R = 1024). More means the level is crossed all through the volume, i.e. noise."""
    return 128 * resolution * resolution


def _too_many_corners(n: int, resolution: int) -> ValueError:
    return ValueError(
        f"The refined field crosses the level at {n} of the {resolution}³ grid's voxels (a surface needs at "
        f"most {max_crossing_corners(resolution)}), so it is noise filling the volume, not a surface; the "
        "refiner weights are probably untrained or do not match this model — load the official refiner "
        "checkpoint or turn interior removal off.")


class _CrossingCollector:
    """Receives consecutive x-slabs [B, X, R, R] of a field and keeps the corners of straddling cells.

    The last row of each slab is kept to form the cells between slabs; corners on it that the previous
    slab already kept are not kept again, so keys come out unique (and sorted when B = 1).
    """

    def __init__(self, resolution: int, level: float, near: bool = False, max_corners: int | None = None):
        self.R, self.level, self.near = resolution, level, near
        self.max_corners = max_crossing_corners(resolution) if max_corners is None else max_corners
        self.prev: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None
        self.x_next = 0
        self.count = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def push(self, slab: torch.Tensor, decoded: torch.Tensor | None = None) -> None:
        """slab [B, X, R, R] field values for rows x_next..x_next+X-1; decoded: same-shape bool mask of
        decoded voxels, only used with `near` (cells must touch a decoded voxel to count)."""
        x0 = self.x_next
        self.x_next += slab.shape[1]
        block, dblock, kept_first = slab, decoded, None
        if self.prev is not None:
            block = torch.cat([self.prev[0], slab], 1)
            if self.near:
                dblock = torch.cat([self.prev[1], decoded], 1)
            kept_first = self.prev[2]
            x0 -= 1
        if block.shape[1] < 2:
            self.prev = (slab[:, -1:], decoded[:, -1:] if self.near else None, torch.zeros_like(slab[:, -1:], dtype=torch.bool))
            return
        v = block.float()  # fp16 values and the level compare exactly in fp32
        above, below = v > self.level, v < self.level
        del v
        cross = ~(_cell_all(above) | _cell_all(below))  # [B, X-1, R-1, R-1]
        del above, below
        if self.near:
            cross &= _cell_any(dblock)
        corner = torch.zeros(block.shape, dtype=torch.bool, device=block.device)
        for ox in (0, 1):
            for oy in (0, 1):
                for oz in (0, 1):
                    corner[:, ox:ox + cross.shape[1], oy:oy + cross.shape[2], oz:oz + cross.shape[3]] |= cross
        del cross
        self.prev = (slab[:, -1:], decoded[:, -1:] if self.near else None, corner[:, -1:].clone())
        if kept_first is not None:
            corner[:, :1] &= ~kept_first
        flat = corner.view(-1).nonzero().squeeze(1)  # [m] into [B, X, R, R]
        del corner
        if flat.numel() == 0:
            return
        self.count += flat.numel()
        if self.count > self.max_corners:
            raise _too_many_corners(self.count, self.R)
        self.values.append(block.reshape(-1)[flat])
        n_row = block.shape[1] * self.R * self.R
        R = self.R
        # [B, X, R, R] flat index → grid key ((b·R + x0 + x)·R + y)·R + z
        self.keys.append(flat + (flat // n_row) * (R - block.shape[1]) * R * R + x0 * R * R)

    def finish(self, dtype: torch.dtype, device: torch.device) -> RefinedField:
        if not self.keys:
            return RefinedField(torch.zeros(0, dtype=torch.int64, device=device),
                                torch.zeros(0, dtype=dtype, device=device), self.R, self.level)
        keys, vals = torch.cat(self.keys), torch.cat(self.values)
        self.keys, self.values = [], []
        if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):  # B > 1: slabs interleave elements
            keys, order = torch.sort(keys)
            vals = vals[order]
        return RefinedField(keys, vals, self.R, self.level)


def _cell_all(m: torch.Tensor) -> torch.Tensor:
    """[B, X, Y, Z] bool → [B, X-1, Y-1, Z-1]: all 8 corners of each cell set."""
    a = m[:, :-1] & m[:, 1:]
    a = a[:, :, :-1] & a[:, :, 1:]
    return a[:, :, :, :-1] & a[:, :, :, 1:]


def _cell_any(m: torch.Tensor) -> torch.Tensor:
    a = m[:, :-1] | m[:, 1:]
    a = a[:, :, :-1] | a[:, :, 1:]
    return a[:, :, :, :-1] | a[:, :, :, 1:]


def _in_cube(coords: torch.Tensor, origin: tuple[int, int, int], patch: int) -> torch.Tensor:
    lo = torch.tensor(origin, device=coords.device, dtype=coords.dtype)
    rel = coords[:, 1:] - lo
    return ((rel >= 0) & (rel < patch)).all(1)


def _densify(coords: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, origin, patch: int, batch: int,
             background: torch.Tensor) -> torch.Tensor:
    """Rows `mask` of (coords [N,4], values [N,C]) scattered into a [B, C, P, P, P] cube filled with
    `background` [C]; with duplicate coordinates one of the writes wins, as in the original."""
    C = values.shape[1]
    cube = background.view(1, C, 1, 1, 1).expand(batch, C, patch, patch, patch).contiguous()
    c = coords[mask].long()
    c[:, 1] -= origin[0]
    c[:, 2] -= origin[1]
    c[:, 3] -= origin[2]
    cube[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = values[mask]
    return cube


def _blend(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, dim: int) -> torch.Tensor:
    """Linear cross-fade a → b along `dim`, the original's expression and rounding: a·(1-w) + b·w."""
    shape = [1] * a.ndim
    shape[dim] = -1
    w = w.view(shape)
    return a * (1 - w) + b * w


def _stitch(parts: list[torch.Tensor], dim: int, grid: CubeGrid, w: torch.Tensor) -> torch.Tensor:
    """Three cube outputs (extent P along dim) → one tensor of extent R: first cube up to S, cross-fades on
    the two O-wide overlaps, middle cube's [O, S), last cube's [O, P) (§8.2 step 3)."""
    S, P, O = grid.stride, grid.patch, grid.overlap
    p0, p1, p2 = (p.narrow(dim, 0, P) for p in parts)
    return torch.cat([p0.narrow(dim, 0, S),
                      _blend(p0.narrow(dim, S, O), p1.narrow(dim, 0, O), w, dim),
                      p1.narrow(dim, O, S - O),
                      _blend(p1.narrow(dim, S, O), p2.narrow(dim, 0, O), w, dim),
                      p2.narrow(dim, O, P - O)], dim)


def _check_sparse(x: SparseTensor, resolution: int, what: str, model: nn.Module) -> None:
    device = next(model.parameters()).device
    if x.coords.device != device:
        raise ValueError(f"The decoded {what} is on {x.coords.device} but the refiner is on {device}; "
                         "move both to the same device.")
    if x.coords.shape[0] == 0:
        raise ValueError(f"The decoded {what} has no voxels, so there is no surface to refine; "
                         "check the structure stage produced tokens.")
    lo, hi = int(x.coords[:, 1:].min()), int(x.coords[:, 1:].max())
    if lo < 0 or hi >= resolution:
        raise ValueError(f"The decoded {what} has coordinates in [{lo}, {hi}], outside the {resolution}³ grid "
                         "the refiner expects; decode at the matching resolution.")


Progress = Callable[[int, int], None]


def _take(x: SparseTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(coords, feats) of x, leaving x empty: with no other reference left, they are freed as soon as the
    refiner has converted them (the decoded 1024 SDF's coords alone are ~1 GB)."""
    coords, feats = x.coords, x.feats
    x.coords, x.feats, x.cache = coords.new_zeros(0, coords.shape[1]), feats.new_zeros(0, *feats.shape[1:]), {}
    return coords, feats


@torch.no_grad()
def remove_interior_512(model: VoxelRefiner, sdf: SparseTensor, feats: SparseTensor | torch.Tensor,
                        level: float = 0.4, grid: CubeGrid = GRID_512,
                        progress: Progress | None = None, slab_rows: int = 32,
                        max_corners: int | None = None, consume: bool = False) -> RefinedField:
    """The 512 refiner's `run()` without dense 512³ grids.

    sdf: decoded SDF, feats [N, 1] at coords [N, 4] in a grid of edge grid.resolution; feats: the
    decoder's 32-channel features for the same rows (SparseTensor or [N, 32] tensor). level: the pipeline
    passes 2 × mc_threshold = 0.4. progress(done, total) is called after each of the 27 cubes (it may
    raise to cancel). Returns the refined field's straddling cells (`RefinedField`); raises ValueError
    when more than max_corners (default `max_crossing_corners(R)`) voxels straddle, i.e. the field is noise.
    consume: the caller hands `feats` over; it is emptied (`_take`) and its memory freed once the per-voxel
    MLP has read it (the pipeline passes True: 0.9 GB at 512).
    """
    R, P, S = grid.resolution, grid.patch, grid.stride
    _check_sparse(sdf, R, "SDF", model)
    dtype, device = model.dtype, sdf.device
    fe = feats.feats if isinstance(feats, SparseTensor) else feats
    if fe.shape[0] != sdf.coords.shape[0]:
        raise ValueError(f"The decoder features have {fe.shape[0]} rows but the SDF has {sdf.coords.shape[0]}; "
                         "pass the features decoded together with this SDF (return_feat).")
    B, coords = sdf.batch_size, sdf.coords
    values = sdf.feats.reshape(-1, 1).to(dtype)
    # latent_mlp is per voxel, so running it on the N decoded rows (and once on the zero background
    # vector) equals running it on the dense feature grid, without the 32-channel grid
    bg_latent = model.latent_mlp(torch.zeros(1, fe.shape[1], dtype=dtype, device=device))[0]  # [8]
    if consume and isinstance(feats, SparseTensor):
        _, fe = _take(feats)
    latent = torch.cat([model.latent_mlp(c.to(dtype)) for c in fe.split(1 << 20)])  # [N, 8]
    del fe
    bg_sdf = torch.ones(1, dtype=dtype, device=device)
    w = torch.linspace(0, 1, grid.overlap, device=device, dtype=dtype)
    empty_out = None
    collector = _CrossingCollector(R, level, max_corners=max_corners)
    prev_tail = None  # x-overlap rows of the previous cube row, stitched over y and z
    origins = grid.origins()
    done = 0
    for i in range(3):
        row = []
        for j in range(3):
            for k in range(3):
                origin = origins[9 * i + 3 * j + k]
                m = _in_cube(coords, origin, P)
                if bool(m.any()):
                    out = model.refine_cube(_densify(coords, values, m, origin, P, B, bg_sdf),
                                            _densify(coords, latent, m, origin, P, B, bg_latent))
                else:  # identical inputs → identical output; compute once
                    if empty_out is None:
                        empty_out = model.refine_cube(bg_sdf.view(1, 1, 1, 1, 1).expand(B, 1, P, P, P),
                                                      bg_latent.view(1, 8, 1, 1, 1).expand(B, 8, P, P, P))
                    out = empty_out
                row.append(out[:, 0])  # [B, P, P, P]
                done += 1
                if progress is not None:
                    progress(done, 27)

        def layer(x_lo: int, x_hi: int) -> torch.Tensor:
            # z first (the original's "lines"), then y ("layers"): [B, x_hi-x_lo, R, R]
            lines = [_stitch([row[3 * j + k][:, x_lo:x_hi] for k in range(3)], 3, grid, w) for j in range(3)]
            return _stitch(lines, 2, grid, w)

        if i > 0:
            collector.push(_blend(prev_tail, layer(0, grid.overlap), w, 1))
        core_lo, core_hi = (0 if i == 0 else grid.overlap), (S if i < 2 else P)
        for x in range(core_lo, core_hi, slab_rows):
            collector.push(layer(x, min(x + slab_rows, core_hi)))
        prev_tail = layer(S, P) if i < 2 else None
        del row
    return collector.finish(dtype, device)


def _downsample_mean(coords: torch.Tensor, values: torch.Tensor, B: int, R: int):
    """`sparse_downsample(·, 2)` of a one-channel field at 2R → (coords [M, 4] int32 at R, values [M, 1]).

    The same parents and the same mean, sum / (children + 1) in fp64 (§2.3), from one int64 key per voxel
    instead of [N, 4] int64 parent coordinates (the decoded 1024 grid has ~50 M voxels). Children are added
    in decoded order with index_add_, as sparse_downsample does, so the values are bitwise its values.
    """
    pkeys = ((coords[:, 0].long() * R + (coords[:, 1] >> 1)) * R + (coords[:, 2] >> 1)) * R + (coords[:, 3] >> 1)
    pkeys, inverse = torch.unique(pkeys, return_inverse=True)  # sorted (b, x, y, z), as sparse_downsample
    denom = torch.bincount(inverse, minlength=pkeys.numel()).double() + 1.0
    summed = torch.zeros(pkeys.numel(), dtype=torch.float64, device=values.device).index_add_(
        0, inverse, values.double())
    del inverse
    out = torch.stack([pkeys // R**3, pkeys // R**2 % R, pkeys // R % R, pkeys % R], 1).int()
    return out, (summed / denom).to(values.dtype)[:, None]


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[..., Z] bool (Z % 8 == 0) → [..., Z/8] uint8, bit b of byte q = element 8q + b."""
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=bits.device)
    return (bits.view(*bits.shape[:-1], -1, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)


@torch.no_grad()
def remove_interior_1024(model: VoxelRefinerSign, sdf: SparseTensor, level: float = 0.2,
                         grid: CubeGrid = GRID_1024_SIGN, progress: Progress | None = None,
                         slab_rows: int = 16, near_band_only: bool = False,
                         max_corners: int | None = None, consume: bool = False) -> RefinedField:
    """The sign refiner's `run()` without dense 1024³ grids.

    sdf: decoded SDF [N, 1] at coords in a grid of edge 2·grid.resolution (duplicate coordinates from
    chunk seams are allowed, as the original gets them). level: mc_threshold (0.2). The inside/outside
    sign is computed at grid.resolution on `sparse_downsample(sdf, 2)` (its sum/(n+1) mean included), one
    cube at a time, later cubes winning overlaps; the 1024 field is ±1 off the decoded voxels and the
    decoded value on them.

    near_band_only (off by default, not in the original): keep only cells touching a decoded voxel, which
    drops the blocky surfaces the coarse sign grid makes where it flips far from the decoded band.
    max_corners: see `remove_interior_512`.
    consume: the caller hands `sdf` over; it is emptied (`_take`) and its coords and values freed once
    converted to sorted keys (the pipeline passes True: ~1 GB for 60 M decoded voxels).
    """
    R, P, S = grid.resolution, grid.patch, grid.stride
    R2 = 2 * R
    if R % 8 or S % 8:
        raise ValueError(f"cube grid {grid} needs resolution and stride divisible by 8 for the packed sign grid.")
    _check_sparse(sdf, R2, "SDF", model)
    dtype, device = model.dtype, sdf.device
    B = sdf.batch_size
    c, f_values = _take(sdf) if consume else (sdf.coords, sdf.feats)
    f_values = f_values.reshape(-1).to(dtype)
    c_coords, c_values = _downsample_mean(c, f_values, B, R)
    bg = torch.ones(1, dtype=dtype, device=device)
    # decoded voxels as one int64 key each, x-major ((x·B + b)·R2 + y)·R2 + z so that every x-slab is one
    # contiguous run; the stable sort keeps duplicates (chunk seams) in their decoded order
    f_keys = ((c[:, 1].long() * B + c[:, 0]) * R2 + c[:, 2]) * R2 + c[:, 3]
    f_keys, order = torch.sort(f_keys, stable=True)
    f_values = f_values[order]
    del order, c
    one = torch.ones((), dtype=dtype, device=device)
    collector = _CrossingCollector(R2, level, near=near_band_only, max_corners=max_corners)
    empty_out = None
    done = 0
    for i in range(3):
        # later cubes overwrite overlaps, so each cube ends up owning [origin, origin + S) per axis, the
        # last one up to R; a row of cubes (fixed i) thus settles the sign of 512-rows [x0, x1), which
        # are streamed out before the next row: only one row's sign bits are ever held
        x0, x1 = S * i, (S * (i + 1) if i < 2 else R)
        signs = torch.zeros(B, x1 - x0, R, R // 8, dtype=torch.uint8, device=device)  # bit set = +1 (outside)
        for j in range(3):
            for k in range(3):
                origin = (S * i, S * j, S * k)
                m = _in_cube(c_coords, origin, P)
                if bool(m.any()):
                    out = model(_densify(c_coords, c_values, m, origin, P, B, bg))
                else:  # identical inputs → identical output; compute once
                    if empty_out is None:
                        empty_out = model(bg.view(1, 1, 1, 1, 1).expand(B, 1, P, P, P))
                    out = empty_out
                own = [S if o < 2 * S else P for o in origin]
                part = out[:, 0, :own[0], :own[1], :own[2]] > 0
                signs[:, :, origin[1]:origin[1] + own[1], origin[2] // 8:(origin[2] + own[2]) // 8] = _pack_bits(part)
                done += 1
                if progress is not None:
                    progress(done, 27)
        # 1024 x-slabs of these rows: background ±1 from the sign bits, decoded values scattered on top
        starts = list(range(2 * x0, 2 * x1, slab_rows))
        edges = torch.tensor(starts + [2 * x1], device=device) * (B * R2 * R2)
        bounds = torch.searchsorted(f_keys, edges).tolist()  # one sync per row of cubes
        for n, x in enumerate(starts):
            X = min(slab_rows, 2 * x1 - x)
            bits = _unpack_bits(signs[:, x // 2 - x0:(x + X + 1) // 2 - x0])  # [B, ~X/2, R, R]
            bits = bits.repeat_interleave(2, 1)[:, x % 2:x % 2 + X]
            bits = bits.repeat_interleave(2, 2).repeat_interleave(2, 3)  # [B, X, R2, R2]
            slab = torch.where(bits, one, -one)
            del bits
            k = f_keys[bounds[n]:bounds[n + 1]]
            z, y, xb = k % R2, k // R2 % R2, k // (R2 * R2)
            b, xr = xb % B, xb // B - x
            slab[b, xr, y, z] = f_values[bounds[n]:bounds[n + 1]]
            decoded = None
            if near_band_only:
                decoded = torch.zeros(slab.shape, dtype=torch.bool, device=device)
                decoded[b, xr, y, z] = True
            del k, z, y, xb, b, xr
            collector.push(slab, decoded)
        del signs
    return collector.finish(dtype, device)


@torch.no_grad()
def mesh_refined_field(field: RefinedField, max_cells: int = 1 << 21,
                       check_cancel=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Marching cubes of a `RefinedField` → per batch element (vertices [V, 3] fp32, faces [F, 3] int64).

    Vertices are in the original's frame (v / R * 2 - 1). Uses the conventions, tables, face decider and
    vertex welding of `mesh.marching_cubes` (a corner is inside when below the level; vertices
    interpolated in fp64 and rounded to fp32; welded per grid edge), but visits only cells whose 8
    corners are all in the field: `sparse_sdf_to_mesh` reads missing voxels as +1, right for a decoded
    band and wrong here, where the background is inside (-1) as often as outside. Cells are taken
    max_cells at a time, so the transients are bounded by the chunk, not the field; check_cancel() (raises
    to stop) before each chunk.
    """
    from .mesh.marching_cubes import Welder, key_coords, lookup_keys

    R, level, device = field.resolution, field.level, field.keys.device
    keys = field.keys  # sorted and unique by construction
    if keys.numel() > max_crossing_corners(R):
        raise _too_many_corners(keys.numel(), R)
    B = int(keys[-1]) // R**3 + 1 if keys.numel() else 1
    welder = Welder(R, level, device)
    for start in range(0, keys.numel(), max_cells):  # chunks of candidate cells bound memory
        if check_cancel is not None:
            check_cancel()
        cells = keys[start:start + max_cells]
        vals = field.values[start:start + max_cells]
        xyz = key_coords(cells, R)[:, 1:]
        inner = (xyz <= R - 2).all(1)  # every cell's min corner is a field voxel
        del xyz
        cells = cells[inner]
        pos, found = lookup_keys(keys, cells[:, None] + welder.corner_keys[None])  # [M, 8]
        full = found.all(1)
        cells, pos = cells[full], pos[full]
        del found, full, vals
        welder.add(cells, field.values[pos].float())
        del pos, cells
    verts, faces, vbatch = welder.finish()
    if faces.shape[0] == 0:
        log.warning("The refined field does not cross the level %s, so the mesh is empty.", level)
        return [(torch.zeros(0, 3, device=device), torch.zeros(0, 3, dtype=torch.int64, device=device))
                for _ in range(B)]
    v_counts = torch.bincount(vbatch, minlength=B)
    v_start = torch.cumsum(v_counts, 0) - v_counts
    fbatch = vbatch[faces[:, 0]]
    order = torch.sort(fbatch, stable=True).indices
    faces, fbatch = faces[order], fbatch[order]
    faces = faces - v_start[fbatch][:, None]
    verts = verts / R * 2 - 1
    return list(zip(verts.split(v_counts.tolist()), faces.split(torch.bincount(fbatch, minlength=B).tolist())))


def remove_interior(model: nn.Module, sdf: SparseTensor, feats: SparseTensor | torch.Tensor | None = None,
                    level: float = 0.2, progress: Progress | None = None, **kwargs) -> RefinedField:
    """Dispatch on the refiner kind: `VoxelRefiner` needs feats, `VoxelRefinerSign` ignores them."""
    if isinstance(model, VoxelRefinerSign):
        return remove_interior_1024(model, sdf, level, progress=progress, **kwargs)
    if feats is None:
        raise ValueError("The 512 refiner needs the decoder's 32-channel features; decode with return_feat=True.")
    return remove_interior_512(model, sdf, feats, level, progress=progress, **kwargs)
