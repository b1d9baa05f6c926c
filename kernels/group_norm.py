"""GroupNorm followed by SiLU over a [B, C, *spatial] tensor, statistics in fp32 (the refiner UNets, SPARSE.md §8.1).

For sample b, group g (channels c in [g·C/G, (g+1)·C/G)) and every element x of that group:

    mean, var = population mean and variance of the group's C/G · S elements (S = prod(spatial)), in fp32
    y = round(x · a_c + (bias_c - a_c · mean)),   a_c = weight_c / sqrt(var + eps)     (round: to x's dtype)
    out = round(silu(y))

which is `F.silu(F.group_norm(x.float(), G, weight, bias, eps).to(x.dtype))`, the UNet's norm-then-SiLU,
up to fp32 summation order.

Why a kernel: PyTorch's GroupNorm reduces each (sample, group) row in one thread block. The refiners have
4 groups over 192³ or 256³ voxels, so 4 blocks do all the work: 84% of a 1024 sign-refiner cube's time on
an H100 is that reduction. Here a group is one contiguous range of memory (NCDHW), split into TILE-element
tiles; `_stats_kernel` reduces each tile to (mean, M2) and the tiles are merged with Chan's formula in
fp64 on the host stream ([B·G, tiles] numbers). `_apply_kernel` then normalises, rounds, applies the SiLU
and writes x's dtype in one pass, without the fp32 copy of x that the module path allocates.

Channels-last (NDHWC, `torch.channels_last_3d`), the refiner UNets' layout on CUDA (cuDNN computes 3D
convolutions in it and would otherwise convert around each one): a group is then C/G channels of every voxel,
so `_stats_cl_kernel` loads whole voxel rows [TILE voxels, C] and sums them per group, and `_apply_cl_kernel`
reads each element's channel from its position.

Layouts: x [B, C, D, H, W] contiguous or channels-last contiguous ([B, C, *spatial] contiguous for other
ranks), fp16/bf16; weight, bias [C] (any float dtype); out like x (same layout), and may be x itself (the
statistics are complete before any element is overwritten; each element is read before it is written, by
the same program).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import HALF as _HALF
from ._common import (  # Triton, or stand-ins that let this module import without it (see _common)
    is_channels_last,
    tl,
    triton,
)
from ._common import use_triton as _use_triton

__all__ = ["group_norm_silu", "group_norm_silu_reference"]

STATS_TILE = 4096  # elements a stats program reduces
APPLY_BLOCK = 2048  # elements an apply program writes


def group_norm_silu_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
    eps: float = 1e-5,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """silu(group_norm(x) in fp32 (fp64 for fp64 x), rounded to x's dtype) in x's dtype (written into out).

    One (sample, group) at a time, so the widened copy is one group's, not the whole tensor's (this is the
    refiners' path when Triton is missing: 40 channels of a 256³ cube are 2.7 GB in fp32). GroupNorm
    normalises each group on its own, so this is the whole tensor's F.group_norm, bit for bit (the golden
    refiner tests rely on it). On CUDA a group is then one thread block's reduction: slow, but bounded."""
    wide = torch.promote_types(x.dtype, torch.float32)
    B, C = x.shape[:2]
    cpg = C // groups
    out = torch.empty_like(x) if out is None else out
    for b in range(B):
        for c0 in range(0, C, cpg):
            part = x[b : b + 1, c0 : c0 + cpg]
            y = F.group_norm(part.to(wide), 1, weight[c0 : c0 + cpg].to(wide), bias[c0 : c0 + cpg].to(wide), eps)
            out[b : b + 1, c0 : c0 + cpg] = F.silu(y.to(x.dtype))
    return out


@triton.jit
def _stats_kernel(x, partial, L, n_tiles, TILE: tl.constexpr):
    # program (t, r): tile t of group row r (L contiguous elements) -> partial[r, t] = (mean, M2)
    t = tl.program_id(0)
    r = tl.program_id(1)
    offs = t * TILE + tl.arange(0, TILE)
    mask = offs < L
    v = tl.load(x + r.to(tl.int64) * L + offs, mask=mask, other=0.0).to(tl.float32)
    n = tl.minimum(L - t * TILE, TILE).to(tl.float32)
    mean = tl.sum(v, 0) / n
    d = tl.where(mask, v - mean, 0.0)
    m2 = tl.sum(d * d, 0)
    p = partial + (r.to(tl.int64) * n_tiles + t) * 2
    tl.store(p, mean)
    tl.store(p + 1, m2)


@triton.jit
def _norm_silu(v, a, b, dtype: tl.constexpr):
    # silu(round(v·a + b)) rounded to dtype: the norm's output rounded as the module's; the int16 bitcast keeps
    # the compiler from eliding the round trip
    y = (v * a + b).to(dtype).to(tl.int16, bitcast=True).to(dtype, bitcast=True)
    y = y.to(tl.float32)
    return (y / (1.0 + tl.exp(-y))).to(dtype)


@triton.jit
def _apply_kernel(x, out, scale, shift, S, BLOCK: tl.constexpr):
    # program (s, row): elements [s·BLOCK, (s+1)·BLOCK) of channel row `row` (= b·C + c) of S elements
    s = tl.program_id(0)
    row = tl.program_id(1)
    a = tl.load(scale + row)
    b = tl.load(shift + row)
    offs = s * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S
    base = row.to(tl.int64) * S
    v = tl.load(x + base + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + base + offs, _norm_silu(v, a, b, out.dtype.element_ty), mask=mask)


@triton.jit
def _stats_cl_kernel(x, partial, S, C, CPG, G, n_tiles, TILE_S: tl.constexpr, C_P: tl.constexpr, G_P: tl.constexpr):
    # program (t, b): voxels [t·TILE_S, (t+1)·TILE_S) of sample b, all C channels (rows of C contiguous
    # elements) -> partial[b·G + g, t] = (mean, M2) of each group g over those voxels
    t = tl.program_id(0)
    b = tl.program_id(1)
    s = t * TILE_S + tl.arange(0, TILE_S)
    c = tl.arange(0, C_P)
    m = (s < S)[:, None] & (c < C)[None, :]
    v = tl.load(x + b.to(tl.int64) * S * C + s.to(tl.int64)[:, None] * C + c[None, :], mask=m, other=0.0)
    v = v.to(tl.float32)
    g = tl.arange(0, G_P)
    member = ((c // CPG)[None, :] == g[:, None]) & (c < C)[None, :]  # [G_P, C_P]: channel c is in group g
    n = (tl.minimum(S - t * TILE_S, TILE_S) * CPG).to(tl.float32)
    mean = tl.sum(tl.where(member, tl.sum(v, 0)[None, :], 0.0), 1) / n  # [G_P]
    cmean = tl.sum(tl.where(member, mean[:, None], 0.0), 0)  # [C_P]: each channel's group mean
    d = tl.where(m, v - cmean[None, :], 0.0)
    m2 = tl.sum(tl.where(member, tl.sum(d * d, 0)[None, :], 0.0), 1)
    p = partial + ((b * G + g).to(tl.int64) * n_tiles + t) * 2
    tl.store(p, mean, mask=g < G)
    tl.store(p + 1, m2, mask=g < G)


@triton.jit
def _apply_cl_kernel(x, out, scale, shift, SC, C, BLOCK: tl.constexpr):
    # program (s, b): elements [s·BLOCK, (s+1)·BLOCK) of sample b's S·C; element i is channel i % C
    s = tl.program_id(0)
    b = tl.program_id(1)
    offs = s * BLOCK + tl.arange(0, BLOCK)
    mask = offs < SC
    row = b * C + offs % C
    a = tl.load(scale + row, mask=mask, other=0.0)
    sh = tl.load(shift + row, mask=mask, other=0.0)
    base = b.to(tl.int64) * SC
    v = tl.load(x + base + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + base + offs, _norm_silu(v, a, sh, out.dtype.element_ty), mask=mask)


def _merge(partial: torch.Tensor, L: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """partial [R, T, 2] per-tile (mean, M2) -> (mean [R], var [R]) of each row of L elements, fp64."""
    T = partial.shape[1]
    n = torch.full((T,), float(tile), dtype=torch.float64, device=partial.device)
    n[-1] = L - (T - 1) * tile
    means, m2 = partial[..., 0].double(), partial[..., 1].double()
    mean = (means * n).sum(1) / L
    m2 = m2.sum(1) + ((means - mean[:, None]).square() * n).sum(1)
    return mean, m2 / L


def _group_norm_silu_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    cl = is_channels_last(x)
    assert x.dtype in _HALF and (cl or x.is_contiguous()), "x must be contiguous or channels-last fp16/bf16"
    assert out is None or (out.shape == x.shape and out.dtype == x.dtype and out.stride() == x.stride())
    B, C = x.shape[:2]
    assert C % groups == 0, f"{C} channels do not split into {groups} groups"
    S = math.prod(x.shape[2:])
    out = torch.empty_like(x) if out is None else out  # empty_like keeps x's layout
    if x.numel() == 0:
        return out
    cpg = C // groups
    L = cpg * S
    if cl:
        c_p = triton.next_power_of_2(C)
        tile_s = max(1, STATS_TILE // c_p)
        n_tiles = triton.cdiv(S, tile_s)
        partial = torch.empty(B * groups, n_tiles, 2, dtype=torch.float32, device=x.device)
        _stats_cl_kernel[(n_tiles, B)](
            x, partial, S, C, cpg, groups, n_tiles, TILE_S=tile_s, C_P=c_p, G_P=triton.next_power_of_2(groups)
        )
        mean, var = _merge(partial, L, tile_s * cpg)  # [B·G]
    else:
        n_tiles = triton.cdiv(L, STATS_TILE)
        partial = torch.empty(B * groups, n_tiles, 2, dtype=torch.float32, device=x.device)
        _stats_kernel[(n_tiles, B * groups)](x, partial, L, n_tiles, TILE=STATS_TILE, num_warps=8)
        mean, var = _merge(partial, L, STATS_TILE)  # [B·G]
    rstd = torch.rsqrt(var.float() + eps).view(B, groups, 1)
    a = (rstd * weight.float().view(1, groups, -1)).reshape(B * C)  # per (b, c) scale and shift
    b = (bias.float().view(1, groups, -1) - a.view(B, groups, -1) * mean.float().view(B, groups, 1)).reshape(B * C)
    if cl:
        _apply_cl_kernel[(triton.cdiv(S * C, APPLY_BLOCK), B)](
            x, out, a.contiguous(), b.contiguous(), S * C, C, BLOCK=APPLY_BLOCK, num_warps=4
        )
        return out
    _apply_kernel[(triton.cdiv(S, APPLY_BLOCK), B * C)](
        x, out, a.contiguous(), b.contiguous(), S, BLOCK=APPLY_BLOCK, num_warps=4
    )
    return out


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    groups: int,
    eps: float = 1e-5,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """silu(group_norm(x)) in x's dtype, statistics in fp32 (see module doc); written into `out` when given
    (out=x normalises in place).

    backend: "auto" (Triton on CUDA for fp16/bf16 when installed, the reference elsewhere), "triton" (also on
    CPU with TRITON_INTERPRET=1) or "reference".
    """
    if _use_triton(backend, x):
        x = x if is_channels_last(x) else x.contiguous()
        return _group_norm_silu_triton(x, weight, bias, groups, eps, out)
    return group_norm_silu_reference(x, weight, bias, groups, eps, out)
