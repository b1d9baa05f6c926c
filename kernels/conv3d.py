"""'Same' 3D convolution of few-channel fp16 volumes: the refiner UNets' full-resolution layers (SPARSE.md §8.1).

For x [B, Cin, D, H, W], weight [Cout, Cin, k, k, k] (k = 1 or 3, stride 1, zero padding (k - 1) / 2) and bias
[Cout]:

    y[b, o, d, h, w] = bias[o] + sum_{c, i, j, l} weight[o, c, i, j, l] · x[b, c, d + i - p, h + j - p, w + l - p]

accumulated in fp32 and rounded once to x's dtype: `F.conv3d(x, weight, bias, padding=p)`, up to fp32 summation
order.

Why a kernel: at 256³ the refiners' first UNet level has 8 channels, their heads 1. Such convolutions move a
few hundred MB and do little arithmetic. cuDNN's NCDHW path converts to NDHWC and back around them, and for
one input or output channel, or a 1×1×1 kernel, this kernel is 1.9-4.2× faster (bench/results/conv3d.md);
for 3×3×3 kernels between 8-40 channels it is not, and `suits` leaves those to cuDNN.

Here a program owns BW consecutive output voxels of one (depth, height) row and all output channels; for
each of the k³ taps it loads the shifted [voxels, Cin] input tile (masked at the borders: the zero padding)
and multiplies it with that tap's [Cin, Cout] weights on the tensor cores. The k³ shifted loads of
neighbouring programs overlap, and the caches serve them. Nothing beyond the output is allocated, so no
depth slabs are needed (`refiner.unet.conv3d_slabs`).

Layouts: x [B, Cin, D, H, W] fp16/bf16, contiguous or channels-last contiguous (`torch.channels_last_3d`, the
refiner UNets' layout on CUDA); weight [Cout, Cin, k, k, k] (any float dtype, used in x's dtype); bias [Cout]
or None; y [B, Cout, D, H, W] in x's dtype and x's layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import HALF as _HALF
from ._common import (  # Triton, or stand-ins that let this module import without it (see _common)
    dot_width,
    is_channels_last,
    tl,
    triton,
)
from ._common import use_triton as _use_triton

__all__ = ["conv3d_same", "conv3d_same_reference", "shape_suits", "suits"]

# What the kernel can compute (`shape_suits`): up to 64 input and 32 output channels.
MAX_CIN = 64
MAX_COUT = 32
# What it is used for (`suits`), from bench/results/conv3d.md (H100, official cube sizes): the 1×1×1 shortcuts
# to 8 channels (1.9-4.2× cuDNN), the refiners' input convolutions from the one-channel SDF (2.4-3.1×) and the
# sign refiner's and 512 refiner's one-channel heads (3.9-4.1×), all at 256³ / 192³. The 3×3×3 convolutions
# between 8-40 channels stay with cuDNN, which is as fast or faster there (0.6-1.1×), as do wider layers.
DISPATCH_MAX_COUT = 8
BLOCK_W, NUM_WARPS = 128, 4  # output row segment of a program, bench/bench_conv3d.py


def conv3d_same_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.conv3d in fp32 (fp64 for fp64 x), rounded once to x's dtype: the kernel's arithmetic, and a path for
    CPUs, whose half-precision 3D convolution is missing or slow."""
    wide = torch.promote_types(x.dtype, torch.float32)
    p = (weight.shape[-1] - 1) // 2
    b = None if bias is None else bias.to(wide)
    return F.conv3d(x.to(wide), weight.to(wide), b, padding=p).to(x.dtype)


def suits(conv: torch.nn.Conv3d, x: torch.Tensor) -> bool:
    """Whether the kernel computes `conv(x)` here: a `shape_suits` convolution of a shape where it beats cuDNN
    (see DISPATCH_MAX_COUT), and Triton runs for x (CUDA, fp16/bf16, Triton installed). Elsewhere callers keep
    the module's own convolution."""
    wins = conv.kernel_size[0] == 1 or conv.in_channels == 1 or conv.out_channels == 1
    return (
        shape_suits(conv)
        and wins
        and conv.out_channels <= DISPATCH_MAX_COUT
        and x.dim() == 5
        and _use_triton("auto", x)
    )


def shape_suits(conv: torch.nn.Conv3d) -> bool:
    """k = 1 or 3 with 'same' zero padding, stride 1, no dilation or groups, few channels."""
    k = conv.kernel_size
    return (
        k in ((1, 1, 1), (3, 3, 3))
        and conv.stride == (1, 1, 1)
        and conv.padding == tuple((n - 1) // 2 for n in k)
        and conv.dilation == (1, 1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.in_channels <= MAX_CIN
        and conv.out_channels <= MAX_COUT
    )


@triton.jit
def _conv3d_kernel(
    x,
    w,
    bias,
    y,
    D,
    H,
    W,
    CIN,
    COUT,
    X_CL: tl.constexpr,
    Y_CL: tl.constexpr,
    KS: tl.constexpr,
    CIN_P: tl.constexpr,
    COUT_P: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BW: tl.constexpr,
):
    # program (wb, h, b·D + d): output voxels [w0, w0 + BW) of row (d, h) of sample b, all channels. The
    # voxels of a program are contiguous in memory (one row segment) so every tap's loads and the store coalesce.
    i_w, h, i_bd = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = i_bd // D
    d = i_bd % D
    ow = i_w * BW + tl.arange(0, BW)
    o_ci = tl.arange(0, CIN_P)
    o_co = tl.arange(0, COUT_P)
    S = D * H * W
    x_b = x + b.to(tl.int64) * CIN * S
    # element (voxel v, channel c) of a sample: c·S + v (NCDHW) or v·CIN + c (channels-last)
    ch = o_ci.to(tl.int64)[None, :] * (1 if X_CL else S)  # [1, CIN_P] channel offsets
    v_step = CIN if X_CL else 1
    m_ci = o_ci[None, :] < CIN
    P: tl.constexpr = (KS - 1) // 2
    acc = tl.zeros([BW, COUT_P], tl.float32)
    # Depth and height taps loop at run time and only the KS width taps are unrolled: with all 27 taps unrolled
    # the 3×3×3 variant compiled in ~2.5 s on the H100 machine instead of ~0.8 s, seconds a new install waits
    # before its first mesh, for ~0.5 ms less per call (bench/results/conv3d.md).
    for i in range(KS):
        dd = d + i - P + 0 * ow  # vectors (also hh): the interpreter cannot AND a scalar mask into a tensor one
        for j in range(KS):
            hh = h + j - P + 0 * ow
            m_row = (dd >= 0) & (dd < D) & (hh >= 0) & (hh < H)
            for l in tl.static_range(KS):
                ww = ow + l - P
                m = m_row & (ww >= 0) & (ww < W)  # outside the volume: the zero padding
                v = ((dd * H + hh) * W + ww).to(tl.int64) * v_step
                a = tl.load(x_b + ch + v[:, None], mask=m[:, None] & m_ci, other=0.0)
                tap = (i * KS + j) * KS + l
                wt = tl.load(w + tap * CIN_P * COUT_P + o_ci[:, None] * COUT_P + o_co[None, :])  # zero-padded
                acc = tl.dot(a, wt, acc)
    if HAS_BIAS:
        acc += tl.load(bias + o_co, mask=o_co < COUT, other=0.0).to(tl.float32)[None, :]
    v = ((d * H + h) * W + ow).to(tl.int64)[:, None]
    if Y_CL:
        ptr = y + b.to(tl.int64) * COUT * S + v * COUT + o_co[None, :]
    else:
        ptr = y + b.to(tl.int64) * COUT * S + o_co.to(tl.int64)[None, :] * S + v
    tl.store(ptr, acc.to(y.dtype.element_ty), mask=(ow < W)[:, None] & (o_co[None, :] < COUT))


def _conv3d_same_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block: tuple[int, int] | None = None
) -> torch.Tensor:
    assert x.dtype in _HALF and x.dim() == 5, "x must be [B, Cin, D, H, W] fp16/bf16"
    B, cin, D, H, W = x.shape
    cout, cin_w, k = weight.shape[:3]
    assert cin_w == cin and weight.shape[2:] == (k, k, k) and k in (1, 3), (
        f"weight {tuple(weight.shape)} for {cin} channels"
    )
    cl = is_channels_last(x)
    x = x if cl else x.contiguous()
    fmt = torch.channels_last_3d if cl else torch.contiguous_format
    y = torch.empty(B, cout, D, H, W, dtype=x.dtype, device=x.device, memory_format=fmt)
    if y.numel() == 0:
        return y
    cin_p, cout_p = dot_width(cin), dot_width(cout)
    # [k³, Cin_p, Cout_p]: tap-major, zero rows and columns beyond the real channels (tl.dot needs 16)
    wp = torch.zeros(k**3, cin_p, cout_p, dtype=x.dtype, device=x.device)
    wp[:, :cin, :cout] = weight.to(x.dtype).permute(2, 3, 4, 1, 0).reshape(k**3, cin, cout)
    bw, warps = block or (BLOCK_W, NUM_WARPS)
    assert B * D < 2**31 and H < 65536, "volume too large for the launch grid"
    grid = (triton.cdiv(W, bw), H, B * D)
    _conv3d_kernel[grid](
        x,
        wp,
        wp if bias is None else bias,
        y,
        D,
        H,
        W,
        cin,
        cout,
        X_CL=cl,
        Y_CL=cl,
        KS=k,
        CIN_P=cin_p,
        COUT_P=cout_p,
        HAS_BIAS=bias is not None,
        BW=bw,
        num_warps=warps,
    )
    return y


def conv3d_same(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """'Same' convolution (k = 1 or 3, stride 1, zero padding) of x [B, Cin, D, H, W] → [B, Cout, D, H, W] in
    x's dtype, fp32 accumulation (see module doc).

    backend: "auto" (Triton on CUDA for fp16/bf16 when installed, the reference elsewhere), "triton" (also on
    CPU with TRITON_INTERPRET=1) or "reference".
    """
    if _use_triton(backend, x):
        return _conv3d_same_triton(x, weight, bias)
    return conv3d_same_reference(x, weight, bias)
