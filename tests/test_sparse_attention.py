"""Sparse attention helpers (s2core/sparse/attention.py) vs per-sequence loops in fp32.

Tolerance: fp32 inputs, SDPA vs einsum+softmax differ only by summation order -> 1e-5 abs.
"""

import math

import pytest
import torch

from s2core.sparse.attention import (
    sparse_cross_attention,
    varlen_attention,
    window_plan,
    windowed_self_attention,
    windowed_self_attention_reference,
)
from s2core.sparse.coords import window_keys


def _ref_attn(q, k, v, scale=None):
    """q [n,H,D], k/v [m,Hk,D] -> [n,H,D], fp32, GQA h -> h // G."""
    h, hk = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // hk, 1)
    v = v.repeat_interleave(h // hk, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) * scale, -1)
    return torch.einsum("hqk,khd->qhd", att, v)


@pytest.mark.parametrize(
    "lens_q,lens_k,h,hk",
    [([5, 1, 7], [3, 4, 9], 4, 4), ([2, 6], [6, 2], 4, 2), ([1], [1], 2, 1), ([3, 4], [0, 5], 2, 2)],
    ids=["B3-H4-Hk4", "B2-H4-Hk2-gqa", "B1-single", "B2-emptykeys"],
)
def test_varlen_attention_matches_per_sequence_loop(lens_q, lens_k, h, hk):
    g = torch.Generator().manual_seed(0)
    d = 8
    q = torch.randn(sum(lens_q), h, d, generator=g)
    k = torch.randn(sum(lens_k), hk, d, generator=g)
    v = torch.randn(sum(lens_k), hk, d, generator=g)
    cq = torch.tensor([0] + lens_q).cumsum(0)
    ck = torch.tensor([0] + lens_k).cumsum(0)
    out = varlen_attention(q, k, v, cq.int(), ck.int(), max(lens_q), max(lens_k))  # int32, as flash-attn
    for b in range(len(lens_q)):
        o = out[cq[b] : cq[b + 1]]
        if lens_k[b] == 0:
            assert torch.equal(o, torch.zeros_like(o))
        else:
            ref = _ref_attn(q[cq[b] : cq[b + 1]], k[ck[b] : ck[b + 1]], v[ck[b] : ck[b + 1]])
            torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)


def test_varlen_attention_empty():
    q = torch.zeros(0, 2, 4)
    out = varlen_attention(q, q, q, torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), 0, 0)
    assert out.shape == (0, 2, 4)


@pytest.mark.parametrize("lens,max_q", [([4, 9, 2], 9), ([4, 9, 2], None), ([6], None)], ids=["B3", "B3-sync", "B1"])
def test_sparse_cross_attention(lens, max_q):
    g = torch.Generator().manual_seed(1)
    b, L, h, hk, d = len(lens), 5, 4, 2, 8
    q = torch.randn(sum(lens), h, d, generator=g)
    k = torch.randn(b, L, hk, d, generator=g)
    v = torch.randn(b, L, hk, d, generator=g)
    off = torch.tensor([0] + lens).cumsum(0)
    out = sparse_cross_attention(q, k, v, off, max_q)
    for i in range(b):
        torch.testing.assert_close(
            out[off[i] : off[i + 1]], _ref_attn(q[off[i] : off[i + 1]], k[i], v[i]), atol=1e-5, rtol=1e-5
        )


def _random_coords(g, b, n, r):
    rows = []
    for i in range(b):
        flat = torch.randperm(r**3, generator=g)[:n]
        xyz = torch.stack([flat // (r * r), flat // r % r, flat % r], 1)
        rows.append(torch.cat([torch.full((n, 1), i), xyz], 1))
    return torch.cat(rows).int()


@pytest.mark.parametrize("shift", [0, 4])
def test_windowed_attention_matches_loop_over_windows(shift):
    g = torch.Generator().manual_seed(2)
    coords = _random_coords(g, 2, 300, 20)  # windows of very different fill -> several buckets
    qkv = torch.randn(coords.shape[0], 3, 2, 8, generator=g)
    cache = {}
    out = windowed_self_attention(qkv, coords, 8, shift, cache)
    ref = windowed_self_attention_reference(qkv, coords, 8, shift)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert ("window_plan", 8, shift) in cache
    # a second call reuses the plan and agrees
    assert torch.equal(windowed_self_attention(qkv, coords, 8, shift, cache), out)


def test_window_partition_respects_batch_and_shift():
    # two tokens in the same cell of different batch elements never attend to each other
    coords = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 3, 1, 1], [0, 4, 1, 1]], dtype=torch.int32)
    plan = window_plan(coords, 4, 0)
    assert plan.num_windows == 3  # (b0, x<4), (b1), (b0, x>=4)
    k0, k1 = window_keys(coords, 4, 0), window_keys(coords, 4, 1)
    assert k0[0] == k0[2] and k0[2] != k0[3]  # no shift: x=1,3 together, x=4 alone
    assert k1[0] != k1[2] and k1[2] == k1[3]  # shift 1 is added: x+1 puts 3 and 4 together
    assert k0[0] != k0[1] and k1[0] != k1[1]  # batch elements never share a window


@pytest.mark.gpu
def test_windowed_attention_cuda_fp16():
    g = torch.Generator().manual_seed(4)
    coords = _random_coords(g, 2, 900, 24)
    qkv = torch.randn(coords.shape[0], 3, 8, 64, generator=g)
    ref = windowed_self_attention_reference(qkv, coords, 8, 4)
    out = windowed_self_attention(qkv.half().cuda(), coords.cuda(), 8, 4, {})
    torch.testing.assert_close(out.float().cpu(), ref, atol=5e-3, rtol=5e-3)  # fp16 inputs and output
