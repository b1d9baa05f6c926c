"""Compressed attention with log-sum-exp and block scoring, then top-k blocks (SSA, SPARSE.md §6.3-6.4).

Per sample b, query token i, query head h (KV head kh = h // G, G = HQ / H), compressed key c:

    s[i,h,c] = scale * q[i,h] . ck[c,kh]     lse[h,i] = ln sum_c exp s[i,h,c]     o[i,h] = sum_c exp(s - lse) cv[c,kh]
    score[kh,i,blk] = sum_{h in group kh} sum_{c in blk} exp(s[i,h,c] - lse[h,i])       (GQA group pooled)
    block_idx[kh,i,:] = the min(topk, #blocks of b) blocks of largest score, ascending, padded with -1

The original computes `o, lse` with flash-attn, then recomputes QK^T in a second kernel that writes a dense
fp32 [H, N, M] score matrix and runs `torch.topk` on it. Here the first kernel gives one program BLOCK_Q
query tokens x the G query heads of one KV head (BLOCK_Q*G rows, so every K/V tile is shared by the whole
group) and makes two passes over the sample's compressed keys: pass 1 the row max and sum (-> lse), pass 2
`p = exp(s - lse)`, `o += p v` (already normalised, no rescaling) and the block scores. The exponentials run
in base 2, `exp2(c s - lse2)` with c = `scale * log2(e)` as one FMA on the raw logits s, and the lse is
converted as `lse2 * ln 2` (the original's `lse.exp().log2()` overflows for lse > 88). Key tiles inside a
v1.1 sample's keys are loaded and used without masks; only the last, partial tile is masked.

The scores go to a scratch of at most SCORE_BYTES, so the tokens are done in launches of as many rows as it
holds (no [H, N, M] tensor), and a second kernel (kernels/ssa_topk.py) picks each token's top-k from a whole
row of scores in registers. Keeping a running top-k inside the first kernel instead (the earlier design) cost
a round of cross-thread reductions for every key tile that beat some token's k-th best, which made the top-k
the largest part of the kernel (bench/results/ssa.md).

Selection blocks (which compressed keys are scored together):
  * `block_keys=None` (v1.1, compression block = selection block): every compressed key is its own block and
    the block index is the key's position in its sample (compressed keys are in lexicographic cell order).
  * `block_keys [NB, CELLS] int32` (v1.0, compression block 4 inside selection block 8: CELLS = 8): the global
    rows of the <= CELLS compressed keys of each occupied selection block, -1 padded; `cu_blocks [B+1]` gives
    each sample's range of blocks (ascending flat block id). Scores are summed over a block's cells.
Ties between equal scores go to the lower block index (torch.topk leaves ties unspecified).

Layouts: q [N, HQ, D], ck/cv [M, H, D] (fp16/bf16), cu_seqlens_q [B+1] int32 (token rows), cu_seqlens_k
[B+1] int32 (compressed rows); outputs o [N, HQ, D] (q.dtype), lse [HQ, N] fp32 natural log (-inf for a sample
without keys), block_idx [H, N, topk] int32. Optional `gate [N]` (any stride) scales o per token and `out`
receives `out += gate * o` in place: the SSA module's gated sum of its three branches needs no extra buffers.
Constraints: HQ % H == 0 and G a power of two (rows are token-major, head-minor tiles); D a power of two
>= 16 (tile size of tl.dot); CELLS a power of two.
"""

from __future__ import annotations

import math

import torch

from ._common import LOG2E as _LOG2E
from ._common import check_heads as _check_heads
from ._common import chunk_rows as _chunk_rows
from ._common import fitting as _fitting
from ._common import gated as _gated
from ._common import load_k_tile as _load_k_tile
from ._common import load_v_tile as _load_v_tile
from ._common import smem_limit as _smem_limit
from ._common import softmax_step as _softmax_step
from ._common import store_gated as _store_gated
from ._common import tl, triton  # Triton, or stand-ins that let this module import without it (see _common)
from ._common import use_triton as _use_triton
from .ssa_topk import block_topk as _block_topk
from .ssa_topk import top_blocks as _top_blocks
from .tuning import autotune as _autotune
from .tuning import tune_size as _tune_size

__all__ = ["ssa_compressed_attention", "ssa_compressed_attention_reference"]

_LN2 = 0.6931471805599453
SCORE_BYTES = 64 << 20  # the block-score scratch between the two kernels


def score_rows(kv_heads: int, batch: int, width: int) -> int:
    """Tokens per sample one launch covers: as many as a [kv_heads, batch, rows, width] fp32 score scratch of
    SCORE_BYTES holds (a multiple of 64, at least 64)."""
    return max(64, SCORE_BYTES // (4 * kv_heads * batch * width) // 64 * 64)


def ssa_compressed_attention_reference(
    q,
    ck,
    cv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q: int,
    topk: int,
    block_keys=None,
    cu_blocks=None,
    scale: float | None = None,
    gate=None,
    out=None,
    return_lse: bool = True,
):
    """Plain PyTorch, fp32 inside; loops over samples and chunks of queries whose [HQ, chunk, M] score matrix
    stays within the working-set bound (`_common.CHUNK_ELEMENTS`): the fallback when Triton is missing."""
    n, hq, d = q.shape
    h = ck.shape[1]
    g = hq // h
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    o = torch.zeros(n, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((hq, n if return_lse else 1), float("-inf"), dtype=torch.float32, device=q.device)
    block_idx = torch.full((h, n, topk), -1, dtype=torch.int32, device=q.device)
    cq, cm = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    cb = cm if block_keys is None else cu_blocks.tolist()
    for b in range(len(cq) - 1):
        q0, q1, m0, m1 = cq[b], cq[b + 1], cm[b], cm[b + 1]
        if q1 == q0 or m1 == m0:
            continue
        k_b, v_b = ck[m0:m1].float(), cv[m0:m1].float()  # [m, H, D]
        nblk = cb[b + 1] - cb[b]
        if block_keys is not None:  # [nblk, CELLS] local key rows of each selection block
            bk = block_keys[cb[b] : cb[b + 1]].long()
            cell_blk = torch.arange(nblk, device=q.device)[:, None].expand_as(bk)[bk >= 0]
            cell_key = bk[bk >= 0] - m0
        step = _chunk_rows(hq * (m1 - m0))
        for c0 in range(q0, q1, step):
            c1 = min(q1, c0 + step)
            s = torch.einsum("ihgd,chd->hgic", q[c0:c1].float().view(-1, h, g, d), k_b).mul_(scale)  # [H, G, i, m]
            mx = s.amax(-1, keepdim=True)
            p = s.sub_(mx).exp_()  # in place: the chunk's one [H, G, i, m] buffer
            den = p.sum(-1, keepdim=True)
            p.div_(den)  # softmax
            o[c0:c1] = torch.einsum("hgic,chd->ihgd", p, v_b).reshape(-1, hq, d)
            if return_lse:
                lse[:, c0:c1] = (mx + den.log()).view(hq, -1)
            sc = p.sum(1)  # [H, i, m] pooled over the group's G heads
            if block_keys is not None:
                blk = torch.zeros(h, c1 - c0, nblk, dtype=torch.float32, device=q.device)
                sc = blk.index_add_(2, cell_blk, sc[:, :, cell_key])
            kk = min(topk, nblk)
            block_idx[:, c0:c1, :kk] = _top_blocks(sc, kk)
    return _gated(o, q.dtype, gate, out), lse if return_lse else None, block_idx


# ------------------------------------------------------------------------------------------------
# autotune: rows = BLOCK_Q tokens x G heads of one KV head; BLOCK_K compressed keys (CELLS-aligned)


def _configs():
    return [
        triton.Config({"BLOCK_R": r, "BLOCK_K": kb}, num_warps=w, num_stages=s)
        for r, kb, w, s in [
            (64, 64, 4, 2),
            (64, 64, 2, 2),
            (128, 64, 4, 2),
            (128, 64, 8, 2),
            (64, 128, 4, 2),
            (32, 64, 2, 2),
        ]
    ]


def _smem(config, head_dim: int) -> int:
    """Shared memory a config needs (bytes, an upper estimate; bench/archs.py checks it against the compiled
    kernels): num_stages K and V tiles of the pipelined loop plus the q tile and the p tile of the second dot."""
    r, kb = config.kwargs["BLOCK_R"], config.kwargs["BLOCK_K"]
    return 2 * (config.num_stages * 2 * kb * head_dim + r * head_dim + r * kb)


def _prune(configs, named_args, **kwargs):
    def arg(name, default=None):
        return kwargs.get(name, named_args.get(name, default))

    cells, g = arg("CELLS", 1), arg("G", 1)
    kept = [c for c in configs if c.kwargs["BLOCK_K"] >= cells and c.kwargs["BLOCK_R"] >= g] or configs[:1]
    return _fitting(kept, lambda c: _smem(c, arg("HEAD_DIM")), _smem_limit(arg("q").device))


@triton.jit
def _key_rows(blk_keys, blk_start, k_start, n_slot, o_k, CELLS: tl.constexpr, HAS_BLOCK_KEYS: tl.constexpr):
    """Global compressed-key rows of a sample's key slots `o_k` [BLOCK_K] (-1 past the sample's `n_slot` slots
    and in a block's unused cells): the v1.0 block table, or the sample's consecutive keys (v1.1)."""
    if HAS_BLOCK_KEYS:
        o_row = tl.load(blk_keys + blk_start * CELLS + o_k, mask=o_k < n_slot, other=-1)
    else:
        o_row = tl.where(o_k < n_slot, k_start + o_k, -1)
    return o_row


@triton.jit
def _score_step(b_s, b_v, b_lse2, scale_log2, b_acc, p_sc, blk0, n_blk, m_tq, G: tl.constexpr, CELLS: tl.constexpr):
    """Pass 2 over one tile of raw logits: p = exp2(c s - lse2), acc += p v, and the tile's block scores (p pooled
    over the G heads of each token, then over each block's CELLS keys) stored at p_sc's blocks blk0... -> acc."""
    BLOCK_Q: tl.constexpr = b_s.shape[0] // G
    BLOCK_K: tl.constexpr = b_s.shape[1]
    NB: tl.constexpr = BLOCK_K // CELLS
    b_p = tl.exp2(b_s * scale_log2 - b_lse2[:, None])  # [BLOCK_R, BLOCK_K]
    b_acc += tl.dot(b_p.to(b_v.dtype), b_v)
    b_sc = tl.sum(tl.reshape(b_p, [BLOCK_Q, G, BLOCK_K]), 1)  # fp32 [BLOCK_Q, BLOCK_K]
    if CELLS > 1:
        b_sc = tl.sum(tl.reshape(b_sc, [BLOCK_Q, NB, CELLS]), 2)
    o_blk = blk0 + tl.arange(0, NB)
    tl.store(p_sc + o_blk[None, :], b_sc, mask=m_tq[:, None] & (o_blk < n_blk)[None, :])
    return b_acc


@triton.jit
def _cmp_attn_topk_kernel(
    q,
    ck,
    cv,
    o,
    lse,
    sc,
    cu_q,
    cu_k,
    cu_blk,
    blk_keys,
    gate,
    scale_log2,
    q_lo,
    q_hi,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_on,
    stride_oh,
    stride_lh,
    stride_sh,
    stride_sb,
    stride_sn,
    stride_g,
    tune_rows,  # autotune key only (size class, `tune_size`); unused in the body
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CELLS: tl.constexpr,
    HAS_BLOCK_KEYS: tl.constexpr,
    HAS_GATE: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    STORE_LSE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # q [N, HQ, D]; ck/cv [M, H, D]; o [N, HQ, D]; lse [HQ, N] fp32; sc [H, B, q_hi - q_lo, >= blocks] fp32;
    # cu_q/cu_k/cu_blk [B+1] int32; blk_keys [NB, CELLS] int32 (when HAS_BLOCK_KEYS); gate [N] (stride_g).
    # This launch covers the tokens [q_lo, q_hi) of every sample (local indices).
    BLOCK_Q: tl.constexpr = BLOCK_R // G
    i_q, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_q + i_b)
    q_end = tl.minimum(tl.load(cu_q + i_b + 1) - q_start, q_hi)  # local end of this launch's tokens
    t0 = q_lo + i_q * BLOCK_Q
    if t0 >= q_end:
        return
    k_start = tl.load(cu_k + i_b)
    if HAS_BLOCK_KEYS:
        blk_start = tl.load(cu_blk + i_b)
        n_blk = tl.load(cu_blk + i_b + 1) - blk_start
    else:
        blk_start = k_start
        n_blk = tl.load(cu_k + i_b + 1) - k_start
    n_slot = n_blk * CELLS

    o_r = tl.arange(0, BLOCK_R)
    o_t = t0 + o_r // G  # token of each row, within the sample
    o_hq = i_h * G + o_r % G  # query head of each row
    m_r = o_t < q_end
    o_d = tl.arange(0, HEAD_DIM)
    p_q = q + (q_start + o_t)[:, None].to(tl.int64) * stride_qn + o_hq[:, None] * stride_qh + o_d[None, :]
    # [BLOCK_R, HEAD_DIM]
    b_q = tl.load(p_q, mask=m_r[:, None], other=0.0)
    if UPCAST:  # the interpreter's tl.dot mishandles bf16; CPU tests run the same math in fp32 tiles
        b_q = b_q.to(tl.float32)

    # Logits stay raw q . k: the scale goes into one FMA with the max or lse subtracted (c max(s) = max(c s) as
    # c > 0). The key tiles inside a v1.1 sample's consecutive keys need no mask; only the last, partial one
    # (and every v1.0 tile, whose blocks have unused cells) is masked.
    n_full = 0 if HAS_BLOCK_KEYS else n_slot // BLOCK_K * BLOCK_K
    o_kb = tl.arange(0, BLOCK_K)

    # pass 1: row max and sum of exp2 -> lse2
    b_m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, n_full, BLOCK_K):
        b_k = _load_k_tile(ck, k_start + k0 + o_kb, None, i_h, stride_kn, stride_kh, o_d, UPCAST)
        b_m, b_l, _, _ = _softmax_step(tl.dot(b_q, b_k), b_m, b_l, scale_log2)
    for k0 in range(n_full, n_slot, BLOCK_K):
        o_row = _key_rows(blk_keys, blk_start, k_start, n_slot, k0 + o_kb, CELLS, HAS_BLOCK_KEYS)
        m_k = o_row >= 0
        b_k = _load_k_tile(ck, o_row, m_k, i_h, stride_kn, stride_kh, o_d, UPCAST)  # [HEAD_DIM, BLOCK_K]
        b_s = tl.where(m_k[None, :], tl.dot(b_q, b_k), float("-inf"))  # [BLOCK_R, BLOCK_K]
        b_m, b_l, _, _ = _softmax_step(b_s, b_m, b_l, scale_log2)
    b_lse2 = b_m * scale_log2 + tl.log2(b_l)  # -inf for a sample without keys

    # pass 2: normalised output and the block scores, written for kernels/ssa_topk.py
    o_tq = t0 + tl.arange(0, BLOCK_Q)
    m_tq = o_tq < q_end
    p_sc = sc + i_h * stride_sh + i_b * stride_sb + (o_tq - q_lo)[:, None].to(tl.int64) * stride_sn
    b_acc = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
    for k0 in range(0, n_full, BLOCK_K):
        o_row = k_start + k0 + o_kb
        b_s = tl.dot(b_q, _load_k_tile(ck, o_row, None, i_h, stride_kn, stride_kh, o_d, UPCAST))
        b_v = _load_v_tile(cv, o_row, None, i_h, stride_vn, stride_vh, o_d, UPCAST)
        b_acc = _score_step(b_s, b_v, b_lse2, scale_log2, b_acc, p_sc, k0 // CELLS, n_blk, m_tq, G, CELLS)
    for k0 in range(n_full, n_slot, BLOCK_K):
        o_row = _key_rows(blk_keys, blk_start, k_start, n_slot, k0 + o_kb, CELLS, HAS_BLOCK_KEYS)
        m_k = o_row >= 0
        b_k = _load_k_tile(ck, o_row, m_k, i_h, stride_kn, stride_kh, o_d, UPCAST)
        b_s = tl.where(m_k[None, :], tl.dot(b_q, b_k), float("-inf"))
        b_v = _load_v_tile(cv, o_row, m_k, i_h, stride_vn, stride_vh, o_d, UPCAST)  # [BLOCK_K, HEAD_DIM]
        b_acc = _score_step(b_s, b_v, b_lse2, scale_log2, b_acc, p_sc, k0 // CELLS, n_blk, m_tq, G, CELLS)

    # the SSA gate of this branch, fused: o = g * o_cmp (+ o when accumulating)
    _store_gated(
        o + (q_start + o_t)[:, None].to(tl.int64) * stride_on + o_hq[:, None] * stride_oh + o_d[None, :],
        b_acc,
        m_r,
        gate + (q_start + o_t).to(tl.int64) * stride_g,
        HAS_GATE,
        ACCUMULATE,
    )
    if STORE_LSE:
        tl.store(lse + o_hq.to(tl.int64) * stride_lh + q_start + o_t, b_lse2 * 0.6931471805599453, mask=m_r)


# restore_value: benchmarking a config must not add into `o` when the kernel accumulates into it
_cmp_attn_topk_tuned = _autotune(
    _configs(),
    key=["G", "HEAD_DIM", "CELLS", "tune_rows"],
    restore_value=["o"],
    prune_configs_by={"early_config_prune": _prune},
)(_cmp_attn_topk_kernel)


def _ssa_compressed_attention_triton(
    q,
    ck,
    cv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q: int,
    topk: int,
    block_keys=None,
    cu_blocks=None,
    scale: float | None = None,
    gate=None,
    out=None,
    return_lse: bool = True,
):
    n, hq, d = q.shape
    h = ck.shape[1]
    g = _check_heads(q, ck, cv)
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    cells = 1 if block_keys is None else block_keys.shape[1]
    assert cells & (cells - 1) == 0, "cells per block must be a power of two"
    b = cu_seqlens_q.numel() - 1
    if out is not None:
        assert out.shape == q.shape and out.stride(2) == 1
    o = torch.empty_like(q) if out is None else out
    lse = torch.empty(hq, n if return_lse else 1, dtype=torch.float32, device=q.device)
    bidx = torch.empty(h, n, topk, dtype=torch.int32, device=q.device)
    if n == 0:
        return o, lse if return_lse else None, bidx
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    assert scale > 0, "the kernels take the max of raw logits (softmax_step): scale must be positive"
    has_bk = block_keys is not None
    if has_bk:
        assert block_keys.dtype == torch.int32 and block_keys.is_contiguous() and cu_blocks.dtype == torch.int32
    # block scores go through a scratch [H, B, rows, blocks] of at most SCORE_BYTES: the whole score matrix
    # [H, N, M] would be ~0.7 GB at the 1024 stage, so the tokens are done in launches of `rows`
    n_blocks = block_keys.shape[0] if has_bk else ck.shape[0]  # bounds every sample's blocks, no sync
    width = max(1, n_blocks)
    rows = min(score_rows(h, b, width), max_seqlen_q)
    sc = torch.empty(h, b, rows, width, dtype=torch.float32, device=q.device)
    cu_blk = cu_blocks if has_bk else cu_seqlens_k
    args = dict(
        q=q,
        ck=ck,
        cv=cv,
        o=o,
        lse=lse,
        sc=sc,
        cu_q=cu_seqlens_q,
        cu_k=cu_seqlens_k,
        cu_blk=cu_blk,
        blk_keys=block_keys if has_bk else cu_seqlens_k,
        gate=q if gate is None else gate,
        stride_g=0 if gate is None else gate.stride(0),
        tune_rows=_tune_size(q.shape[0]),
        scale_log2=scale * _LOG2E,
        stride_qn=q.stride(0),
        stride_qh=q.stride(1),
        stride_kn=ck.stride(0),
        stride_kh=ck.stride(1),
        stride_vn=cv.stride(0),
        stride_vh=cv.stride(1),
        stride_on=o.stride(0),
        stride_oh=o.stride(1),
        stride_lh=lse.stride(0),
        stride_sh=sc.stride(0),
        stride_sb=sc.stride(1),
        stride_sn=sc.stride(2),
        G=g,
        HEAD_DIM=d,
        CELLS=cells,
        HAS_BLOCK_KEYS=has_bk,
        HAS_GATE=gate is not None,
        ACCUMULATE=out is not None,
        STORE_LSE=return_lse,
        UPCAST=not q.is_cuda and q.dtype == torch.bfloat16,
    )
    for q_lo in range(0, max_seqlen_q, rows):
        q_hi = q_lo + rows

        def grid(meta):
            return (triton.cdiv(rows, meta["BLOCK_R"] // g), b, h)

        if q.is_cuda:
            _cmp_attn_topk_tuned[grid](**args, q_lo=q_lo, q_hi=q_hi)
        else:  # TRITON_INTERPRET=1 on CPU tensors: one small fixed tile
            _cmp_attn_topk_kernel[grid](**args, q_lo=q_lo, q_hi=q_hi, BLOCK_R=max(16, g), BLOCK_K=max(16, cells))
        _block_topk(sc, cu_seqlens_q, cu_blk, q_lo, topk, bidx, backend="triton")
    return o, lse if return_lse else None, bidx


def ssa_compressed_attention(
    q,
    ck,
    cv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q: int,
    topk: int,
    block_keys=None,
    cu_blocks=None,
    scale: float | None = None,
    gate=None,
    out=None,
    return_lse: bool = True,
    backend: str = "auto",
):
    """Compressed attention + lse + top-k selection blocks: -> (o [N,HQ,D], lse [HQ,N] fp32, block_idx [H,N,topk]).

    gate [N] (any stride): return gate * o instead of o (the SSA gate, fused); out [N,HQ,D]: add the result into
    it in place and return it; return_lse=False skips the lse (returns None).
    backend: "auto" (Triton on CUDA for fp16/bf16 when installed, the reference elsewhere), "triton" (also on CPU with
    TRITON_INTERPRET=1) or "reference".
    """
    fn = _ssa_compressed_attention_triton if _use_triton(backend, q) else ssa_compressed_attention_reference
    return fn(
        q, ck, cv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, topk, block_keys, cu_blocks, scale, gate, out, return_lse
    )
