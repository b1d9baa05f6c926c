"""The golden-fixture harness itself: complete sidecars, reproducible weights, and fixtures that can fail.

Fixtures come from the ORIGINAL code via tools/golden/make_golden.py (see tests/golden/README.md); model
parity tests live beside each model. Here: (i) every sidecar honours the contract, (ii) golden_state_dict
rebuilds the listed weights, (iii) a fixture's computation re-stated in a few lines of torch matches, and
stops matching when one weight is perturbed, (iv) the flash_attn stand-in the sparse fixtures were made
with equals plain attention.
"""

import importlib.util
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import GOLDEN, REPO, golden

from s2core.testing import golden_state_dict, load_golden

REQUIRED = {
    "component": str,
    "config_name": str,
    "config": dict,
    "seed": (int, type(None)),
    "weights_specs": list,
    "input_seed": (int, type(None)),
    "dtype": str,
    "device": str,
    "upstream_commit": str,
    "command": str,
    "date": str,
    "stand_ins": dict,
    "tensors": dict,
    "notes": str,
}
SIDECARS = sorted(GOLDEN.glob("*.json"))


def _rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_fixtures_exist():
    assert SIDECARS, f"no golden fixtures in {GOLDEN}; run tools/golden/make_golden.py"


@pytest.mark.parametrize("sidecar", SIDECARS, ids=lambda p: p.stem)
def test_sidecar_complete(sidecar):
    meta = json.loads(sidecar.read_text())
    for key, typ in REQUIRED.items():
        assert key in meta, f"{sidecar.name} lacks '{key}'"
        assert isinstance(meta[key], typ), f"{sidecar.name}: '{key}' is {type(meta[key]).__name__}"
    assert sidecar.stem == f"{meta['component']}__{meta['config_name']}"
    assert re.fullmatch(r"[0-9a-f]{40}", meta["upstream_commit"]), meta["upstream_commit"]
    assert "make_golden.py" in meta["command"]
    assert all(isinstance(v, str) and v for v in meta["stand_ins"].values()), "every stand-in needs its reason"
    if meta["weights_specs"]:
        assert meta["seed"] is not None, "weights without a seed cannot be rebuilt"
        for name, shape, dtype in meta["weights_specs"]:
            assert isinstance(name, str) and all(isinstance(s, int) for s in shape)
            assert isinstance(getattr(torch, dtype), torch.dtype)
    tensors, _ = load_golden(sidecar.with_suffix(""))
    assert set(tensors) == set(meta["tensors"]), "every stored tensor needs exactly one description"
    assert all(k.split(".", 1)[0] in ("in", "out", "mid") for k in tensors)
    assert any(k.startswith("out.") for k in tensors), "a fixture pins at least one output"


WEIGHTED = [p for p in SIDECARS if json.loads(p.read_text())["weights_specs"]]  # not scheduler/index ops


@pytest.mark.parametrize("sidecar", WEIGHTED, ids=lambda p: p.stem)
def test_golden_weights_match_specs(sidecar):
    """Fixtures up to 1e7 weight elements are rebuilt whole; larger ones (full DINOv2/VAE) on their
    first 40 entries and largest entry, to keep this file under 15 s on a CI CPU."""
    meta = json.loads(sidecar.read_text())
    specs = meta["weights_specs"]
    if sum(math.prod(s) for _, s, _ in specs) > 1e7:
        biggest = max(specs, key=lambda s: math.prod(s[1]))
        meta = dict(meta, weights_specs=specs[:40] + ([biggest] if biggest not in specs[:40] else []))
    sd = golden_state_dict(meta)
    got = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in sd.items()]
    assert got == meta["weights_specs"]


# Fixtures of a checkpoint part use its manifest names, so golden weights = deterministic_state_dict(manifest)
# restricted to those names: a module built from the manifest gets the very values the original had.
MANIFEST_OF = {
    "dense_vae_decode": "model_dense.vae",
    "dense_vae_encode": "model_dense.vae",
    "dense_dit": "model_dense.dit",
    "dinov2": "dinov2_vitl14_reg4",
}


@pytest.mark.parametrize("sidecar", [p for p in SIDECARS if p.stem.split("__")[0] in MANIFEST_OF], ids=lambda p: p.stem)
def test_weights_use_manifest_names(sidecar):
    from s2core.manifest import manifest

    meta = json.loads(sidecar.read_text())
    man = {s.name: (list(s.shape), s.dtype) for s in manifest(MANIFEST_OF[meta["component"]])}
    specs = meta["weights_specs"]
    assert [n for n, _, _ in specs if n not in man] == [], "names the manifest does not know"
    assert [n for n, shape, _ in specs if man[n][0] != shape] == [], "shapes differ from the manifest"
    assert [n for n in man if n in {s[0] for s in specs}] == [s[0] for s in specs], "order differs"
    if meta["config_name"] == "official":
        assert len(specs) == len(man) and all(man[n][1] == d for n, _, d in specs)


# ---- (iii) the harness can fail: re-state dense_dit_t_embedder__fp32 in plain torch ------------------


def _t_embedder(sd, t):
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    h = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    h = F.silu(F.linear(h, sd["mlp.0.weight"], sd["mlp.0.bias"]))
    return F.linear(h, sd["mlp.2.weight"], sd["mlp.2.bias"])


_load = golden


def test_fixture_reproduced_and_perturbation_detected():
    tensors, meta = _load("dense_dit_t_embedder__fp32")
    sd = golden_state_dict(meta)
    ref = tensors["out.t_emb"]
    # fp32 Linear + sin/cos: only summation order differs from the original.
    assert _rel_err(_t_embedder(sd, tensors["in.t"]), ref) < 1e-5

    bumped = dict(sd, **{"mlp.2.weight": sd["mlp.2.weight"].clone()})
    bumped["mlp.2.weight"][7, 3] += 0.05  # one weight of 1.3 M
    out = _t_embedder(bumped, tensors["in.t"])
    assert (out - ref).abs().max().item() > 1e-3, "a perturbed weight went unnoticed"
    assert _rel_err(out, ref) > 1e-5, "the tolerance above would not catch one wrong weight"

    other_seed = golden_state_dict(dict(meta, seed=meta["seed"] + 1))
    assert _rel_err(_t_embedder(other_seed, tensors["in.t"]), ref) > 0.1, "weights seed not honoured"


def test_sort_block_fixture_is_block_major():
    """Independent statement of sort_block: stable sorts from the least to the most significant key."""
    tensors, meta = _load("sort_block__r64")
    idx = tensors["in.latent_index"]
    for bs, key in ((8, "out.latent_index_b8"), (4, "out.latent_index_b4")):
        keys = [idx[:, 3] % bs, idx[:, 2] % bs, idx[:, 1] % bs, idx[:, 3] // bs, idx[:, 2] // bs, idx[:, 1] // bs]
        order = torch.arange(len(idx))
        for k in keys:
            order = order[torch.sort(k[order], stable=True).indices]
        assert torch.equal(idx[order], tensors[key])
        assert not torch.equal(idx, tensors[key]), "a no-op sort would pass"


# ---- (iv) the flash_attn stand-in used for the sparse fixtures ---------------------------------------


def _harness():
    spec = importlib.util.spec_from_file_location("golden_harness", REPO / "tools" / "golden" / "harness.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # importing it installs nothing; install_stand_ins() is never called here
    return mod


@pytest.mark.parametrize("H,Hk", [(4, 4), (8, 2)], ids=["MHA-H4", "GQA-H8-Hk2"])
def test_flash_attn_stand_in_matches_sdpa(H, Hk):
    fa = _harness()._make_flash_attn()
    g = torch.Generator().manual_seed(0)
    lens = [5, 1, 17]
    cu = torch.tensor([0, 5, 6, 23], dtype=torch.int32)
    q = torch.randn(23, H, 16, generator=g)
    k = torch.randn(23, Hk, 16, generator=g)
    v = torch.randn(23, Hk, 16, generator=g)
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu, cu, 17, 17, return_attn_probs=True)
    assert lse.shape == (H, 23) and lse.dtype == torch.float32
    for i in range(len(lens)):
        s = slice(int(cu[i]), int(cu[i + 1]))
        kk = k[s].repeat_interleave(H // Hk, dim=1)  # query head h reads kv head h // (H / Hk)
        vv = v[s].repeat_interleave(H // Hk, dim=1)
        ref = F.scaled_dot_product_attention(q[s].transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1))
        assert torch.allclose(out[s], ref.transpose(0, 1), atol=1e-5)
        scores = torch.einsum("qhd,khd->hqk", q[s], kk) / 4.0
        assert torch.allclose(lse[:, s], torch.logsumexp(scores, -1), atol=1e-5)
    batched = fa.flash_attn_func(q[None, 6:23], k[None, 6:23], v[None, 6:23])
    assert torch.allclose(batched[0], out[6:23], atol=1e-6)
