"""Selected-block attention: each query attends to the tokens of its top-k selection blocks (SSA, SPARSE.md §6.5).

For query token i of sample b, KV head kh = h // G and its blocks block_idx[kh, i, :] (local indices among the
sample's occupied selection blocks, -1 = unused slot):

    K_sel(i, kh) = U_{j : block_idx[kh,i,j] >= 0} rows cu_block_tokens[cu_blocks[b] + block_idx[kh,i,j]] ..
                                                    cu_block_tokens[cu_blocks[b] + block_idx[kh,i,j] + 1]
    o[i,h] = softmax_{t in K_sel}(scale * q[i,h] . k[t,kh]) v[t,kh]        (one joint softmax over all blocks)

The original runs one query per program ([G, D] tiles, K/V refetched for every query). Here a program owns
BLOCK_Q consecutive query tokens x the G heads of one KV head. Tokens are block-sorted, so neighbours usually
choose (nearly) the same blocks: the program walks the *union* of its tokens' blocks in ascending order once,
sharing every K/V tile across all BLOCK_Q*G rows and masking rows whose token did not pick the block. When the
union is larger than UNION_MAX blocks (dissimilar choices would waste work) it falls back to one token at a
time, [max(16, G), D] rows, like the original. The result is the same either way.

Layouts: q [N, HQ, D], k/v [N, H, D] (fp16/bf16; the same rows as q, self-attention), block_idx [H, N, TOPK]
int32, cu_seqlens [B+1] int32, cu_blocks [B+1] int32 (blocks of each sample), cu_block_tokens [NB+1] int32
(token rows of every block, samples concatenated); out o [N, HQ, D] in q.dtype;
optional gate [N] (any stride) and out: `out += gate * o` in place (the SSA gated sum, fused). A query with
no blocks gets 0.
Constraints: tokens of a block contiguous (block-sorted order, §6.8); HQ % H == 0, G a power of two; D a power
of two >= 16.
"""

from __future__ import annotations

import math

import torch

from ._common import LOG2E as _LOG2E
from ._common import attend_finish as _attend_finish
from ._common import attend_step as _attend_step
from ._common import check_heads as _check_heads
from ._common import chunk_rows as _chunk_rows
from ._common import fitting as _fitting
from ._common import gated as _gated
from ._common import load_k_tile as _load_k_tile
from ._common import load_v_tile as _load_v_tile
from ._common import smem_limit as _smem_limit
from ._common import store_gated as _store_gated
from ._common import tl, triton  # Triton, or stand-ins that let this module import without it (see _common)
from ._common import use_triton as _use_triton
from .tuning import autotune as _autotune
from .tuning import tune_size as _tune_size

__all__ = ["ssa_selection_attention", "ssa_selection_attention_reference"]


def ssa_selection_attention_reference(
    q,
    k,
    v,
    block_idx,
    cu_seqlens,
    cu_blocks,
    cu_block_tokens,
    max_seqlen: int,
    scale: float | None = None,
    gate=None,
    out=None,
):
    """Plain PyTorch, fp32 inside: every (query, KV head) gathers the tokens of its selected blocks (distinct,
    as top-k gives them), padded to the longest selection of its chunk, and takes one masked softmax over them.
    Chunks of queries keep the gathered keys within the working-set bound (`_common.CHUNK_ELEMENTS`): no
    [N, N] score matrix, so it is the fallback when Triton is missing."""
    n, hq, d = q.shape
    h = k.shape[1]
    g = hq // h
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    o = torch.zeros(n, hq, d, dtype=torch.float32, device=q.device)
    if n == 0 or block_idx.shape[2] == 0:
        return _gated(o, q.dtype, gate, out)
    first_tok = cu_block_tokens[:-1].long()
    sample = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(n, device=q.device), right=True)  # [N]
    chosen = block_idx >= 0  # [H, N, K]
    blk = torch.where(chosen, block_idx.long() + cu_blocks.long()[sample][None, :, None], 0)  # global block ids
    sel_len = torch.where(chosen, cu_block_tokens[1:].long()[blk] - first_tok[blk], 0)  # [H, N, K] tokens
    sel_end = sel_len.cumsum(-1)  # a query's selected tokens, concatenated slot by slot: slot j ends at sel_end[j]
    total = sel_end[..., -1]  # [H, N]
    heads = torch.arange(h, device=q.device)[:, None, None]
    step = _chunk_rows(int(total.max()) * h * (2 * d + 2 * g + 2))  # gathered k, v, scores, probabilities, rows
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        width = int(total[:, c0:c1].max())
        if width == 0:
            continue
        pos = torch.arange(width, device=q.device).expand(h, c1 - c0, width).contiguous()  # [H, i, T]
        slot = torch.searchsorted(sel_end[:, c0:c1].contiguous(), pos, right=True).clamp_(max=block_idx.shape[2] - 1)
        start = (sel_end - sel_len)[:, c0:c1].gather(2, slot)  # where each position's slot starts
        valid = pos < total[:, c0:c1, None]
        rows = torch.where(valid, first_tok[blk[:, c0:c1].gather(2, slot)] + pos - start, 0)  # [H, i, T]
        s = torch.einsum("ihgd,hitd->hgit", q[c0:c1].float().view(-1, h, g, d), k[rows, heads].float()) * scale
        s.masked_fill_(~valid[:, None], float("-inf"))
        p = torch.softmax(s, -1).nan_to_num_(0.0)  # [H, G, i, T]; a query without blocks -> 0
        o[c0:c1] = torch.einsum("hgit,hitd->ihgd", p, v[rows, heads].float()).reshape(-1, hq, d)
    return _gated(o, q.dtype, gate, out)


def _configs():
    return [
        triton.Config({"BLOCK_R": r, "BLOCK_K": kb}, num_warps=w, num_stages=s)
        for r, kb, w, s in [
            (32, 64, 2, 2),
            (32, 64, 2, 3),
            (32, 32, 2, 2),
            (64, 64, 2, 2),
            (64, 64, 4, 2),
            (32, 64, 1, 2),
        ]
    ]


def _smem(config, head_dim: int) -> int:
    """Shared memory a config needs (bytes, an upper estimate; bench/archs.py checks it against the compiled
    kernels): num_stages K and V tiles plus the q tile and the p tile of the second dot."""
    r, kb = config.kwargs["BLOCK_R"], config.kwargs["BLOCK_K"]
    return 2 * (config.num_stages * 2 * kb * head_dim + r * head_dim + r * kb)


def _prune(configs, named_args, **kwargs):
    def arg(name, default=None):
        return kwargs.get(name, named_args.get(name, default))

    kept = [c for c in configs if c.kwargs["BLOCK_R"] >= arg("G", 1)] or configs[:1]
    return _fitting(kept, lambda c: _smem(c, arg("HEAD_DIM")), _smem_limit(arg("q").device))


@triton.jit
def _selection_kernel(
    q,
    k,
    v,
    o,
    bidx,
    cu_q,
    cu_blk,
    cu_blk_tok,
    gate,
    scale_log2,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_on,
    stride_oh,
    stride_bh,
    stride_bn,
    stride_g,
    tune_rows,  # autotune key only (size class, `tune_size`); unused in the body
    G: tl.constexpr,
    GP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    TOPK: tl.constexpr,
    TOPK_P: tl.constexpr,
    UNION_MAX: tl.constexpr,
    HAS_GATE: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # q [N, HQ, D]; k/v [N, H, D]; o [N, HQ, D]; bidx [H, N, TOPK] int32; cu_q/cu_blk [B+1]; cu_blk_tok [NB+1]
    BLOCK_Q: tl.constexpr = BLOCK_R // G
    BIG: tl.constexpr = 2147483647
    i_q, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_q + i_b)
    q_len = tl.load(cu_q + i_b + 1) - q_start
    if i_q * BLOCK_Q >= q_len:
        return
    blk_start = tl.load(cu_blk + i_b)
    o_d = tl.arange(0, HEAD_DIM)
    o_tk = tl.arange(0, TOPK_P)
    o_kk = tl.arange(0, BLOCK_K)

    o_r = tl.arange(0, BLOCK_R)
    o_t = i_q * BLOCK_Q + o_r // G
    o_hq = i_h * G + o_r % G
    m_r = o_t < q_len
    # [BLOCK_R, TOPK_P] block choices of each row's token (BIG = none)
    b_idx = tl.load(
        bidx + i_h * stride_bh + (q_start + o_t)[:, None].to(tl.int64) * stride_bn + o_tk[None, :],
        mask=m_r[:, None] & (o_tk[None, :] < TOPK),
        other=-1,
    )
    b_idx = tl.where(b_idx < 0, BIG, b_idx)
    n_union = 0
    cur = tl.min(tl.min(b_idx, 1), 0)
    while cur < BIG:
        n_union += 1
        cur = tl.min(tl.min(tl.where(b_idx > cur, b_idx, BIG), 1), 0)

    if n_union <= UNION_MAX:
        # shared walk over the union of the tile's blocks
        # [BLOCK_R, HEAD_DIM]
        b_q = tl.load(
            q + (q_start + o_t)[:, None].to(tl.int64) * stride_qn + o_hq[:, None] * stride_qh + o_d[None, :],
            mask=m_r[:, None],
            other=0.0,
        )
        if UPCAST:  # the interpreter's tl.dot mishandles bf16; CPU tests run the same math in fp32 tiles
            b_q = b_q.to(tl.float32)
        b_m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        b_l = tl.zeros([BLOCK_R], tl.float32)
        b_acc = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
        cur = tl.min(tl.min(b_idx, 1), 0)
        while cur < BIG:
            m_hit = tl.max((b_idx == cur).to(tl.int32), 1) > 0  # [BLOCK_R]
            t0 = tl.load(cu_blk_tok + blk_start + cur)
            t1 = tl.load(cu_blk_tok + blk_start + cur + 1)
            for k0 in range(t0, t1, BLOCK_K):
                o_k = k0 + o_kk
                m_k = o_k < t1
                b_k = _load_k_tile(k, o_k, m_k, i_h, stride_kn, stride_kh, o_d, UPCAST)  # [HEAD_DIM, BLOCK_K]
                b_v = _load_v_tile(v, o_k, m_k, i_h, stride_vn, stride_vh, o_d, UPCAST)  # [BLOCK_K, HEAD_DIM]
                # [BLOCK_R, BLOCK_K]
                b_s = tl.dot(b_q, b_k)
                # rows whose token did not pick this block are masked whole (-inf), so a row's first tiles
                # may be empty: softmax_step keeps them at 0
                b_s = tl.where(m_hit[:, None] & m_k[None, :], b_s, float("-inf"))
                b_m, b_l, b_acc = _attend_step(b_s, b_v, b_m, b_l, b_acc, scale_log2)
            cur = tl.min(tl.min(tl.where(b_idx > cur, b_idx, BIG), 1), 0)
        b_acc = _attend_finish(b_acc, b_l)  # a token without blocks gets 0
        # the SSA gate of this branch, fused
        _store_gated(
            o + (q_start + o_t)[:, None].to(tl.int64) * stride_on + o_hq[:, None] * stride_oh + o_d[None, :],
            b_acc,
            m_r,
            gate + (q_start + o_t).to(tl.int64) * stride_g,
            HAS_GATE,
            ACCUMULATE,
        )
    else:
        # one token at a time: rows = the G heads (padded to GP >= 16 for tl.dot)
        o_g = tl.arange(0, GP)
        m_g = o_g < G
        for t in range(0, BLOCK_Q):
            i_t = i_q * BLOCK_Q + t
            if i_t < q_len:
                row = (q_start + i_t).to(tl.int64)
                # [GP, HEAD_DIM]
                b_q = tl.load(
                    q + row * stride_qn + (i_h * G + o_g)[:, None] * stride_qh + o_d[None, :],
                    mask=m_g[:, None],
                    other=0.0,
                )
                if UPCAST:
                    b_q = b_q.to(tl.float32)
                b_m = tl.full([GP], float("-inf"), tl.float32)
                b_l = tl.zeros([GP], tl.float32)
                b_acc = tl.zeros([GP, HEAD_DIM], tl.float32)
                for j in range(0, TOPK):
                    blk = tl.load(bidx + i_h * stride_bh + row * stride_bn + j)
                    if blk >= 0:
                        t0 = tl.load(cu_blk_tok + blk_start + blk)
                        t1 = tl.load(cu_blk_tok + blk_start + blk + 1)
                        for k0 in range(t0, t1, BLOCK_K):
                            o_k = k0 + o_kk
                            m_k = o_k < t1
                            b_k = _load_k_tile(k, o_k, m_k, i_h, stride_kn, stride_kh, o_d, UPCAST)
                            b_v = _load_v_tile(v, o_k, m_k, i_h, stride_vn, stride_vh, o_d, UPCAST)
                            # [GP, BLOCK_K]
                            b_s = tl.dot(b_q, b_k)
                            b_s = tl.where(m_k[None, :], b_s, float("-inf"))
                            b_m, b_l, b_acc = _attend_step(b_s, b_v, b_m, b_l, b_acc, scale_log2)
                b_acc = _attend_finish(b_acc, b_l)
                # every row reads the token's one gate value
                _store_gated(
                    o + row * stride_on + (i_h * G + o_g)[:, None] * stride_oh + o_d[None, :],
                    b_acc,
                    m_g,
                    gate + row * stride_g + o_g * 0,
                    HAS_GATE,
                    ACCUMULATE,
                )


# restore_value: benchmarking a config must not add into `o` (the kernel accumulates into it)
_selection_tuned = _autotune(
    _configs(),
    key=["G", "HEAD_DIM", "TOPK", "tune_rows"],
    restore_value=["o"],
    prune_configs_by={"early_config_prune": _prune},
)(_selection_kernel)


def _ssa_selection_attention_triton(
    q,
    k,
    v,
    block_idx,
    cu_seqlens,
    cu_blocks,
    cu_block_tokens,
    max_seqlen: int,
    scale: float | None = None,
    gate=None,
    out=None,
    union_max: int | None = None,
):
    n, hq, d = q.shape
    h = k.shape[1]
    g = _check_heads(q, k, v)
    assert k.shape[0] == n and v.shape == k.shape, "selection attention is self-attention: k/v rows = q rows"
    assert block_idx.dtype == torch.int32 and block_idx.shape[:2] == (h, n) and block_idx.stride(2) == 1
    topk = block_idx.shape[2]
    if out is not None:
        assert out.shape == q.shape and out.stride(2) == 1
    o = torch.empty_like(q) if out is None else out
    if n == 0:
        return o
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    assert scale > 0, "the kernels take the max of raw logits (softmax_step): scale must be positive"
    args = dict(
        q=q,
        k=k,
        v=v,
        o=o,
        bidx=block_idx,
        cu_q=cu_seqlens,
        cu_blk=cu_blocks,
        cu_blk_tok=cu_block_tokens,
        gate=q if gate is None else gate,
        stride_g=0 if gate is None else gate.stride(0),
        tune_rows=_tune_size(q.shape[0]),
        HAS_GATE=gate is not None,
        ACCUMULATE=out is not None,
        scale_log2=scale * _LOG2E,
        stride_qn=q.stride(0),
        stride_qh=q.stride(1),
        stride_kn=k.stride(0),
        stride_kh=k.stride(1),
        stride_vn=v.stride(0),
        stride_vh=v.stride(1),
        stride_on=o.stride(0),
        stride_oh=o.stride(1),
        stride_bh=block_idx.stride(0),
        stride_bn=block_idx.stride(1),
        G=g,
        GP=max(16, g),
        HEAD_DIM=d,
        TOPK=topk,
        TOPK_P=max(2, triton.next_power_of_2(topk)),
        UNION_MAX=2 * topk if union_max is None else union_max,
        UPCAST=not q.is_cuda and q.dtype == torch.bfloat16,
    )

    def grid(meta):
        return (triton.cdiv(max_seqlen, meta["BLOCK_R"] // g), cu_seqlens.numel() - 1, h)

    if q.is_cuda and union_max is None:
        _selection_tuned[grid](**args)
    else:  # interpreter (or a forced union limit in tests): one fixed tile
        _selection_kernel[grid](**args, BLOCK_R=max(16, 2 * g), BLOCK_K=16)
    return o


def ssa_selection_attention(
    q,
    k,
    v,
    block_idx,
    cu_seqlens,
    cu_blocks,
    cu_block_tokens,
    max_seqlen: int,
    scale: float | None = None,
    gate=None,
    out=None,
    backend: str = "auto",
):
    """Attention of every query to the tokens of its selected blocks -> o [N, HQ, D] (see module doc).

    gate [N] (any stride): return gate * o (the SSA gate, fused); out [N,HQ,D]: add into it in place, return it.
    backend: "auto" (Triton on CUDA for fp16/bf16 when installed, the reference elsewhere), "triton" (also on CPU with
    TRITON_INTERPRET=1) or "reference".
    """
    if _use_triton(backend, q):
        return _ssa_selection_attention_triton(
            q, k, v, block_idx, cu_seqlens, cu_blocks, cu_block_tokens, max_seqlen, scale, gate, out
        )
    return ssa_selection_attention_reference(
        q, k, v, block_idx, cu_seqlens, cu_blocks, cu_block_tokens, max_seqlen, scale, gate, out
    )
