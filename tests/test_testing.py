"""s2core.testing: deterministic synthetic weights and golden-fixture loading.

Every parity test leans on two promises: the same (seed, name, shape) always gives the same bytes, and a
fixture's sidecar regenerates exactly the weights the original module was loaded with.
"""

import math
from collections import defaultdict

import pytest
import torch
from conftest import GOLDEN, MANIFESTS

from s2core.manifest import read_manifest_tsv
from s2core.testing import deterministic_state_dict, deterministic_tensor, golden_state_dict, load_golden

SMALL = 1 << 15  # elements; larger tensors are sampled (the manifests hold 2.4e9 values, minutes to draw)

MANIFEST_FILES = sorted(MANIFESTS.glob("*.tsv")) + sorted(MANIFESTS.glob("v1_0/*.tsv"))


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def test_same_seed_same_bytes():
    specs = [s for s in read_manifest_tsv(MANIFESTS / "model_sparse_512.vae.tsv") if math.prod(s.shape) <= SMALL]
    a = deterministic_state_dict(specs, seed=3)
    b = deterministic_state_dict(list(reversed(specs)), seed=3)  # order of generation must not matter
    assert list(a) == [s.name for s in specs]
    for k in a:
        assert _bytes(a[k]) == _bytes(b[k]), k


def test_different_seeds_and_names_differ():
    a = deterministic_tensor("blocks.0.attn.qkv.weight", (64, 32), torch.float32, seed=0)
    b = deterministic_tensor("blocks.0.attn.qkv.weight", (64, 32), torch.float32, seed=1)
    c = deterministic_tensor("blocks.1.attn.qkv.weight", (64, 32), torch.float32, seed=0)
    assert not torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dtype_override_casts_the_fp32_draw():
    specs = read_manifest_tsv(MANIFESTS / "model_dense.dit.tsv")[:6]  # fp32 pos_emb, then fp16 Linears
    sd = deterministic_state_dict(specs, seed=0, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    for s in specs:  # one rounding from the fp32 draw, whatever the manifest dtype
        ref = deterministic_tensor(s.name, s.shape, torch.float32, seed=0).to(torch.bfloat16)
        assert torch.equal(sd[s.name], ref), s.name
    native = deterministic_state_dict(specs, seed=0)
    assert [str(v.dtype) for v in native.values()] == ["torch." + s.dtype for s in specs]


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: p.relative_to(MANIFESTS).as_posix())
def test_manifest_state_dict_matches_manifest(path):
    """Every entry below SMALL elements is drawn and checked; of the big ones, one per (leaf, ndim, dtype)."""
    specs = read_manifest_tsv(path)
    assert specs, f"{path} lists no tensors"
    groups = defaultdict(list)
    for s in specs:
        if math.prod(s.shape) > SMALL:
            groups[(s.name.rsplit(".", 1)[-1], len(s.shape), s.dtype)].append(s)
    chosen = [s for s in specs if math.prod(s.shape) <= SMALL] + [g[0] for g in groups.values()]
    sd = deterministic_state_dict(chosen, seed=0)
    assert list(sd) == [s.name for s in chosen]
    for s in chosen:
        t = sd[s.name]
        assert tuple(t.shape) == tuple(s.shape), s.name
        assert t.dtype == getattr(torch, s.dtype), s.name
        assert bool(t.ne(0).any()), f"{s.name} is all zeros"
        if t.is_floating_point():
            assert bool(torch.isfinite(t).all()), s.name


def _fixtures_with_weights():
    return sorted(p for p in GOLDEN.glob("*.json") if '"weights_specs": [\n' in p.read_text())


def test_golden_round_trip():
    """A fixture's sidecar regenerates exactly the weights listed in it, as deterministic_state_dict does."""
    cands = [
        p for p in _fixtures_with_weights() if sum(math.prod(s) for _, s, _ in load_golden(p)[1]["weights_specs"]) < 5e6
    ]
    if not cands:
        pytest.fail("no golden fixture with weights under 5e6 elements in tests/golden")
    tensors, meta = load_golden(cands[0].with_suffix(""))
    assert tensors, "fixture has no tensors"
    sd = golden_state_dict(meta)
    assert [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in sd.items()] == meta["weights_specs"]
    again = golden_state_dict(meta)
    assert all(_bytes(sd[k]) == _bytes(again[k]) for k in sd)
    half = golden_state_dict(meta, dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in half.values() if v.is_floating_point())
