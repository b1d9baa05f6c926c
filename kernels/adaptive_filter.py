"""One step of the 512 refiner's adaptive filter: a per-voxel 3×3×3 filter shared over channels (SPARSE.md §8.2).

For sample b, channel c and voxel v = (i, j, k) of a P0 × P1 × P2 cube, with taps t = 9·a + 3·β + γ in order
t = 0..26, each reading x at offset (a-1, β-1, γ-1) (0 outside the cube):

    acc_0 = 0,   acc_{t+1} = round(acc_t + round(x[b, c, v + offset_t] · w[b, t, v])),   out = acc_27

where round is to x's dtype (none for fp32): PyTorch's `out = out + xp_shifted * w[:, t:t+1]`, 27 times, the
form of the original (each elementwise op computes in fp32 and rounds its result to fp16/bf16), bit for bit.
The kernel does the same roundings in the same order: per tap `p = (x.f32 · w.f32).to(dtype)` and
`acc = (acc.f32 + p.f32).to(dtype)`, launched without FMA contraction (fp32 would otherwise fuse the product
into the sum). For fp16/bf16 the compiler turns each pair into one native `mul.rn`/`add.rn` (`fma.rn.bf16` on
sm_80) of that dtype (PTX read for sm_80-sm_120, 2026-12-06), which rounds the exact result once: the same value,
as an fp16/bf16 product is exact in fp32, and fp32's 24 bits (>= 2·11 + 2) make rounding a sum first to fp32 and
then to fp16/bf16 give the correctly rounded sum. Both sides keep subnormals (assumed: nothing flushes them).

Why a kernel: the refiner applies this three times per filter and three filters per cube; in PyTorch each step
is 27 elementwise passes over the whole [B, C, P³] tensor (each reading and writing `out`), 243 launches per
cube and ~35% of a 512 refiner cube's GPU time. Here one program reads a tile of voxels' 27 tap weights once
and applies each to all channels of a channel block, with the neighbours' x from cache, and writes out once.

Layouts: x [B, C, P0, P1, P2] and w [B, 27, P0, P1, P2] contiguous, same dtype (fp16/bf16 on CUDA; fp32 too,
used by the interpreter tests); out a new tensor like x (never x itself: other programs still read x's
neighbours). Any C (8 or 1 in the release) and any cube sizes with P0·P1·P2 < 2³¹ (int32 voxel offsets).
A program owns BLOCK_S consecutive voxels of the flattened z-fastest index and BLOCK_C channels of one sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import tl, triton  # Triton, or stand-ins that let this module import without it (see _common)
from ._common import use_triton as _use_triton

__all__ = ["adaptive_filter_step", "adaptive_filter_reference"]

MAX_BLOCK_C = 8  # channels a program holds: the release's C = 8 reads each tap weight once per voxel
# elements (BLOCK_C × BLOCK_S) a program accumulates, 4 a thread (num_warps = TILE / 128). Cross-compiled for
# sm_80-sm_120 as bench/archs.py does (2026-12-06): 40-66 registers at C = 8, 55-96 at C = 1, no spills; with all
# 27 taps unrolled, a 4096 tile needed 255 registers and 3.5 KB of spills on sm_90. Not yet timed on a GPU:
# bench/bench_adaptive_filter.py --tiles compares other tiles.
TILE = 512


def adaptive_filter_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One filter step in PyTorch, the original's loop body: 27 shifted products added one at a time in x's dtype
    (PyTorch's type promotion if w's dtype differs, as the original)."""
    P0, P1, P2 = x.shape[-3:]
    xp = F.pad(x, (1, 1, 1, 1, 1, 1))
    out = torch.zeros_like(x)
    for t in range(27):
        a, b, c = t // 9, t // 3 % 3, t % 3
        out = out + xp[:, :, a : a + P0, b : b + P1, c : c + P2] * w[:, t : t + 1]
    return out


@triton.jit
def _adaptive_filter_kernel(x, w, out, C, S, P0, P1, P2, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    # x, out [B, C, P0, P1, P2], w [B, 27, P0, P1, P2] contiguous, S = P0·P1·P2; program (i_s, i_c, i_b): voxels
    # [i_s·BLOCK_S, (i_s+1)·BLOCK_S) of the flattened index, channels [i_c·BLOCK_C, (i_c+1)·BLOCK_C) of sample i_b
    i_s, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_s = i_s * BLOCK_S + tl.arange(0, BLOCK_S)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_s = o_s < S
    m_c = o_c < C
    i0 = o_s // (P1 * P2)
    i1 = (o_s // P2) % P1
    i2 = o_s % P2
    # the voxel has a neighbour below / above along the two inner axes (else the tap reads the zero padding)
    m_lo1, m_hi1 = i1 > 0, i1 < P1 - 1
    m_lo2, m_hi2 = i2 > 0, i2 < P2 - 1
    p_x = x + (i_b * C + o_c).to(tl.int64)[:, None] * S + o_s[None, :]  # [BLOCK_C, BLOCK_S]
    p_w = w + i_b.to(tl.int64) * 27 * S + o_s  # [BLOCK_S], tap 0
    # [BLOCK_C, BLOCK_S], in x's dtype: every step rounds as PyTorch's elementwise ops do
    b_acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=out.dtype.element_ty)
    for a in range(3):  # planes a run-time loop, the 9 taps of a plane unrolled: fewer registers than 27 unrolled
        m_a = m_s & (i0 + a > 0) & (i0 + a < P0 + 1)  # plane i0 + a - 1 is inside the cube
        for b in tl.static_range(3):
            for c in tl.static_range(3):
                m_t = m_a
                if b == 0:
                    m_t = m_t & m_lo1
                if b == 2:
                    m_t = m_t & m_hi1
                if c == 0:
                    m_t = m_t & m_lo2
                if c == 2:
                    m_t = m_t & m_hi2
                d = (a - 1) * P1 * P2 + (b - 1) * P2 + (c - 1)
                # [BLOCK_S]: tap t = 9a + 3b + c of each voxel, read once for all BLOCK_C channels
                b_w = tl.load(p_w, mask=m_s, other=0.0).to(tl.float32)
                # [BLOCK_C, BLOCK_S]: 0 where padded, so the product is 0·w as with F.pad (sign and NaN included)
                b_x = tl.load(p_x + d, mask=m_c[:, None] & m_t[None, :], other=0.0).to(tl.float32)
                b_p = (b_x * b_w[None, :]).to(out.dtype.element_ty)
                b_acc = (b_acc.to(tl.float32) + b_p.to(tl.float32)).to(out.dtype.element_ty)
                p_w += S
    p_o = out + (i_b * C + o_c).to(tl.int64)[:, None] * S + o_s[None, :]
    tl.store(p_o, b_acc, mask=m_c[:, None] & m_s[None, :])


def _adaptive_filter_triton(x: torch.Tensor, w: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    assert x.ndim == 5 and x.is_contiguous() and w.is_contiguous(), "x [B, C, P0, P1, P2], w [B, 27, ...] contiguous"
    assert w.shape == (x.shape[0], 27, *x.shape[2:]), f"w {tuple(w.shape)} does not match x {tuple(x.shape)}"
    assert w.dtype == x.dtype, "x and w must share a dtype"
    B, C, P0, P1, P2 = x.shape
    S = P0 * P1 * P2
    assert S + P1 * P2 + P2 + 1 < 2**31, "cube too large for int32 voxel offsets"
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    block_c = min(triton.next_power_of_2(C), MAX_BLOCK_C)
    block_s = max(tile // block_c, 16)
    grid = (triton.cdiv(S, block_s), triton.cdiv(C, block_c), B)
    # no FMA contraction: fp32 would fuse a tap's product into the sum (fp16/bf16 round in between anyway)
    _adaptive_filter_kernel[grid](
        x,
        w,
        out,
        C,
        S,
        P0,
        P1,
        P2,
        BLOCK_C=block_c,
        BLOCK_S=block_s,
        num_warps=max(1, min(8, tile // 128)),
        enable_fp_fusion=False,
    )
    return out


def adaptive_filter_step(x: torch.Tensor, w: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """One adaptive-filter step: out[b, c, v] = sum over the 27 taps t of x[b, c, v + offset_t] · w[b, t, v], added
    in tap order with x's dtype's roundings (see module doc); a new tensor like x.

    backend: "auto" (Triton on CUDA for fp16/bf16 when installed and w has x's dtype, the reference elsewhere),
    "triton" (also on CPU with TRITON_INTERPRET=1) or "reference".
    """
    if _use_triton(backend, x) and (backend == "triton" or w.dtype == x.dtype):
        return _adaptive_filter_triton(x.contiguous(), w.contiguous())
    return adaptive_filter_reference(x, w)
