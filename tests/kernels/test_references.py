"""The PyTorch references as the fallback without Triton: correct against a loop-per-query form, and the
same whatever their chunking (`_common.CHUNK_ELEMENTS`, the working-set bound that keeps them within memory
at 1024). No Triton needed. Inputs fp32, so the only differences are summation order: 1e-5.
"""

import math
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kernels import _common
from kernels import group_norm as GN
from kernels import ssa_compressed as CMP
from kernels import ssa_selection as SEL
from kernels import ssa_window as WIN
from s2core.sparse.coords import window_partition
from tests.kernels.ssa_cases import block_layout, block_sorted_coords

pytestmark = pytest.mark.usefixtures("one_thread")


def _selection(lens, h, g, d, topk, seed, empty_rows=True):
    gen = torch.Generator().manual_seed(seed)
    coords = block_sorted_coords(lens, 24, 8, seed)
    cu_q, cu_blocks, cu_tok = block_layout(coords)
    n = coords.shape[0]
    q, k, v = (torch.randn(n, hh, d, generator=gen) for hh in (h * g, h, h))
    bidx = torch.full((h, n, topk), -1, dtype=torch.int32)
    for b in range(len(lens)):
        q0, q1, nb = int(cu_q[b]), int(cu_q[b + 1]), int(cu_blocks[b + 1] - cu_blocks[b])
        kk = min(topk, nb)
        pick = torch.rand(h, q1 - q0, nb, generator=gen).argsort(-1)[..., :kk]  # distinct blocks per row
        count = torch.randint(0 if empty_rows else 1, kk + 1, (h, q1 - q0, 1), generator=gen)
        pick = torch.where(torch.arange(kk) < count, pick, nb).sort(-1).values  # chosen first, ascending
        bidx[:, q0:q1, :kk] = torch.where(pick == nb, -1, pick).to(torch.int32)
    return q, k, v, bidx, cu_q, cu_blocks, cu_tok


def _selection_loops(q, k, v, bidx, cu_q, cu_blocks, cu_tok):
    """One query and one head at a time: softmax over the concatenated tokens of the chosen blocks."""
    n, hq, d = q.shape
    h = k.shape[1]
    o = torch.zeros(n, hq, d)
    for i in range(n):
        b = int(torch.searchsorted(cu_q[1:], torch.tensor(i), right=True))
        for head in range(hq):
            blocks = [int(x) + int(cu_blocks[b]) for x in bidx[head // (hq // h), i] if x >= 0]
            rows = torch.cat([torch.arange(int(cu_tok[j]), int(cu_tok[j + 1])) for j in blocks]) if blocks else None
            if rows is None:
                continue
            kh = head // (hq // h)
            p = torch.softmax(k[rows, kh] @ q[i, head] / math.sqrt(d), 0)
            o[i, head] = p @ v[rows, kh]
    return o


@pytest.mark.parametrize(
    "lens,h,g,topk",
    [([40, 0, 57], 2, 4, 3), ([1], 1, 2, 2), ([90], 2, 2, 8)],
    ids=["B3-empty-sample-H2-G4-K3", "N1-H1-G2-K2", "N90-H2-G2-K8"],
)
def test_selection_reference_matches_loops(lens, h, g, topk):
    case = _selection(lens, h, g, 16, topk, zlib.crc32(f"{lens}{h}{g}".encode()))
    got = SEL.ssa_selection_attention_reference(*case, max_seqlen=max(lens))
    torch.testing.assert_close(got, _selection_loops(*case), rtol=1e-5, atol=1e-5)


def test_selection_reference_chunking_changes_nothing(monkeypatch):
    case = _selection([70, 33], 2, 4, 16, 4, 5)
    want = SEL.ssa_selection_attention_reference(*case, max_seqlen=70)
    monkeypatch.setattr(_common, "CHUNK_ELEMENTS", 1)  # one query per chunk
    torch.testing.assert_close(SEL.ssa_selection_attention_reference(*case, max_seqlen=70), want, rtol=1e-5, atol=1e-6)


def test_compressed_reference_chunking_changes_nothing(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    lens = [50, 31]  # 9 and 4 keys: cu_k
    cu_q = torch.tensor([0, 50, 81], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 13], dtype=torch.int32)
    q, ck, cv = (
        torch.randn(81, 8, 16, generator=gen),
        torch.randn(13, 2, 16, generator=gen),
        torch.randn(13, 2, 16, generator=gen),
    )
    want = CMP.ssa_compressed_attention_reference(q, ck, cv, cu_q, cu_k, max(lens), 3)
    monkeypatch.setattr(_common, "CHUNK_ELEMENTS", 100)  # a few queries per chunk
    got = CMP.ssa_compressed_attention_reference(q, ck, cv, cu_q, cu_k, max(lens), 3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and the softmax rows: each query's lse is the log of its sum of exponentials over its sample's keys
    s = torch.einsum("gd,cd->gc", q[60].view(2, 4, 16)[1], ck[9:13, 1]) / 4.0  # sample 1, KV head 1
    torch.testing.assert_close(got[1][4:8, 60], torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


def test_window_reference_chunking_changes_nothing(monkeypatch):
    gen = torch.Generator().manual_seed(9)
    coords = block_sorted_coords([120, 47], 20, 8, 9)
    perm, cu_w, max_w = window_partition(coords, 8, 4)
    n = coords.shape[0]
    q, k, v = (
        torch.randn(n, 8, 16, generator=gen),
        torch.randn(n, 2, 16, generator=gen),
        torch.randn(n, 2, 16, generator=gen),
    )
    want = WIN.ssa_window_attention_reference(q, k, v, perm, cu_w, max_w)
    monkeypatch.setattr(_common, "CHUNK_ELEMENTS", 1)  # one window per chunk
    torch.testing.assert_close(
        WIN.ssa_window_attention_reference(q, k, v, perm, cu_w, max_w), want, rtol=1e-5, atol=1e-6
    )
    # each window is full attention among its own tokens
    w0 = perm[int(cu_w[1]) : int(cu_w[2])].long()
    p = torch.softmax(torch.einsum("ihd,jhd->hij", q[w0].view(-1, 2, 4, 16)[:, 1], k[w0, 1:2]) / 4.0, -1)
    torch.testing.assert_close(
        want[w0].view(-1, 2, 4, 16)[:, 1], torch.einsum("hij,jd->ihd", p, v[w0, 1]), rtol=1e-5, atol=1e-5
    )


def test_group_norm_reference_is_per_group():
    gen = torch.Generator().manual_seed(2)
    x = 2.0 + torch.randn(2, 12, 5, 4, 3, generator=gen)
    w, b = torch.randn(12, generator=gen), torch.randn(12, generator=gen)
    want = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 3, w, b, 1e-5))
    torch.testing.assert_close(GN.group_norm_silu_reference(x, w, b, 3), want, rtol=1e-5, atol=1e-6)


class _Largest(TorchDispatchMode):
    """Records the element count of the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numel = max([self.numel] + [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)])
        return out


def test_references_stay_within_the_chunk_bound(monkeypatch):
    # 3000 tokens in one sample: a dense [HQ, N, N] score matrix would be 72 M elements, [N, N] 9 M. With the
    # working set at 2^18 elements, nothing but the N-sized inputs/outputs ([N, HQ, D] = 768 k) may be larger
    # than a few chunks' worth.
    monkeypatch.setattr(_common, "CHUNK_ELEMENTS", 1 << 18)
    q, k, v, bidx, cu_q, cu_blocks, cu_tok = _selection([3000], 2, 4, 32, 4, 7, empty_rows=False)
    n, hq, d = q.shape
    bound = max(n * hq * d, 4 << 18)
    with _Largest() as seen:
        SEL.ssa_selection_attention_reference(q, k, v, bidx, cu_q, cu_blocks, cu_tok, n)
    assert seen.numel <= bound, f"selection: a tensor of {seen.numel} elements (bound {bound})"
    cu_k = torch.tensor([0, 600], dtype=torch.int32)
    with _Largest() as seen:
        CMP.ssa_compressed_attention_reference(q, k[:600], v[:600], cu_q, cu_k, n, 4)
    assert seen.numel <= bound, f"compressed: a tensor of {seen.numel} elements (bound {bound})"
    perm, cu_w, max_w = window_partition(block_sorted_coords([3000], 24, 8, 7), 8, 0)
    with _Largest() as seen:
        WIN.ssa_window_attention_reference(q, k, v, perm, cu_w, max_w)
    assert seen.numel <= bound, f"window: a tensor of {seen.numel} elements (bound {bound})"
