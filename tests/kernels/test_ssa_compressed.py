"""Compressed attention + lse + block scores + top-k (kernels/ssa_compressed.py) against its PyTorch reference.

CPU runs the Triton kernel under TRITON_INTERPRET=1 at tiny sizes; GPU-marked cases use the real SSA shape
(32 query heads, 2 KV heads, D 32, top-k 8). Tolerances: o is fp16/bf16 output of an fp32-accumulated
softmax — rel-RMS 1e-2 / max-abs 2e-2 (fp16) and 3e-2 / 6e-2 (bf16: 8 mantissa bits, p is rounded to bf16
before the PV product); lse is fp32 from fp16 logits, 1e-4 rel-RMS. Top-k: the kernel's set must be valid
(min(topk, #blocks) distinct ascending blocks, -1 padded) and carry the reference's best total score up to
1e-4 (near-ties may swap with a different summation order).
"""

import math
import zlib

import pytest
import torch

from kernels import ssa_compressed as K
from kernels import ssa_topk
from tests.kernels.ssa_cases import assert_close, poisoned_outputs

TOL = {torch.float16: (1e-2, 2e-2), torch.bfloat16: (3e-2, 6e-2)}


def _block_keys(mlens, cells, gen):
    """Random grouping of each sample's compressed keys into selection blocks of <= cells keys."""
    rows, cu, start = [], [0], 0
    for m in mlens:
        perm = (torch.randperm(m, generator=gen) + start).tolist()
        i = nb = 0
        while i < m:
            c = int(torch.randint(1, cells + 1, (1,), generator=gen))
            r = perm[i : i + c]
            rows.append(r + [-1] * (cells - len(r)))
            i, nb = i + c, nb + 1
        cu.append(cu[-1] + nb)
        start += m
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, cells), torch.tensor(cu, dtype=torch.int32)


def _block_scores(q, ck, cu_q, cu_k, block_keys, cu_blocks, scale):
    """Reference block scores [H, N, max blocks] (-inf past a sample's blocks), fp32."""
    n, hq, d = q.shape
    h = ck.shape[1]
    g = hq // h
    cq, cm = cu_q.tolist(), cu_k.tolist()
    cb = cm if block_keys is None else cu_blocks.tolist()
    nbmax = max(cb[i + 1] - cb[i] for i in range(len(cb) - 1))
    out = torch.full((h, n, max(nbmax, 1)), float("-inf"))
    for b in range(len(cq) - 1):
        q0, q1, m0, m1 = cq[b], cq[b + 1], cm[b], cm[b + 1]
        if q1 == q0 or m1 == m0:
            continue
        s = torch.einsum("ihd,chd->hic", q[q0:q1].float(), ck[m0:m1].float().repeat_interleave(g, 1)) * scale
        p = torch.softmax(s, -1).view(h, g, q1 - q0, m1 - m0).sum(1)
        if block_keys is None:
            out[:, q0:q1, : m1 - m0] = p
        else:
            for j, blk in enumerate(block_keys[cb[b] : cb[b + 1]].tolist()):
                out[:, q0:q1, j] = sum(p[:, :, r - m0] for r in blk if r >= 0)
    return out


def _check_topk(bidx, scores, cu_q, cu_blocks, topk):
    n_blocks = (cu_blocks[1:] - cu_blocks[:-1]).tolist()
    cq = cu_q.tolist()
    for b in range(len(cq) - 1):
        q0, q1 = cq[b], cq[b + 1]
        if q1 == q0:
            continue
        kk = min(topk, n_blocks[b])
        sel = bidx[:, q0:q1].long()
        assert (sel[..., kk:] == -1).all(), "slots past min(topk, #blocks) must be -1"
        got = sel[..., :kk]
        assert ((got >= 0) & (got < n_blocks[b])).all(), "selected block out of range"
        if kk > 1:
            assert (got[..., 1:] > got[..., :-1]).all(), "selected blocks must be distinct and ascending"
        if kk == 0:
            continue
        sc = scores[:, q0:q1]
        best = sc.topk(kk, -1).values.sum(-1)
        mine = sc.gather(-1, got).sum(-1)
        assert (mine >= best - 1e-4 * best.abs().clamp(min=1)).all(), "a selected block set scores below the top-k"


def _run(lens, mlens, hq, h, d, topk, cells, dtype, device, seed, monkeypatch):
    gen = torch.Generator().manual_seed(seed)
    n, m = sum(lens), sum(mlens)
    q = (torch.randn(n, hq, d, generator=gen) * 2).to(dtype).to(device)
    ck = (torch.randn(m, h, d, generator=gen) * 2).to(dtype).to(device)
    cv = torch.randn(m, h, d, generator=gen).to(dtype).to(device)
    cu_q = torch.tensor([0] + lens).cumsum(0).to(torch.int32).to(device)
    cu_k = torch.tensor([0] + mlens).cumsum(0).to(torch.int32).to(device)
    bk = cb = None
    if cells > 1:
        bk, cb = _block_keys(mlens, cells, gen)
        bk, cb = bk.to(device), cb.to(device)
    with poisoned_outputs(monkeypatch):
        o, lse, bidx = K.ssa_compressed_attention(q, ck, cv, cu_q, cu_k, max(lens), topk, bk, cb, backend="triton")
    ro, rlse, _ = K.ssa_compressed_attention_reference(q, ck, cv, cu_q, cu_k, max(lens), topk, bk, cb)
    rr, ma = TOL[dtype]
    assert_close(o, ro, rr, ma, "o")
    finite = torch.isfinite(rlse)
    assert torch.equal(finite.cpu(), torch.isfinite(lse).cpu()), "lse must be -inf exactly for samples without keys"
    assert_close(lse[finite], rlse[finite], 1e-4, 1e-2, "lse")
    scores = _block_scores(
        q.cpu(),
        ck.cpu(),
        cu_q.cpu(),
        cu_k.cpu(),
        None if bk is None else bk.cpu(),
        None if cb is None else cb.cpu(),
        1 / math.sqrt(d),
    )
    _check_topk(bidx.cpu(), scores, cu_q.cpu(), (cu_k if cb is None else cb).cpu(), topk)
    # fused SSA gate: out += gate * o, gate a strided column as in the module
    gate = torch.rand(n, 3, generator=gen).to(dtype).to(device)[:, 0]
    base = torch.randn(n, hq, d, generator=gen).to(dtype).to(device)
    if device == "cuda":  # re-tune on this accumulating call: benchmarking configs must not add into `out`
        K._cmp_attn_topk_tuned.cache.clear()
    got, none_lse, _ = K.ssa_compressed_attention(
        q, ck, cv, cu_q, cu_k, max(lens), topk, bk, cb, gate=gate, out=base.clone(), return_lse=False, backend="triton"
    )
    want, _, _ = K.ssa_compressed_attention_reference(
        q, ck, cv, cu_q, cu_k, max(lens), topk, bk, cb, gate=gate, out=base.clone()
    )
    assert none_lse is None
    assert_close(got, want, rr, ma, "gated accumulate")


CPU_CASES = [  # (tokens per sample, compressed keys per sample, HQ, H, D, topk, cells, dtype)
    ([5, 17, 1], [3, 7, 1], 4, 2, 16, 3, 1, torch.float16),  # ragged, a single-token sample, topk > #blocks
    ([40], [20], 4, 2, 16, 8, 1, torch.float16),
    ([24, 7], [32, 16], 4, 2, 16, 5, 1, torch.float16),  # keys a whole number of 16-key tiles: no masked tile
    ([1], [1], 4, 2, 16, 8, 1, torch.float16),  # one token, one block
    ([9, 4], [5, 0], 4, 2, 16, 2, 1, torch.float16),  # a sample with no compressed keys
    ([33, 9], [30, 4], 4, 2, 16, 4, 8, torch.float16),  # v1.0: 8 cells per selection block
    ([21], [12], 32, 2, 32, 8, 1, torch.float16),  # real head layout, G = 16
    ([20, 3], [10, 2], 4, 2, 16, 3, 1, torch.bfloat16),
]


def _id(c):
    lens, mlens, hq, h, d, k, cells, dt = c
    return (
        f"N{','.join(map(str, lens))}-M{','.join(map(str, mlens))}-HQ{hq}-H{h}-D{d}-K{k}-C{cells}-"
        f"{str(dt).removeprefix('torch.')}"
    )


@pytest.mark.triton
@pytest.mark.parametrize("case", CPU_CASES, ids=[_id(c) for c in CPU_CASES])
def test_compressed_cpu_interpreter(case, monkeypatch):
    _run(*case, device="cpu", seed=zlib.crc32(_id(case).encode()), monkeypatch=monkeypatch)


@pytest.mark.triton
@pytest.mark.parametrize("cells", [1, 8])
def test_compressed_cpu_several_launches_and_chunks(cells, monkeypatch):
    """Tokens in launches of 64 (a tiny score scratch) and the top-k merged over chunks of 16 scores: the
    paths a large grid takes on a GPU (official sizes use one chunk)."""
    monkeypatch.setattr(K, "SCORE_BYTES", 1)
    monkeypatch.setattr(ssa_topk, "TOPK_CHUNK", 16)
    case = ([130, 3], [40, 2], 4, 2, 16, 5, cells, torch.float16)
    _run(*case, device="cpu", seed=zlib.crc32(f"launches-{cells}".encode()), monkeypatch=monkeypatch)


GPU_CASES = [
    ([8000, 3001, 1], [400, 150, 1], 32, 2, 32, 8, 1, torch.float16),
    ([20000], [1200], 32, 2, 32, 8, 1, torch.bfloat16),
    ([5000, 777], [900, 5], 32, 2, 32, 8, 8, torch.float16),
    ([3000], [300], 32, 2, 32, 32, 8, torch.bfloat16),  # v1.0-512: topk 32
]


@pytest.mark.triton
@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[_id(c) for c in GPU_CASES])
def test_compressed_gpu(case, monkeypatch):
    _run(*case, device="cuda", seed=zlib.crc32(_id(case).encode()), monkeypatch=monkeypatch)


def test_dispatch_uses_reference_on_cpu():
    q = torch.randn(3, 4, 16).half()
    ck = torch.randn(2, 2, 16).half()
    cu_q, cu_k = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32)
    a = K.ssa_compressed_attention(q, ck, ck, cu_q, cu_k, 3, 2)
    b = K.ssa_compressed_attention_reference(q, ck, ck, cu_q, cu_k, 3, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.triton
def test_compressed_samples_without_keys(monkeypatch):
    """Samples without compressed keys (first and last): their rows have no key in any tile. They get o exactly
    0, lse -inf and no blocks, and the gated accumulation leaves `out` as it was; the sample between is exact
    to the reference."""
    gen = torch.Generator().manual_seed(16)
    lens, mlens, hq, h, d, topk = [6, 5, 3], [0, 4, 0], 4, 2, 16, 2
    n, m = sum(lens), sum(mlens)
    q = (torch.randn(n, hq, d, generator=gen) * 2).half()
    ck = (torch.randn(m, h, d, generator=gen) * 2).half()
    cv = torch.randn(m, h, d, generator=gen).half()
    cu_q = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + mlens).cumsum(0).to(torch.int32)
    none = torch.zeros(n, dtype=torch.bool)
    none[:6] = none[11:] = True
    with poisoned_outputs(monkeypatch):
        o, lse, bidx = K.ssa_compressed_attention(q, ck, cv, cu_q, cu_k, max(lens), topk, backend="triton")
    assert torch.equal(o[none], torch.zeros_like(o[none]))
    assert torch.isneginf(lse[:, none]).all() and (bidx[:, none] == -1).all()
    ro, rlse, rbidx = K.ssa_compressed_attention_reference(q, ck, cv, cu_q, cu_k, max(lens), topk)
    assert_close(o, ro, *TOL[torch.float16], "o")
    assert_close(lse[:, ~none], rlse[:, ~none], 1e-4, 1e-2, "lse")
    base = torch.randn(n, hq, d, generator=gen).half()
    gate = torch.rand(n, generator=gen).half()
    got, _, _ = K.ssa_compressed_attention(
        q, ck, cv, cu_q, cu_k, max(lens), topk, gate=gate, out=base.clone(), backend="triton"
    )
    assert torch.equal(got[none], base[none])
