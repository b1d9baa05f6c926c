"""Attention over ragged sets of sparse tokens, built on torch SDPA (SPARSE.md §4.2, §5.3; risks §10.14).

Public functions (dimension letters: `N` query rows, `M` key rows, `H` query heads, `Hk` key/value heads
with `H % Hk == 0` (query head h reads kv head h // (H // Hk), the flash-attn GQA convention), `D` head
dim, `B` batch elements, `L` dense context length). Softmax scale defaults to 1/sqrt(D), as flash-attn.

    varlen_attention(q [N,H,D], k [M,Hk,D], v [M,Hk,D], cu_seqlens_q [B+1], cu_seqlens_k [B+1],
                     max_q: int, max_k: int, scale=None) -> [N,H,D]
        Sequence b = rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q attending to rows
        cu_seqlens_k[b]:cu_seqlens_k[b+1] of k/v (flash_attn_varlen_func semantics, no causal mask).
        A sequence with no keys gives zeros. No host sync: max_q / max_k are Python ints from the caller.

    sparse_cross_attention(q [N,H,D], k [B,L,Hk,D], v [B,L,Hk,D], offsets [B+1], max_q: int | None = None,
                           scale=None) -> [N,H,D]
        Rows offsets[b]:offsets[b+1] of q (the tokens of batch element b of a SparseTensor) attend to
        the L dense context tokens of element b. Pass `max_q` (tokens in the largest element, a Python
        int) to avoid one host sync; it is not needed when B == 1.

    windowed_self_attention(qkv [N,3,H,D], coords [N,4] int32, window_size: int, shift: int,
                            cache: dict | None = None) -> [N,H,D]
        Full attention inside each non-empty window (b, (x+s)//w, (y+s)//w, (z+s)//w) ("swin" mode of
        the sparse VAE; the shift is added to coordinates, nothing rolls or is masked). The partition
        (`WindowPlan`) is computed once per (coords, window, shift) and memoised in `cache`
        (pass SparseTensor.cache so every layer at the same coordinates reuses it).

How: tokens are gathered into padded [sequences, Lpad, H, D] blocks with a key-padding mask and fed to
`F.scaled_dot_product_attention` (memory-efficient / CPU flash kernels; no [N, N] matrix, no Python loop
over windows or batch elements). Windows are grouped into buckets of similar length (powers of two)
so padding wastes at most 2x; a plan holds, per bucket, the gather index and mask, plus one index that
reads every token's output back from the concatenated bucket outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .coords import window_keys, window_partition

__all__ = [
    "varlen_attention",
    "sparse_cross_attention",
    "windowed_self_attention",
    "WindowPlan",
    "window_plan",
    "padded_attention",
]


def _expand_kv_heads(k: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """[..., Hk, D] -> [..., H, D] so query head h reads kv head h // (H // Hk)."""
    hk = k.shape[-2]
    if hk == num_q_heads:
        return k
    assert num_q_heads % hk == 0, f"{num_q_heads} query heads is not a multiple of {hk} kv heads"
    return k.repeat_interleave(num_q_heads // hk, dim=-2)


def padded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None, scale: float | None = None
) -> torch.Tensor:
    """SDPA over padded sequences: q [S,Lq,H,D], k/v [S,Lk,Hk,D], key_valid [S,Lk] bool -> [S,Lq,H,D]."""
    h = q.shape[2]
    k = _expand_kv_heads(k, h)
    v = _expand_kv_heads(v, h)
    mask = None if key_valid is None else key_valid[:, None, None, :]  # [S, 1, 1, Lk]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )  # [S, H, Lq, D]
    return out.transpose(1, 2)


def _rows_to_padded(cu_seqlens: torch.Tensor, n: int, max_len: int):
    """Sequence id and position of each of the n rows of a cu_seqlens layout (no host sync)."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=cu_seqlens.device), lens, output_size=n)
    pos = torch.arange(n, device=cu_seqlens.device) - cu_seqlens[:-1].long()[seq]
    return seq, pos, lens


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scale: float | None = None,
) -> torch.Tensor:
    """flash_attn_varlen_func without causal masking: q [N,H,D], k/v [M,Hk,D] -> [N,H,D] (see module doc)."""
    n, h, d = q.shape
    b = cu_seqlens_q.numel() - 1
    if n == 0:
        return q.new_zeros(0, h, d)
    if k.shape[0] == 0:
        return q.new_zeros(n, h, d)
    sq, pq, _ = _rows_to_padded(cu_seqlens_q, n, max_q)
    sk, pk, lens_k = _rows_to_padded(cu_seqlens_k, k.shape[0], max_k)
    q_pad = q.new_zeros(b, max_q, h, d)
    q_pad[sq, pq] = q
    k_pad = k.new_zeros(b, max_k, *k.shape[1:])
    k_pad[sk, pk] = k
    v_pad = v.new_zeros(b, max_k, *v.shape[1:])
    v_pad[sk, pk] = v
    key_valid = torch.arange(max_k, device=q.device)[None, :] < lens_k[:, None]  # [B, max_k]
    # a sequence without keys would be all -inf -> NaN; give it one (zero) key instead, output 0
    key_valid[:, 0] |= lens_k == 0
    out = padded_attention(q_pad, k_pad, v_pad, key_valid, scale)  # [B, max_q, H, D]
    return out[sq, pq]


def sparse_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    max_q: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Sparse queries q [N,H,D] (rows offsets[b]:offsets[b+1] belong to element b) attend to the dense
    context k/v [B,L,Hk,D] of their element -> [N,H,D]."""
    n, h, d = q.shape
    b = k.shape[0]
    assert offsets.numel() == b + 1, f"offsets has {offsets.numel() - 1} elements but the context has {b}"
    if n == 0:
        return q.new_zeros(0, h, d)
    if b == 1:  # the pipeline's case: one plain SDPA call, no padding
        return padded_attention(q[None], k, v, None, scale)[0]
    if max_q is None:
        max_q = int((offsets[1:] - offsets[:-1]).max())  # one host sync; pass max_q to avoid it
    sq, pq, _ = _rows_to_padded(offsets, n, max_q)
    q_pad = q.new_zeros(b, max_q, h, d)
    q_pad[sq, pq] = q
    out = padded_attention(q_pad, k, v, None, scale)  # [B, max_q, H, D]
    return out[sq, pq]


# ------------------------------------------------------------------------------------------------
# windowed ("swin") self-attention


@dataclass
class WindowPlan:
    """Padded-bucket layout of the windows of one coordinate set.

    buckets: list of (index [W_b, L_b] int64 rows of the token set (padding points at row 0),
             key_valid [W_b, L_b] bool); every window is in exactly one bucket.
    gather:  [N] int64, position of token n in the concatenation of the flattened bucket outputs.
    num_windows: number of non-empty windows; max_len: tokens in the fullest window.
    """

    buckets: list
    gather: torch.Tensor
    num_windows: int
    max_len: int


def window_plan(coords: torch.Tensor, window_size: int, shift: int = 0) -> WindowPlan:
    """Build the WindowPlan of a coordinate set (a few host syncs: done once per coords, then cached)."""
    device = coords.device
    n = coords.shape[0]
    perm, cu_windows, max_len = window_partition(coords, window_size, shift)
    order = perm.long()  # tokens grouped window-contiguous
    counts = (cu_windows[1:] - cu_windows[:-1]).long()  # [W]
    starts = cu_windows[:-1].long()
    num_windows = counts.numel()
    # bucket b holds windows with 2^(b-1) < count <= 2^b (smallest bucket: count <= 16)
    bucket_of = torch.clamp(torch.ceil(torch.log2(counts.double())).long(), min=4)  # [W]
    buckets, base = [], torch.zeros(num_windows, dtype=torch.int64, device=device)
    flat = 0
    for b in sorted(set(bucket_of.tolist())):
        win = torch.nonzero(bucket_of == b).squeeze(1)  # [W_b]
        size = min(1 << b, -(-max_len // 8) * 8)  # a multiple of 8 keeps SDPA's fused kernels eligible
        pos = torch.arange(size, device=device)
        valid = pos[None, :] < counts[win][:, None]  # [W_b, L_b]
        rows = torch.where(valid, starts[win][:, None] + pos[None, :], 0)
        buckets.append((order[rows], valid))
        base[win] = flat + torch.arange(win.numel(), device=device) * size
        flat += win.numel() * size
    win_of_sorted = torch.repeat_interleave(torch.arange(num_windows, device=device), counts, output_size=n)
    pos_sorted = torch.arange(n, device=device) - starts[win_of_sorted]
    gather = torch.empty(n, dtype=torch.int64, device=device)
    gather[order] = base[win_of_sorted] + pos_sorted
    return WindowPlan(buckets, gather, num_windows, max_len)


def windowed_self_attention(
    qkv: torch.Tensor,
    coords: torch.Tensor,
    window_size: int,
    shift: int = 0,
    cache: dict | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Full attention inside each window: qkv [N,3,H,D] (fused q,k,v) -> [N,H,D] (see module doc)."""
    n, three, h, d = qkv.shape
    assert three == 3, f"qkv must be [N, 3, H, D], got {tuple(qkv.shape)}"
    if n == 0:
        return qkv.new_zeros(0, h, d)
    key = ("window_plan", int(window_size), int(shift))
    plan = cache.get(key) if cache is not None else None
    if plan is None:
        plan = window_plan(coords, window_size, shift)
        if cache is not None:
            cache[key] = plan
    outs = []
    for rows, valid in plan.buckets:  # a handful of length buckets, not windows
        x = qkv[rows]  # [W_b, L_b, 3, H, D]
        o = padded_attention(x[:, :, 0], x[:, :, 1], x[:, :, 2], valid, scale)  # [W_b, L_b, H, D]
        outs.append(o.reshape(-1, h, d))
    return torch.cat(outs, 0)[plan.gather]


def windowed_self_attention_reference(
    qkv: torch.Tensor, coords: torch.Tensor, window_size: int, shift: int = 0, scale: float | None = None
) -> torch.Tensor:
    """Obviously-correct twin for tests: a Python loop over windows, fp32 softmax."""
    n, _, h, d = qkv.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    keys = window_keys(coords, window_size, shift)
    out = torch.zeros(n, h, d, dtype=torch.float32, device=qkv.device)
    for key in torch.unique(keys).tolist():
        idx = torch.nonzero(keys == key).squeeze(1)
        q, k, v = qkv[idx].float().unbind(1)  # [n_w, H, D]
        att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) * scale, dim=-1)
        out[idx] = torch.einsum("hqk,khd->qhd", att, v)
    return out.to(qkv.dtype)
