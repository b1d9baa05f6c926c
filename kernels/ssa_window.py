"""Sparse window attention: full attention inside each occupied 8^3 window (SSA, SPARSE.md §6.6 and §4.2).

Window of token (b, x, y, z) with window size w and shift s: (b, (x+s)//w, (y+s)//w, (z+s)//w) (the shift is
added, nothing rolls or is masked). For the tokens T_w of window w and query head h (KV head kh = h // G):

    o[i,h] = softmax_{t in T_w}(scale * q[i,h] . k[t,kh]) v[t,kh]          for i in T_w

The caller lists the tokens window by window (`perm`, `cu_windows`; the SSA plan takes them from
`s2core.sparse.coords.window_partition`, the partition the VAE's SDPA windows use too); the kernel reads q/k/v
rows through `perm` and writes o rows through it, so nothing is permuted in memory (with block-sorted tokens
and shift 0 the windows are the selection blocks and `perm` is the identity). One program owns a tile of up to
WINDOW_TILE_Q tokens of one window x the G heads of one KV head (rows = tokens x heads, so each K/V tile is
shared by the group); `window_tiles` lists the tiles once per coordinate set.

Layouts: q [N, HQ, D], k/v [N, H, D] (fp16/bf16), perm [N] int32, cu_windows [W+1] int32 (positions in perm),
tiles [T, 2] int32 (window, first position); out o [N, HQ, D] in q.dtype;
optional gate [N] (any stride) and out: `out += gate * o` in place (the SSA gated sum, fused).
Constraints: HQ % H == 0, G a power of two; D a power of two >= 16.
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

__all__ = ["ssa_window_attention", "ssa_window_attention_reference", "window_tiles", "WINDOW_TILE_Q"]

WINDOW_TILE_Q = 8  # query tokens per program (x G heads = 128 rows for G = 16)


def window_tiles(cu_windows: torch.Tensor, tile_q: int = WINDOW_TILE_Q) -> torch.Tensor:
    """[T, 2] int32 (window, first position in perm) of every query tile (one host sync: call once)."""
    lens = (cu_windows[1:] - cu_windows[:-1]).long()
    per = (lens + tile_q - 1) // tile_q
    total = int(per.sum())
    win = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), per, output_size=total)
    first_tile = torch.cumsum(per, 0) - per
    pos = cu_windows[:-1].long()[win] + (torch.arange(total, device=lens.device) - first_tile[win]) * tile_q
    return torch.stack([win, pos], 1).to(torch.int32).contiguous()


def ssa_window_attention_reference(
    q, k, v, perm, cu_windows, max_window: int, tiles=None, scale: float | None = None, gate=None, out=None
):
    """Plain PyTorch, fp32 inside: windows padded to a power-of-two length bucket, one batched softmax per chunk
    of a bucket's windows (chunks within the working-set bound `_common.CHUNK_ELEMENTS`)."""
    n, hq, d = q.shape
    h = k.shape[1]
    g = hq // h
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    o = torch.zeros(n, hq, d, dtype=torch.float32, device=q.device)
    lens = (cu_windows[1:] - cu_windows[:-1]).long()
    if lens.numel() == 0:
        return _gated(o, q.dtype, gate, out)
    bucket = torch.clamp(torch.ceil(torch.log2(lens.clamp(min=1).double())).long(), min=4)
    perm = perm.long()
    for bk in torch.unique(bucket).tolist():
        size = 1 << bk
        pos = torch.arange(size, device=q.device)
        in_bucket = torch.nonzero(bucket == bk).squeeze(1)
        step = _chunk_rows(2 * hq * size * size)  # scores and probabilities of a window
        for w0 in range(0, in_bucket.numel(), step):
            win = in_bucket[w0 : w0 + step]
            valid = pos[None, :] < lens[win][:, None]  # [W, L]
            rows = perm[torch.where(valid, cu_windows[win].long()[:, None] + pos[None, :], 0)]  # [W, L]
            qw = q[rows].float().view(*rows.shape, h, g, d)  # [W, L, H, G, D]
            s = torch.einsum("wihgd,wjhd->whgij", qw, k[rows].float()) * scale
            s.masked_fill_(~valid[:, None, None, None, :], float("-inf"))
            ow = torch.einsum("whgij,wjhd->wihgd", torch.softmax(s, -1), v[rows].float())
            o[rows[valid]] = ow.reshape(*rows.shape, hq, d)[valid]
    return _gated(o, q.dtype, gate, out)


def _configs():
    return [
        triton.Config({"BLOCK_K": kb}, num_warps=w, num_stages=s) for kb, w, s in [(64, 4, 2), (32, 4, 2), (64, 8, 2)]
    ]


def _smem(config, head_dim: int, rows: int) -> int:
    """Shared memory a config needs (bytes, an upper estimate; bench/archs.py checks it against the compiled
    kernels): num_stages K and V tiles plus the q tile and the p tile of the second dot."""
    kb = config.kwargs["BLOCK_K"]
    return 2 * (config.num_stages * 2 * kb * head_dim + rows * head_dim + rows * kb)


def _prune(configs, named_args, **kwargs):
    def arg(name, default=None):
        return kwargs.get(name, named_args.get(name, default))

    rows = arg("TILE_Q") * arg("G")
    return _fitting(configs, lambda c: _smem(c, arg("HEAD_DIM"), rows), _smem_limit(arg("q").device))


@triton.jit
def _window_kernel(
    q,
    k,
    v,
    o,
    perm,
    cu_win,
    tiles,
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
    stride_g,
    tune_rows,  # autotune key only (size class, `tune_size`); unused in the body
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    TILE_Q: tl.constexpr,
    HAS_GATE: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # q [N, HQ, D]; k/v [N, H, D]; o [N, HQ, D]; perm [N] int32; cu_win [W+1] int32; tiles [T, 2] int32
    BLOCK_R: tl.constexpr = TILE_Q * G
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    i_w = tl.load(tiles + 2 * i_t)
    p0 = tl.load(tiles + 2 * i_t + 1)
    w1 = tl.load(cu_win + i_w + 1)
    w0 = tl.load(cu_win + i_w)
    o_r = tl.arange(0, BLOCK_R)
    o_p = p0 + o_r // G
    m_r = o_p < w1
    o_hq = i_h * G + o_r % G
    o_d = tl.arange(0, HEAD_DIM)
    o_tok = tl.load(perm + o_p, mask=m_r, other=0).to(tl.int64)
    # [BLOCK_R, HEAD_DIM]
    b_q = tl.load(
        q + o_tok[:, None] * stride_qn + o_hq[:, None] * stride_qh + o_d[None, :], mask=m_r[:, None], other=0.0
    )
    if UPCAST:  # the interpreter's tl.dot mishandles bf16; CPU tests run the same math in fp32 tiles
        b_q = b_q.to(tl.float32)
    b_m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_R], tl.float32)
    b_acc = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
    for k0 in range(w0, w1, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < w1
        o_kt = tl.load(perm + o_k, mask=m_k, other=0).to(tl.int64)
        b_k = _load_k_tile(k, o_kt, m_k, i_h, stride_kn, stride_kh, o_d, UPCAST)  # [HEAD_DIM, BLOCK_K]
        b_v = _load_v_tile(v, o_kt, m_k, i_h, stride_vn, stride_vh, o_d, UPCAST)  # [BLOCK_K, HEAD_DIM]
        # [BLOCK_R, BLOCK_K]
        b_s = tl.dot(b_q, b_k)
        b_s = tl.where(m_k[None, :], b_s, float("-inf"))
        b_m, b_l, b_acc = _attend_step(b_s, b_v, b_m, b_l, b_acc, scale_log2)
    b_acc = _attend_finish(b_acc, b_l)
    # the SSA gate of this branch, fused
    _store_gated(
        o + o_tok[:, None] * stride_on + o_hq[:, None] * stride_oh + o_d[None, :],
        b_acc,
        m_r,
        gate + o_tok * stride_g,
        HAS_GATE,
        ACCUMULATE,
    )


# restore_value: benchmarking a config must not add into `o` (the kernel accumulates into it)
_window_tuned = _autotune(
    _configs(),
    key=["G", "HEAD_DIM", "tune_rows"],
    restore_value=["o"],
    prune_configs_by={"early_config_prune": _prune},
)(_window_kernel)


def _ssa_window_attention_triton(
    q, k, v, perm, cu_windows, max_window: int, tiles=None, scale: float | None = None, gate=None, out=None
):
    n, hq, d = q.shape
    h = k.shape[1]
    g = _check_heads(q, k, v)
    assert perm.dtype == torch.int32 and cu_windows.dtype == torch.int32
    if out is not None:
        assert out.shape == q.shape and out.stride(2) == 1
    o = torch.empty_like(q) if out is None else out
    if n == 0:
        return o
    if tiles is None:
        tiles = window_tiles(cu_windows, WINDOW_TILE_Q)
    tile_q = WINDOW_TILE_Q if q.is_cuda else max(1, 16 // g)
    if not q.is_cuda and tile_q != WINDOW_TILE_Q:
        tiles = window_tiles(cu_windows, tile_q)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    assert scale > 0, "the kernels take the max of raw logits (softmax_step): scale must be positive"
    assert tile_q * g >= 16, "a tile needs at least 16 rows for tl.dot"
    args = dict(
        q=q,
        k=k,
        v=v,
        o=o,
        perm=perm,
        cu_win=cu_windows,
        tiles=tiles,
        scale_log2=scale * _LOG2E,
        gate=q if gate is None else gate,
        stride_g=0 if gate is None else gate.stride(0),
        tune_rows=_tune_size(q.shape[0]),
        HAS_GATE=gate is not None,
        ACCUMULATE=out is not None,
        stride_qn=q.stride(0),
        stride_qh=q.stride(1),
        stride_kn=k.stride(0),
        stride_kh=k.stride(1),
        stride_vn=v.stride(0),
        stride_vh=v.stride(1),
        stride_on=o.stride(0),
        stride_oh=o.stride(1),
        G=g,
        HEAD_DIM=d,
        TILE_Q=tile_q,
        UPCAST=not q.is_cuda and q.dtype == torch.bfloat16,
    )
    grid = (tiles.shape[0], h)
    if q.is_cuda:
        _window_tuned[grid](**args)
    else:
        _window_kernel[grid](**args, BLOCK_K=16)
    return o


def ssa_window_attention(
    q,
    k,
    v,
    perm,
    cu_windows,
    max_window: int,
    tiles=None,
    scale: float | None = None,
    gate=None,
    out=None,
    backend: str = "auto",
):
    """Full attention inside every window listed by (perm, cu_windows) -> o [N, HQ, D] (see module doc).

    gate [N] (any stride): return gate * o (the SSA gate, fused); out [N,HQ,D]: add into it in place, return it.
    tiles: `window_tiles(cu_windows)`, precomputed once per coordinate set (built here when None).
    backend: "auto" (Triton on CUDA for fp16/bf16 when installed, the reference elsewhere), "triton" (also on CPU with
    TRITON_INTERPRET=1) or "reference".
    """
    if _use_triton(backend, q):
        return _ssa_window_attention_triton(q, k, v, perm, cu_windows, max_window, tiles, scale, gate, out)
    return ssa_window_attention_reference(q, k, v, perm, cu_windows, max_window, tiles, scale, gate, out)
