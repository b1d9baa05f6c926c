"""Selected-block attention (kernels/ssa_selection.py) against its PyTorch reference.

Both code paths of the kernel are exercised: the shared walk over the union of a tile's blocks (correlated
choices, as neighbouring tokens make) and the one-token-at-a-time fallback (random choices, or forced).
Tolerance: fp16/bf16 outputs of an fp32-accumulated softmax, rel-RMS 1e-2 / max-abs 2e-2 (fp16),
3e-2 / 6e-2 (bf16, whose p is rounded to 8 mantissa bits before the PV product).
"""

import zlib

import pytest
import torch

from kernels import ssa_selection as K
from tests.kernels.ssa_cases import assert_close, block_layout, block_sorted_coords, poisoned_outputs

TOL = {torch.float16: (1e-2, 2e-2), torch.bfloat16: (3e-2, 6e-2)}


def _choices(cu_q, cu_blocks, h, topk, correlated, gen):
    n = int(cu_q[-1])
    bidx = torch.full((h, n, topk), -1, dtype=torch.int32)
    for b in range(cu_q.numel() - 1):
        q0, q1 = int(cu_q[b]), int(cu_q[b + 1])
        nb = int(cu_blocks[b + 1] - cu_blocks[b])
        kk = min(topk, nb)
        if q1 == q0 or kk == 0:
            continue
        if correlated:  # one set per KV head with a few tokens deviating
            base = torch.stack([torch.randperm(nb, generator=gen)[:kk] for _ in range(h)])  # [H, kk]
            sel = base[:, None, :].repeat(1, q1 - q0, 1)
            alt = torch.randint(0, nb, (h, q1 - q0), generator=gen)
            odd = torch.rand(h, q1 - q0, generator=gen) < 0.2
            sel[:, :, 0] = torch.where(odd & ~(sel == alt[..., None]).any(-1), alt, sel[:, :, 0])
        else:
            sel = torch.rand(h, q1 - q0, nb, generator=gen).argsort(-1)[..., :kk]
        bidx[:, q0:q1, :kk] = sel.sort(-1).values.to(torch.int32)
    return bidx


def _run(lens, grid, hq, h, d, topk, correlated, union_max, dtype, device, seed, monkeypatch):
    gen = torch.Generator().manual_seed(seed)
    coords = block_sorted_coords(lens, grid, 8, seed)
    cu_q, cu_blocks, cu_tok = block_layout(coords)
    n = coords.shape[0]
    q = torch.randn(n, hq, d, generator=gen).to(dtype).to(device)
    k = torch.randn(n, h, d, generator=gen).to(dtype).to(device)
    v = torch.randn(n, h, d, generator=gen).to(dtype).to(device)
    bidx = _choices(cu_q, cu_blocks, h, topk, correlated, gen).to(device)
    cu_q, cu_blocks, cu_tok = cu_q.to(device), cu_blocks.to(device), cu_tok.to(device)
    with poisoned_outputs(monkeypatch):
        if union_max is None:
            o = K.ssa_selection_attention(q, k, v, bidx, cu_q, cu_blocks, cu_tok, max(lens), backend="triton")
        else:
            o = K._ssa_selection_attention_triton(
                q, k, v, bidx, cu_q, cu_blocks, cu_tok, max(lens), union_max=union_max
            )
    ref = K.ssa_selection_attention_reference(q, k, v, bidx, cu_q, cu_blocks, cu_tok, max(lens))
    assert_close(o, ref, *TOL[dtype], "o")
    # fused SSA gate: out += gate * o, gate a strided column as in the module
    gate = torch.rand(n, 3, generator=gen).to(dtype).to(device)[:, 1]
    base = torch.randn(n, hq, d, generator=gen).to(dtype).to(device)
    if device == "cuda":  # re-tune on this accumulating call: benchmarking configs must not add into `out`
        K._selection_tuned.cache.clear()
    got = K._ssa_selection_attention_triton(
        q, k, v, bidx, cu_q, cu_blocks, cu_tok, max(lens), gate=gate, out=base.clone(), union_max=union_max
    )
    want = K.ssa_selection_attention_reference(
        q, k, v, bidx, cu_q, cu_blocks, cu_tok, max(lens), gate=gate, out=base.clone()
    )
    assert_close(got, want, *TOL[dtype], "gated accumulate")


CPU_CASES = [  # (tokens per sample, grid, HQ, H, D, topk, correlated choices, union limit, dtype)
    ([30, 1, 12], 16, 4, 2, 16, 3, True, None, torch.float16),  # ragged, single token, union path
    ([30, 1, 12], 16, 4, 2, 16, 3, False, 0, torch.float16),  # forced one-token-at-a-time path
    ([50], 24, 4, 2, 16, 8, False, None, torch.float16),  # topk > #blocks of the sample? (few blocks)
    ([40], 16, 32, 2, 32, 4, True, None, torch.float16),  # real head layout, G = 16
    ([25, 7], 16, 4, 2, 16, 3, False, None, torch.bfloat16),
]


def _id(c):
    lens, grid, hq, h, d, k, corr, um, dt = c
    return (
        f"N{','.join(map(str, lens))}-R{grid}-HQ{hq}-H{h}-D{d}-K{k}-{'corr' if corr else 'rand'}-U{um}-"
        f"{str(dt).removeprefix('torch.')}"
    )


@pytest.mark.triton
@pytest.mark.parametrize("case", CPU_CASES, ids=[_id(c) for c in CPU_CASES])
def test_selection_cpu_interpreter(case, monkeypatch):
    _run(*case, device="cpu", seed=zlib.crc32(_id(case).encode()), monkeypatch=monkeypatch)


GPU_CASES = [
    ([20000, 3000, 1], 64, 32, 2, 32, 8, True, None, torch.float16),
    ([20000], 64, 32, 2, 32, 8, False, None, torch.bfloat16),
    ([6000, 500], 64, 32, 2, 32, 32, False, None, torch.float16),
]


@pytest.mark.triton
@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[_id(c) for c in GPU_CASES])
def test_selection_gpu(case, monkeypatch):
    _run(*case, device="cuda", seed=zlib.crc32(_id(case).encode()), monkeypatch=monkeypatch)


@pytest.mark.triton
@pytest.mark.parametrize("union_max", [None, 0], ids=["union", "per-token"])
def test_selection_tokens_without_blocks(union_max, monkeypatch):
    """Tokens that chose no block (all -1) beside tokens that did, and a sample where none did: their rows are
    masked (-inf) in every tile the program walks, which an unguarded online softmax turns into NaN. They get
    exactly 0, so the gated accumulation leaves `out` as it was."""
    gen = torch.Generator().manual_seed(16)
    h, hq, d, topk = 2, 4, 16, 3
    coords = block_sorted_coords([30, 9], 16, 8, 16)
    cu_q, cu_blocks, cu_tok = block_layout(coords)
    n = coords.shape[0]
    q = torch.randn(n, hq, d, generator=gen).half()
    k = torch.randn(n, h, d, generator=gen).half()
    v = torch.randn(n, h, d, generator=gen).half()
    bidx = _choices(cu_q, cu_blocks, h, topk, True, gen)
    empty = torch.rand(h, n, generator=gen) < 0.4  # [H, N]
    empty[:, 30:] = True  # the second sample: no token chose a block
    bidx[empty] = -1
    rows = empty.repeat_interleave(hq // h, 0).T  # [N, HQ]: query head j reads KV head j // G
    with poisoned_outputs(monkeypatch):
        o = K._ssa_selection_attention_triton(q, k, v, bidx, cu_q, cu_blocks, cu_tok, 30, union_max=union_max)
    assert torch.equal(o[rows], torch.zeros_like(o[rows]))
    assert_close(
        o, K.ssa_selection_attention_reference(q, k, v, bidx, cu_q, cu_blocks, cu_tok, 30), *TOL[torch.float16], "o"
    )
    base = torch.randn(n, hq, d, generator=gen).half()
    gate = torch.rand(n, generator=gen).half()
    got = K._ssa_selection_attention_triton(
        q, k, v, bidx, cu_q, cu_blocks, cu_tok, 30, gate=gate, out=base.clone(), union_max=union_max
    )
    assert torch.equal(got[rows], base[rows])
