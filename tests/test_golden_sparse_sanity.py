"""Sanity of the sparse golden fixtures (tools/golden/gen_sparse.py): complete sidecars, official weight
names/shapes, and the single-layer fixtures re-derived from SPARSE.md semantics with a tiny reference
written here. The conv check is what proves that the spconv run of the original saw our torchsparse-layout
weights correctly permuted: a slice-swap of the kernel must break it."""

import json

import pytest
import torch
from conftest import GOLDEN, MANIFESTS, golden, golden_path

from s2core.manifest import read_manifest_tsv
from s2core.testing import golden_state_dict

SPARSE_FIXTURES = [
    "sparse_conv__k3",
    "sparse_conv__k1",
    "sparse_downsample__mean",
    "sparse_subdivide__x2",
    "ssa__v11_512",
    "ssa__v11_512_shift4",
    "ssa__v10_1024",
    "sparse_dit_512__v11_2blocks",
    "sparse_dit_1024__v11_2blocks",
    "sparse_dit_512__v11_2blocks_fewblocks",
    "sparse_dit_1024__v11_2blocks_fewblocks",
    "sparse_vae_512__decode",
    "sparse_vae_1024__decode_chunked",
    "refiner__cube16",
    "refiner_1024__cube32",
]
REQUIRED = (
    "component",
    "config_name",
    "config",
    "seed",
    "weights_specs",
    "input_seed",
    "dtype",
    "device",
    "upstream_commit",
    "command",
    "date",
    "stand_ins",
    "tensors",
    "notes",
)

# fixture -> (manifest, prefix prepended to the fixture's names, whole manifest expected?)
MANIFEST_OF = {
    "ssa__v11_512": ("model_sparse_512.dit.tsv", "blocks.0.self_attn.", False),
    "ssa__v11_512_shift4": ("model_sparse_512.dit.tsv", "blocks.1.self_attn.", False),
    "ssa__v10_1024": ("v1_0/model_sparse_1024.dit.tsv", "blocks.0.self_attn.", False),
    "sparse_dit_512__v11_2blocks": ("model_sparse_512.dit.tsv", "", False),
    "sparse_dit_1024__v11_2blocks": ("model_sparse_1024.dit.tsv", "", False),
    "sparse_dit_512__v11_2blocks_fewblocks": ("model_sparse_512.dit.tsv", "", False),
    "sparse_dit_1024__v11_2blocks_fewblocks": ("model_sparse_1024.dit.tsv", "", False),
    "sparse_vae_512__decode": ("model_sparse_512.vae.tsv", "", True),
    "sparse_vae_1024__decode_chunked": ("model_sparse_1024.vae.tsv", "", True),
    "refiner__cube16": ("model_refiner.refiner.tsv", "", True),
    "refiner_1024__cube32": ("model_refiner_1024.refiner.tsv", "", True),
}


@pytest.mark.parametrize("name", SPARSE_FIXTURES)
def test_sidecar_complete(name):
    meta = json.loads(golden_path(name).with_suffix(".json").read_text())  # a missing fixture fails
    assert all(k in meta for k in REQUIRED), [k for k in REQUIRED if k not in meta]
    assert f"{meta['component']}__{meta['config_name']}" == name
    from safetensors import safe_open

    with safe_open(str(GOLDEN / f"{name}.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(meta["tensors"]), keys ^ set(meta["tensors"])
    assert all(k.startswith(("in.", "out.", "mid.")) for k in keys)
    if meta["component"] == "sparse_conv":  # model fixtures are checked against the manifests below
        assert [n for n, _, _ in meta["weights_specs"]] == ["conv.kernel", "conv.bias"]


@pytest.mark.parametrize("name", sorted(MANIFEST_OF))
def test_weights_specs_are_official(name):
    meta = json.loads(golden_path(name).with_suffix(".json").read_text())
    tsv, prefix, whole = MANIFEST_OF[name]
    official = {s.name: (tuple(s.shape), s.dtype) for s in read_manifest_tsv(MANIFESTS / tsv)}
    mine = {prefix + n: (tuple(s), d) for n, s, d in meta["weights_specs"]}
    assert mine, "no weights recorded"
    wrong = {n: (v, official.get(n)) for n, v in mine.items() if official.get(n) != v}
    assert not wrong, wrong
    if whole:
        assert set(mine) == set(official)


# ---------------------------------------------------------------------------------------------
# Tiny references (torchsparse semantics, SPARSE.md sections 2.1-2.4)


def _subm_conv_reference(feats, coords, kernel, bias):
    """out[p] = bias + sum_k [p + off(k) active] in[p + off(k)] @ kernel[k], k = (dx+1) + 3(dy+1) + 9(dz+1)."""
    index = {tuple(c): i for i, c in enumerate(coords.tolist())}
    out = bias.double().repeat(len(coords), 1)
    for k in range(27):
        d = (k % 3 - 1, k // 3 % 3 - 1, k // 9 - 1)
        src = [index.get((b, x + d[0], y + d[1], z + d[2]), -1) for b, x, y, z in coords.tolist()]
        src = torch.tensor(src)
        hit = src >= 0
        out[hit] += feats[src[hit]].double() @ kernel[k].double()
    return out


_load = golden


def test_conv3x3_fixture_matches_torchsparse_semantics():
    t, meta = _load("sparse_conv__k3")
    w = golden_state_dict(meta)
    ref = _subm_conv_reference(t["in.feats"], t["in.coords"], w["conv.kernel"], w["conv.bias"])
    assert t["out.feats"].shape == ref.shape
    err = (t["out.feats"].double() - ref).abs().max().item()
    assert err < 1e-4, err  # fp32 GEMMs of 27*6 terms vs a float64 reference

    # every one of the 27 slices is pinned: swapping any pair breaks the probes
    for a, b in [(0, 26), (12, 14), (4, 22), (10, 16)]:
        k = w["conv.kernel"].clone()
        k[[a, b]] = k[[b, a]]
        bad = _subm_conv_reference(t["in.feats"], t["in.coords"], k, w["conv.bias"])
        assert (t["out.feats"].double() - bad).abs().max().item() > 1e-2, (a, b)


def test_conv1x1_fixture_is_a_matmul():
    t, meta = _load("sparse_conv__k1")
    w = golden_state_dict(meta)
    assert w["conv.kernel"].shape == (6, 5)
    ref = t["in.feats"].double() @ w["conv.kernel"].double() + w["conv.bias"].double()
    assert (t["out.feats"].double() - ref).abs().max().item() < 1e-5


def test_downsample_fixture_is_sum_over_n_plus_one():
    t, _ = _load("sparse_downsample__mean")
    x, c = t["in.feats"].double(), t["in.coords"].long()
    for f in (2, 4, 8):
        parent = torch.cat([c[:, :1], c[:, 1:] // f], 1)
        uniq, inv = torch.unique(parent, dim=0, return_inverse=True)  # lexicographic (b, x, y, z)
        s = torch.zeros(len(uniq), x.shape[1], dtype=torch.float64).index_add_(0, inv, x)
        n = torch.bincount(inv, minlength=len(uniq)).double()[:, None]
        assert torch.equal(t[f"out.f{f}_coords"].long(), uniq)
        assert (t[f"out.f{f}_feats"].double() - s / (n + 1)).abs().max().item() < 1e-6
        # and the true mean would NOT match (the quirk is real)
        assert (t[f"out.f{f}_feats"].double() - s / n).abs().max().item() > 1e-3


def test_subdivide_fixture_order():
    t, _ = _load("sparse_subdivide__x2")
    c = t["in.coords"].long()
    o = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)])
    child = torch.cat([c[:, None, :1].expand(-1, 8, 1), 2 * c[:, None, 1:] + o[None]], 2).reshape(-1, 4)
    assert torch.equal(t["out.coords"].long(), child)
    assert torch.equal(t["out.feats"], t["in.feats"].repeat_interleave(8, 0))


# ---------------------------------------------------------------------------------------------
# SSA fixtures are self-consistent: each recorded branch is recomputed here from in.feats, the golden
# weights and (for selection) the recorded top-k, with dense masked attention in fp32. This proves the
# original's Triton kernels ran correctly under TRITON_INTERPRET and the stand-ins did what they claim.
# Tolerance: the original works in fp16 (q/k/v projections, fp16 outputs), the reference in fp32 from the
# same fp16 values, so differences are a few fp16 ulps of values of magnitude <= ~5.


def _ssa_inputs(t, meta):
    w = {k: v.float() for k, v in golden_state_dict(meta).items()}
    x, c = t["in.feats"].float(), t["in.coords"].long()
    # the original's projections output fp16: round like it does, then attend in fp32
    q = (x @ w["proj_q.weight"].T).half().float().view(-1, 32, 32)
    k = (x @ w["proj_k.weight"].T).half().float().view(-1, 2, 32)
    v = (x @ w["proj_v.weight"].T).half().float().view(-1, 2, 32)
    return w, x, c, q, k, v


def _masked_attention(q, k, v, allowed):
    """q [N,32,d], k/v [M,2,d], allowed [2 or 1, N, M] bool -> out [N,32,d], lse [32,N] (GQA h -> h // 16)."""
    kk, vv = k.repeat_interleave(16, 1), v.repeat_interleave(16, 1)
    s = torch.einsum("nhd,mhd->hnm", q, kk) / 32**0.5
    mask = allowed.repeat_interleave(16, 0) if allowed.shape[0] == 2 else allowed
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.einsum("hnm,mhd->nhd", torch.softmax(s, -1), vv), lse


def _close(a, b, atol, rtol=4e-3):
    """|a - b| <= atol + rtol |b| everywhere (rtol = 4 fp16 ulps: outputs reach magnitude ~16)."""
    a, b = a.float(), b.float()
    excess = ((a - b).abs() - atol - rtol * b.abs()).max().item()
    assert excess <= 0, f"max |a-b| {(a - b).abs().max().item():.4g} exceeds {atol} + {rtol}|b| by {excess:.4g}"


@pytest.mark.parametrize("name", ["ssa__v11_512", "ssa__v10_1024"])
def test_ssa_fixture_branches_recompute(name):
    t, meta = _load(name)
    w, x, c, q, k, v = _ssa_inputs(t, meta)
    p = meta["config"]["params"]
    b = c[:, 0]
    same_sample = b[:, None] == b[None, :]

    # gates
    _close(torch.sigmoid(x @ w["gate.0.weight"].T), t["mid.gate"], 2e-3)

    # compressed attention on the recorded compressed keys/values (and, for v1, the compression itself)
    cc = t["mid.compressed_coords"].long()
    if p["compression_version"] == "v1":
        cbs = p["compression_block_size"]
        pe = w["intra_block_pe"][c[:, 1] % cbs, c[:, 2] % cbs, c[:, 3] % cbs]
        for key, feats in (("key", k.reshape(-1, 64) + pe), ("value", v.reshape(-1, 64))):
            h = torch.nn.functional.silu(
                feats @ w[f"compression_{key}.act_layers.0.conv.kernel"]
                + w[f"compression_{key}.act_layers.0.conv.bias"]
            )
            parent = torch.cat([c[:, :1], c[:, 1:] // cbs], 1)
            uniq, inv = torch.unique(parent, dim=0, return_inverse=True)
            assert torch.equal(uniq, cc)
            pooled = torch.zeros(len(uniq), 64).index_add_(0, inv, h) / (torch.bincount(inv)[:, None] + 1)
            _close(pooled.view(-1, 2, 32), t[f"mid.compressed_{key[0]}"], 2e-2)
    ck, cv = t["mid.compressed_k"].float(), t["mid.compressed_v"].float()
    o_cmp, lse = _masked_attention(q, ck, cv, (b[:, None] == cc[None, :, 0])[None])
    _close(o_cmp, t["mid.o_cmp"], 2e-2)
    _close(lse, t["mid.lse"], 2e-2)

    # block scores -> top-k (exactly reproducible from the recorded scores)
    score = t["mid.block_score"]
    topk = t["mid.block_topk"].long()
    sbs, cbs = p["selection_block_size"], p["compression_block_size"]
    M_off = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(cc[:, 0]).cumsum(0)])
    for s_idx in range(int(b.max()) + 1):
        rows = (b == s_idx).nonzero().squeeze(1)
        cells = cc[M_off[s_idx] : M_off[s_idx + 1]]
        sc = score[:, rows, : len(cells)]
        if sbs != cbs:  # v1.0: sum the cells of each selection block, occupied blocks in ascending order
            blk = cells[:, 1:] // (sbs // cbs)
            ub, binv = torch.unique(blk, dim=0, return_inverse=True)
            sc = torch.zeros(2, len(rows), len(ub)).index_add_(2, binv, sc)
        keff = min(p["topk"], sc.shape[-1])
        want = sc.topk(keff, -1).indices.sort(-1).values
        assert torch.equal(topk[:, rows, :keff], want)
        assert (topk[:, rows, keff:] == -1).all()

    # selection attention with the recorded top-k
    blk = torch.cat([c[:, :1], c[:, 1:] // sbs], 1)
    local = torch.empty(len(c), dtype=torch.long)
    for s_idx in range(int(b.max()) + 1):
        rows = (b == s_idx).nonzero().squeeze(1)
        local[rows] = torch.unique(blk[rows], dim=0, return_inverse=True)[1]
    chosen = (topk[:, :, :, None] == local[None, None, None, :]).any(2)  # [2, N, N]
    o_slc, _ = _masked_attention(q, k, v, chosen & same_sample[None])
    _close(o_slc, t["mid.o_slc"], 6e-2)  # the Triton kernel rounds the softmax numerators to fp16 before P.V

    # window attention (shift added to the coordinates)
    s = p["shift_window"]
    win = torch.cat([c[:, :1], (c[:, 1:] + s) // p["window_size"]], 1)
    same_win = (win[:, None, :] == win[None, :, :]).all(-1)
    o_win, _ = _masked_attention(q, k, v, same_win[None])
    _close(o_win, t["mid.o_win"], 6e-2)  # 1-ulp differences of fp16 q/k (|q| ~ 20) move peaked logits

    # output projection of the gated sum of the recorded branches
    g = t["mid.gate"].float()
    mix = (
        g[:, :1, None] * t["mid.o_cmp"].float()
        + g[:, 1:2, None] * t["mid.o_slc"].float()
        + g[:, 2:3, None] * t["mid.o_win"].float()
    )
    _close(mix.reshape(len(c), -1) @ w["proj_o.weight"].T, t["out.feats"], 5e-2)


def test_ssa_shift4_fixture_window_branch():
    t, meta = _load("ssa__v11_512_shift4")
    base, _ = _load("ssa__v11_512")
    assert meta["config"]["params"]["shift_window"] == 4
    for key in ("in.feats", "in.coords", "mid.block_topk", "mid.gate"):
        assert torch.equal(t[key], base[key]), key
    w, x, c, q, k, v = _ssa_inputs(t, meta)
    win = torch.cat([c[:, :1], (c[:, 1:] + 4) // 8], 1)
    o_win, _ = _masked_attention(q, k, v, (win[:, None, :] == win[None, :, :]).all(-1)[None])
    _close(o_win, t["mid.o_win"], 6e-2)  # 1-ulp differences of fp16 q/k (|q| ~ 20) move peaked logits
    assert (t["mid.o_win"].float() - base["mid.o_win"].float()).abs().max() > 0.1  # the shift matters here


def test_vae_1024_chunk_seams():
    """The chunked decode keeps up to 7 duplicated voxel layers per internal seam; both copies see the same
    padded neighbourhood, so they must agree, and every latent voxel must own all its 512 children."""
    t, _ = _load("sparse_vae_1024__decode_chunked")
    c, v = t["out.coords"].long(), t["out.sdf"].float()[:, 0]
    key = ((c[:, 0] * 1024 + c[:, 1]) * 1024 + c[:, 2]) * 1024 + c[:, 3]
    uniq, inv, counts = torch.unique(key, return_inverse=True, return_counts=True)
    assert counts.max() > 1, "the fixture should contain seam duplicates"
    lo = torch.full((len(uniq),), float("inf")).scatter_reduce(0, inv, v, "amin")
    hi = torch.full((len(uniq),), float("-inf")).scatter_reduce(0, inv, v, "amax")
    assert torch.equal(hi, lo)  # bitwise: identical inputs, same per-voxel tap order in both chunks
    lat = t["in.coords"].long()
    assert len(uniq) == 512 * len(lat)
    parents = torch.unique(torch.cat([c[:, :1], c[:, 1:] // 8], 1), dim=0)
    assert torch.equal(parents, torch.unique(lat, dim=0))
