"""Residual add + LayerNorm (fp32 statistics) + adaLN modulation in one pass over the rows (the sparse DiT block).

For each row i of x [N, C] (fp16/bf16), with every intermediate rounded to x's dtype as the module's separate
ops round it:

    x'  = x + r · g           (if a residual r is given; g the gate row of the token's sample, or 1)
    n   = layernorm(x') in fp32 over C (population variance, eps), · w + b if affine, rounded
    y   = n · s + t           (if modulated: s = 1 + scale and t = shift, rows of the token's sample)

and returns (x', y). In `SparseDiTBlock` this replaces `norm1(x) * (1 + sc1) + sh1`, `x + attn * g1` followed
by `norm2(x)`, and `x + cross` followed by `norm3(x) * (1 + sc2) + sh2`: each of those is 3-6 full passes
over [N, C] in PyTorch (the fp32 copy, the norm, the cast, the multiply, the add), here one read and one or
two writes. The gate product r·g is rounded to x's dtype before the add, as PyTorch's multiply rounds it, and
the launch turns FMA contraction off: the residual stream must be bitwise the module's (the GPU test checks
it). A first fused version without `enable_fp_fusion=False` came out one fp16 ulp off for 13% of elements on
an H100 (2026-11-25); `FUSED_GATE = False` restores the separate PyTorch multiply. The statistics are summed in a
different order than PyTorch's LayerNorm (a two-pass mean and variance over the row in registers vs
Welford), so an element of y may round to the neighbouring fp16 value.

Layouts: x, r [N, C] row-major (C <= 16384); g, s, t [B, C] (B = 1: shared; else
`row_batch` [N] int32/int64 gives each row's sample); w, b [C] (any float dtype). Outputs are new tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import HALF as _HALF
from ._common import tl, triton  # Triton, or stand-ins that let this module import without it (see _common)
from ._common import use_triton as _use_triton

__all__ = ["add_layer_norm", "add_layer_norm_reference"]

# r·g inside the kernel (one pass less over [N, C] per gated residual); False: one PyTorch multiply first
FUSED_GATE = True


def add_layer_norm_reference(
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    row_batch: torch.Tensor | None = None,
    eps: float = 1e-6,
):
    """The module ops in order: (x + r·g, round(layernorm_fp32(x + r·g)) · s + t). scale is s (= 1 + adaLN
    scale, already in x's dtype); gate/scale/shift are [B, C] rows picked by row_batch (B = 1: broadcast)."""

    def rows(m):
        return m if row_batch is None else m[row_batch]

    if residual is not None:
        x = x + (residual if gate is None else residual * rows(gate))
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    y = F.layer_norm(x.float(), x.shape[-1:], w, b, eps).to(x.dtype)
    if scale is not None:
        y = y * rows(scale) + rows(shift)
    return x, y


@triton.jit
def _rounded(v, dt: tl.constexpr):
    """fp32 v rounded to dt and widened back. The int16 bitcast keeps the compiler from folding the round
    trip away; the launch also turns FMA contraction off (a fused r·g + x rounds once, the module twice)."""
    return v.to(dt).to(tl.int16, bitcast=True).to(dt, bitcast=True).to(tl.float32)


@triton.jit
def _add_ln_kernel(
    x,
    r,
    g,
    w,
    b,
    s,
    t,
    rb,
    x_out,
    y_out,
    C,
    eps,
    stride_m,
    stride_r,
    HAS_RES: tl.constexpr,
    HAS_GATE: tl.constexpr,
    AFFINE: tl.constexpr,
    MODULATE: tl.constexpr,
    PER_ROW: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    dt = x_out.dtype.element_ty
    m_row = tl.load(rb + row).to(tl.int64) * stride_m if PER_ROW else 0  # the token's sample's modulation row
    v = tl.load(x + row * C + cols, mask=mask, other=0.0)
    v = v.to(tl.float32)
    if HAS_RES:
        b_r = tl.load(r + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:  # r·g rounded as PyTorch's multiply rounds it, then added
            b_r = _rounded(b_r * tl.load(g + m_row + cols, mask=mask, other=0.0).to(tl.float32), dt)
        v = _rounded(v + b_r, dt)
        tl.store(x_out + row * C + cols, v.to(dt), mask=mask)
    mean = tl.sum(v, 0) / C
    d = tl.where(mask, v - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, 0) / C + eps)
    y = d * rstd
    if AFFINE:
        w_c = tl.load(w + cols, mask=mask, other=0.0).to(tl.float32)
        y = y * w_c + tl.load(b + cols, mask=mask, other=0.0).to(tl.float32)
    if MODULATE:
        y = _rounded(y, dt)
        y = _rounded(y * tl.load(s + m_row + cols, mask=mask, other=0.0).to(tl.float32), dt)
        y = y + tl.load(t + m_row + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_out + row * C + cols, y.to(dt), mask=mask)


def _add_layer_norm_triton(x, residual, gate, weight, bias, scale, shift, row_batch, eps):
    assert x.dtype in _HALF and x.ndim == 2 and x.is_contiguous()
    N, C = x.shape
    assert C <= 16384, "rows longer than 16384 do not fit one program"
    # the residual may be one row broadcast to every token (stride 0: the cross attention of a zero condition)
    assert residual is None or (
        residual.shape == x.shape
        and residual.dtype == x.dtype
        and (residual.is_contiguous() or residual.stride() == (0, 1))
    )
    assert (weight is None) == (bias is None) and (scale is None) == (shift is None)
    gate, scale, shift = (None if m is None else m.reshape(-1, C).contiguous() for m in (gate, scale, shift))
    assert all(m.dtype == x.dtype for m in (gate, scale, shift) if m is not None)
    if gate is not None and not FUSED_GATE:  # r·g as the module computes it (one PyTorch multiply)
        residual = residual * (gate if row_batch is None else gate[row_batch])
        gate = None
    per_row = row_batch is not None
    x_out = torch.empty_like(x) if residual is not None else x
    y = torch.empty_like(x)
    if N == 0:
        return x_out, y
    block = triton.next_power_of_2(C)
    _add_ln_kernel[(N,)](
        x,
        x if residual is None else residual,
        x if gate is None else gate,
        x if weight is None else weight,
        x if bias is None else bias,
        x if scale is None else scale,
        x if shift is None else shift,
        row_batch if per_row else x,
        x_out,
        y,
        C,
        eps,
        C,
        C if residual is None or residual.is_contiguous() else 0,
        HAS_RES=residual is not None,
        HAS_GATE=gate is not None,
        AFFINE=weight is not None,
        MODULATE=scale is not None,
        PER_ROW=per_row,
        BLOCK_C=block,
        num_warps=4 if block <= 2048 else 8,
        enable_fp_fusion=False,
    )
    return x_out, y


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    row_batch: torch.Tensor | None = None,
    eps: float = 1e-6,
    backend: str = "auto",
):
    """(x + r·g, layernorm(x + r·g)·s + t) with the module's roundings (see module doc); returns x itself as
    the first output when there is no residual.

    backend: "auto" (Triton on CUDA for fp16/bf16 when installed, the reference elsewhere), "triton" (also on
    CPU with TRITON_INTERPRET=1) or "reference".
    """
    if _use_triton(backend, x):
        return _add_layer_norm_triton(x, residual, gate, weight, bias, scale, shift, row_batch, eps)
    return add_layer_norm_reference(x, residual, gate, weight, bias, scale, shift, row_batch, eps)
