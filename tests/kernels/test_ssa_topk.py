"""Top-k selection blocks from block scores (kernels/ssa_topk.py) against its PyTorch reference.

Both pick the same blocks by the same rule (largest scores, ties to the lower block, ascending, -1 padded), so
the comparison is exact, also on scores drawn from a handful of values where most rows have ties at the k-th
place. Rows of `out` the call must not touch are poisoned (-7) and must stay so.
"""

import zlib

import pytest
import torch

from kernels import ssa_topk

POISON = -7


def _case(lens, blocks, h, q_lo, rows, width, topk, tied, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    shape = (h, len(lens), rows, width)
    if tied:  # five distinct values: ties everywhere, the tie rule decides most rows
        scores = torch.randint(0, 5, shape, generator=gen).float() / 4
    else:
        scores = torch.rand(shape, generator=gen)
    cu_q = torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
    cu_b = torch.tensor([0, *blocks]).cumsum(0).to(torch.int32)
    out = torch.full((h, sum(lens), topk), POISON, dtype=torch.int32)
    return [t.to(device) for t in (scores, cu_q, cu_b)], out.to(device)


CASES = [
    # lens, blocks, H, q_lo, rows, width, topk, chunk
    ([5, 0, 9], [7, 3, 0], 2, 0, 9, 8, 4, 4096),  # a sample without tokens, one without blocks
    ([1], [1], 1, 0, 1, 1, 1, 4096),  # one token, one block
    ([6, 2], [3, 1], 2, 0, 6, 4, 8, 4096),  # top-k wider than every sample's blocks
    ([10, 4], [20, 17], 2, 3, 4, 20, 5, 8),  # a slab of tokens 3..6, scores merged over chunks of 8
    ([33], [50], 1, 0, 33, 64, 32, 16),  # official top-k 32 over four chunks
    ([40, 9], [200, 37], 2, 0, 40, 256, 8, 4096),  # 13 and 3 segments of 16, the last ones partial
]


def _id(c):
    return "L{}-B{}-H{}-lo{}-R{}-W{}-k{}-c{}".format(*[",".join(map(str, x)) if isinstance(x, list) else x for x in c])


@pytest.mark.triton
@pytest.mark.parametrize("segmented", [False, True], ids=["rounds", "segmented"])
@pytest.mark.parametrize("tied", [False, True], ids=["distinct", "tied"])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_topk_kernel_equals_reference(case, tied, segmented, monkeypatch):
    """Both kernels (segmented: one-chunk rows of at least SEG blocks; the others keep the rounds kernel)."""
    lens, blocks, h, q_lo, rows, width, topk, chunk = case
    monkeypatch.setattr(ssa_topk, "TOPK_CHUNK", chunk)
    monkeypatch.setattr(ssa_topk, "SEGMENTED", segmented)
    (scores, cu_q, cu_b), out = _case(lens, blocks, h, q_lo, rows, width, topk, tied, zlib.crc32(_id(case).encode()))
    want = ssa_topk.block_topk_reference(scores, cu_q, cu_b, q_lo, topk, out.clone())
    got = ssa_topk.block_topk(scores, cu_q, cu_b, q_lo, topk, out.clone(), backend="triton")
    assert torch.equal(got, want)
    # the reference itself: only this slab's rows are written, and a written row is a valid ascending set
    touched = torch.zeros(sum(lens), dtype=torch.bool)
    for b, (q0, n) in enumerate(zip(cu_q[:-1].tolist(), lens)):
        touched[q0 + q_lo : q0 + min(n, q_lo + rows)] = True
        k = min(topk, blocks[b])
        sel = want[:, q0 + q_lo : q0 + min(n, q_lo + rows)]
        assert (sel[..., k:] == -1).all() and (sel[..., :k] >= 0).all() and (sel[..., :k] < blocks[b]).all()
        assert k < 2 or (sel[..., 1:k] > sel[..., : k - 1]).all()
    assert (want[:, ~touched] == POISON).all() and (want[:, touched] != POISON).all()


def test_reference_breaks_ties_to_the_lower_block():
    scores = torch.tensor([0.5, 1.0, 0.5, 1.0, 0.5]).view(1, 1, 1, 5)
    cu = torch.tensor([0, 1], dtype=torch.int32)
    out = torch.full((1, 1, 3), POISON, dtype=torch.int32)
    ssa_topk.block_topk_reference(scores, cu, torch.tensor([0, 5], dtype=torch.int32), 0, 3, out)
    assert out.flatten().tolist() == [0, 1, 3]


@pytest.mark.triton
@pytest.mark.parametrize("segmented", [False, True], ids=["rounds", "segmented"])
@pytest.mark.parametrize("rows", [1, 2, 16])
def test_any_tokens_per_program_gives_the_same_blocks(rows, segmented):
    """The launch shape (bench/bench_topk.py sweeps it) only regroups tokens: a ragged last program included."""
    (scores, cu_q, cu_b), out = _case([7, 5], [30, 12], 2, 0, 7, 30, 8, True, 40 + rows)
    want = ssa_topk.block_topk_reference(scores, cu_q, cu_b, 0, 8, out.clone())
    got = ssa_topk._block_topk_triton(
        scores, cu_q, cu_b, 0, 8, out.clone(), rows=rows, num_warps=1, segmented=segmented
    )
    assert torch.equal(got, want)


@pytest.mark.triton
def test_segmented_kernel_picks_within_one_segment_and_across_ties(monkeypatch):
    """Every top block in one segment (each round reloads the same segment), and equal scores across segments
    (the lower segment, then the lower block): the blocks the reference picks."""
    seg, real = [], ssa_topk._topk_kernel

    class Spy:  # records each launch's SEG: the segment heads must be the path that runs
        def __getitem__(self, grid):
            return lambda *a, **k: seg.append(k["SEG"]) or real[grid](*a, **k)

    monkeypatch.setattr(ssa_topk, "_topk_kernel", Spy())
    scores = torch.zeros(1, 1, 3, 64)
    scores[0, 0, 0, 16:24] = torch.arange(8, 0, -1).float()  # row 0: segment 1 holds the top 8, descending
    scores[0, 0, 1, :] = 1.0  # row 1: all equal: blocks 0..7
    scores[0, 0, 2, ::16] = 2.0  # row 2: four segment heads tie, then ties inside segment 0
    scores[0, 0, 2, 1:5] = 2.0
    cu_q, cu_b = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0, 64], dtype=torch.int32)
    out = torch.full((1, 3, 8), POISON, dtype=torch.int32)
    got = ssa_topk._block_topk_triton(scores, cu_q, cu_b, 0, 8, out.clone(), num_warps=1, segmented=True)
    assert got[0].tolist() == [list(range(16, 24)), list(range(8)), [0, 1, 2, 3, 4, 16, 32, 48]]
    assert torch.equal(got, ssa_topk.block_topk_reference(scores, cu_q, cu_b, 0, 8, out.clone()))
    assert seg == [ssa_topk.SEG]


@pytest.mark.triton
def test_an_empty_slab_writes_nothing():
    (scores, cu_q, cu_b), out = _case([3], [2], 2, 0, 0, 2, 2, False, 0)
    assert (ssa_topk.block_topk(scores, cu_q, cu_b, 0, 2, out, backend="triton") == POISON).all()


def test_dispatch_uses_reference_on_cpu():
    (scores, cu_q, cu_b), out = _case([4], [3], 1, 0, 4, 3, 2, False, 1)
    got = ssa_topk.block_topk(scores, cu_q, cu_b, 0, 2, out.clone())
    assert torch.equal(got, ssa_topk.block_topk_reference(scores, cu_q, cu_b, 0, 2, out.clone()))


@pytest.mark.triton
@pytest.mark.gpu
@pytest.mark.parametrize("segmented", [False, True], ids=["rounds", "segmented"])
@pytest.mark.parametrize("topk", [8, 32])
def test_topk_gpu_official_grid(topk, segmented, monkeypatch):
    """The 1024 stage's widest case: 16^3 blocks in one chunk, a slab of 3000 tokens of two samples."""
    monkeypatch.setattr(ssa_topk, "SEGMENTED", segmented)
    (scores, cu_q, cu_b), out = _case([2500, 700], [4096, 1500], 2, 200, 3000, 4096, topk, False, topk, "cuda")
    want = ssa_topk.block_topk_reference(scores, cu_q, cu_b, 200, topk, out.clone())
    assert torch.equal(ssa_topk.block_topk(scores, cu_q, cu_b, 200, topk, out.clone()), want)
