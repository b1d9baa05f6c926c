"""Top-k selection blocks from a slab of block scores (SSA, SPARSE.md §6.4): the second kernel of compressed attention.

kernels/ssa_compressed.py writes the block scores of a launch's tokens to a scratch and hands it here:

    scores [H, B, R, W] fp32: scores[kh, b, t, c] = score of block c of sample b for that sample's token q_lo + t
    out[kh, cu_q[b] + q_lo + t, :] = the min(topk, #blocks of b) blocks of largest score, ascending, -1 padded

for the tokens that exist (q_lo + t < the sample's token count); other rows of `out` are left as they are.
#blocks of b is cu_blocks[b+1] - cu_blocks[b] and must be <= W; columns past it are ignored. Scores are finite
(sums of probabilities). Ties go to the lower block index (torch.topk leaves them unspecified).

One program holds ROWS tokens' scores in registers (64 a thread by default, `launch_shape`), a chunk of at most
TOPK_CHUNK at a time, and runs rounds of max-and-insert: while the chunk's best beats some row's current k-th
best, it replaces it. One chunk covers every official grid (<= 16^3 blocks), so that is exactly topk rounds; a
wider sample merges chunk by chunk.

Segmented (`SEGMENTED`, one-chunk rows only): each round of the above masks and reduces a whole row of CHUNK
scores. With SEG > 0 the kernel instead (`_segment_heads`) reduces the row once, to the best of each SEG-wide segment; each of the topk rounds
then picks the best segment head (NSEG = CHUNK / SEG wide) and reloads only that segment's SEG scores (from
the cache) for its next head: the first score after the picked one in the order (score descending, block
ascending). Same blocks, same ties. Written without a GPU: off until bench/bench_topk.py times it.
"""

from __future__ import annotations

import torch

from ._common import tl, triton  # Triton, or stand-ins that let this module import without it (see _common)
from ._common import use_triton as _use_triton

__all__ = ["block_topk", "block_topk_reference", "launch_shape", "top_blocks"]

TOPK_CHUNK = 4096  # scores a program holds at once
SEGMENTED = False  # one-chunk rows by segment heads (module doc)
SEG = 16  # their segment width


def top_blocks(scores, k: int):
    """The k largest of each row of scores [..., n] as int32 indices, ascending; equal scores go to the lower
    index (a stable descending sort keeps them in index order; torch.topk leaves ties unspecified)."""
    best = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return best.sort(dim=-1).values.to(torch.int32)


def block_topk_reference(scores, cu_seqlens_q, cu_blocks, q_lo: int, topk: int, out):
    """PyTorch reference of block_topk (same arguments, fills `out` in place and returns it)."""
    cu_q, cu_b = cu_seqlens_q.tolist(), cu_blocks.tolist()
    for b in range(len(cu_q) - 1):
        n_tok = min(cu_q[b + 1] - cu_q[b] - q_lo, scores.shape[2])
        if n_tok <= 0:
            continue
        n_blk = cu_b[b + 1] - cu_b[b]
        k = min(topk, n_blk)
        rows = out[:, cu_q[b] + q_lo : cu_q[b] + q_lo + n_tok]
        rows.fill_(-1)
        rows[..., :k] = top_blocks(scores[:, b, :n_tok, :n_blk], k)
    return out


@triton.jit
def _worst(b_tv, b_ti, ONE_CHUNK: tl.constexpr):
    # the entry a better score replaces: the smallest, and of equal smallest ones the highest block (ties go to
    # the lower block). Inside one chunk scores arrive in descending order and never displace each other once
    # the k slots are full, so any smallest (an empty slot) will do
    b_min, i_min = tl.min(b_tv, 1, return_indices=True)
    if not ONE_CHUNK:
        b_last, i_min = tl.max(tl.where(b_tv == b_min[:, None], b_ti, -2), 1, return_indices=True)
    return b_min, i_min


@triton.jit
def _rounds(
    p_sc,
    m_t,
    n_blk,
    ROWS: tl.constexpr,
    CHUNK: tl.constexpr,
    TOPK: tl.constexpr,
    TOPK_P: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):
    """Rows' top-k blocks [ROWS, TOPK_P] (-1 unfilled) by rounds of max-and-insert over each chunk."""
    o_c = tl.arange(0, CHUNK)
    o_tk = tl.arange(0, TOPK_P)
    # [ROWS, TOPK_P]; pad columns hold +inf so they are never the minimum to replace
    b_tv = tl.where(o_tk[None, :] < TOPK, float("-inf"), float("inf")) + tl.zeros([ROWS, TOPK_P], tl.float32)
    b_ti = tl.full([ROWS, TOPK_P], -1, tl.int32)
    for c0 in range(0, n_blk, CHUNK):
        m_c = m_t[:, None] & ((c0 + o_c) < n_blk)[None, :]
        b_sc = tl.load(p_sc + (c0 + o_c)[None, :], mask=m_c, other=float("-inf"))  # [ROWS, CHUNK]
        # strictly greater: an equal score found later (a higher block) never displaces an earlier one
        b_best, i_best = tl.max(b_sc, 1, return_indices=True)
        b_min, i_min = _worst(b_tv, b_ti, ONE_CHUNK)
        while tl.max((b_best > b_min).to(tl.int32), 0) > 0:
            m_ins = (b_best > b_min)[:, None] & (o_tk[None, :] == i_min[:, None])
            b_tv = tl.where(m_ins, b_best[:, None], b_tv)
            b_ti = tl.where(m_ins, (c0 + i_best)[:, None], b_ti)
            b_sc = tl.where(o_c[None, :] == i_best[:, None], float("-inf"), b_sc)
            b_best, i_best = tl.max(b_sc, 1, return_indices=True)
            b_min, i_min = _worst(b_tv, b_ti, ONE_CHUNK)
    return b_ti


@triton.jit
def _segment_heads(
    p_sc,
    m_t,
    n_blk,
    ROWS: tl.constexpr,
    CHUNK: tl.constexpr,
    TOPK: tl.constexpr,
    TOPK_P: tl.constexpr,
    SEG: tl.constexpr,
):
    """The same [ROWS, TOPK_P] for rows whose blocks fit one chunk, by segment heads (module doc)."""
    NSEG: tl.constexpr = CHUNK // SEG
    o_c = tl.arange(0, CHUNK)
    o_s = tl.arange(0, NSEG)
    o_e = tl.arange(0, SEG)
    o_tk = tl.arange(0, TOPK_P)
    b_sc = tl.load(p_sc + o_c[None, :], mask=m_t[:, None] & (o_c < n_blk)[None, :], other=float("-inf"))
    # each segment's head: its best score and, of equal ones, its lowest block (argmax ties go left)
    seg_v, seg_i = tl.max(tl.reshape(b_sc, [ROWS, NSEG, SEG]), 2, return_indices=True)  # [ROWS, NSEG]
    seg_b = o_s[None, :] * SEG + seg_i  # the heads' blocks
    b_ti = tl.full([ROWS, TOPK_P], -1, tl.int32)
    for r in tl.static_range(TOPK):
        # the best head; of equal ones the lowest segment's, so the lowest block
        best, s = tl.max(seg_v, 1, return_indices=True)  # [ROWS]
        at_s = o_s[None, :] == s[:, None]
        blk = tl.sum(tl.where(at_s, seg_b, 0), 1)
        b_ti = tl.where((o_tk[None, :] == r) & (best > float("-inf"))[:, None], blk[:, None], b_ti)
        # segment s's next head: its best score after (best, blk) in the order; the ones before were picked
        o_sb = s[:, None] * SEG + o_e[None, :]  # [ROWS, SEG]: the blocks of segment s
        v = tl.load(p_sc + o_sb, mask=m_t[:, None] & (o_sb < n_blk), other=float("-inf"))
        after = (v < best[:, None]) | ((v == best[:, None]) & (o_sb > blk[:, None]))
        nxt, i_n = tl.max(tl.where(after, v, float("-inf")), 1, return_indices=True)
        seg_v = tl.where(at_s, nxt[:, None], seg_v)
        seg_b = tl.where(at_s, (s * SEG + i_n)[:, None], seg_b)
    return b_ti


@triton.jit
def _topk_kernel(
    sc,
    bidx,
    cu_q,
    cu_blk,
    q_lo,
    q_hi,
    stride_sh,
    stride_sb,
    stride_sn,
    stride_bh,
    stride_bn,
    TOPK: tl.constexpr,
    TOPK_P: tl.constexpr,
    ROWS: tl.constexpr,
    CHUNK: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    SEG: tl.constexpr,
):
    # SEG > 0 (one-chunk rows only): by segment heads; 0: by rounds (module doc)
    BIG: tl.constexpr = 2147483647
    i_q, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_q + i_b)
    q_end = tl.minimum(tl.load(cu_q + i_b + 1) - q_start, q_hi)
    t0 = q_lo + i_q * ROWS
    if t0 >= q_end:
        return
    n_blk = tl.load(cu_blk + i_b + 1) - tl.load(cu_blk + i_b)
    o_t = t0 + tl.arange(0, ROWS)
    m_t = o_t < q_end
    o_tk = tl.arange(0, TOPK_P)
    p_sc = sc + i_h * stride_sh + i_b * stride_sb + (o_t - q_lo)[:, None].to(tl.int64) * stride_sn  # [ROWS, 1]
    if SEG > 0:
        b_ti = _segment_heads(p_sc, m_t, n_blk, ROWS, CHUNK, TOPK, TOPK_P, SEG)
    else:
        b_ti = _rounds(p_sc, m_t, n_blk, ROWS, CHUNK, TOPK, TOPK_P, ONE_CHUNK)
    # ascending block order with the -1 padding last, then back to -1
    b_key = tl.where(b_ti < 0, BIG, b_ti)
    b_key = tl.sort(b_key, 1)
    b_ti = tl.where(b_key == BIG, -1, b_key)
    p_b = bidx + i_h * stride_bh + (q_start + o_t)[:, None].to(tl.int64) * stride_bn + o_tk[None, :]
    tl.store(p_b, b_ti, mask=m_t[:, None] & (o_tk[None, :] < TOPK))


def launch_shape(chunk: int) -> tuple[int, int]:
    """(tokens a program, warps) for a chunk width: one warp holding 2,048 scores (64 a thread) where a chunk
    fits, 1.3-1.6x the earlier 4 tokens x 4 warps at the official widths on an H100 (bench/results/topk.md).
    A chunk of 4,096 (v1.0 grids above 2,048 blocks) keeps 4 warps: 2 warps spill on sm_120 (archs.md)."""
    return max(1, 2048 // chunk), 1 if chunk <= 2048 else 4


def _block_topk_triton(
    scores, cu_seqlens_q, cu_blocks, q_lo: int, topk: int, out, rows=None, num_warps=None, segmented=None
):
    """rows (tokens a program holds), num_warps and segmented (default SEGMENTED) override the launch
    (bench/bench_topk.py)."""
    h, b, n_rows, width = scores.shape
    assert scores.dtype == torch.float32 and out.dtype == torch.int32 and out.stride(2) == 1
    assert cu_seqlens_q.dtype == torch.int32 and cu_blocks.dtype == torch.int32
    if n_rows == 0 or b == 0 or h == 0:
        return out
    chunk = min(TOPK_CHUNK, triton.next_power_of_2(max(1, width)))
    default_rows, default_warps = launch_shape(chunk)
    rows, num_warps = rows or default_rows, num_warps or (default_warps if scores.is_cuda else 1)
    one_chunk = width <= chunk
    grid = (triton.cdiv(n_rows, rows), b, h)
    args = (scores, out, cu_seqlens_q, cu_blocks, q_lo, q_lo + n_rows, *scores.stride()[:3], *out.stride()[:2])
    meta = dict(TOPK=topk, TOPK_P=max(2, triton.next_power_of_2(topk)), ROWS=rows, CHUNK=chunk, num_warps=num_warps)
    seg = SEG if (SEGMENTED if segmented is None else segmented) and one_chunk and chunk >= SEG else 0
    _topk_kernel[grid](*args, ONE_CHUNK=one_chunk, SEG=seg, **meta)
    return out


def block_topk(scores, cu_seqlens_q, cu_blocks, q_lo: int, topk: int, out, backend: str = "auto"):
    """Each token's top-k blocks from scores [H, B, R, W] into out [H, N, topk] int32 (module docstring); -> out.

    backend: "auto" (Triton on CUDA when installed, the reference elsewhere), "triton" (also on CPU with
    TRITON_INTERPRET=1) or "reference".
    """
    fn = _block_topk_triton if _use_triton(backend, scores, dtypes=None) else block_topk_reference
    return fn(scores, cu_seqlens_q, cu_blocks, q_lo, topk, out)
