"""Sparse SDF VAE structure (s2core/sparse_vae.py): strict loading, shapes, chunked-decode seams.

Numerical parity with the original lives in tests/test_parity_sparse_vae.py (golden fixtures).
"""

from dataclasses import replace

import pytest
import torch

from s2core.config import SparseVAEConfig, tiny_release
from s2core.manifest import manifest
from s2core.sparse import SparseTensor
from s2core.sparse_vae import SparseSDFVAE, absolute_position_embedding
from s2core.testing import deterministic_state_dict


@pytest.mark.parametrize(
    "key,cfg",
    [
        ("model_sparse_512.vae", SparseVAEConfig()),
        ("model_sparse_1024.vae", SparseVAEConfig(resolution=128, chunk_size=4)),
    ],
    ids=["512", "1024"],
)
def test_official_keys_shapes_dtypes_and_strict_load(key, cfg):
    with torch.device("meta"):
        vae = SparseSDFVAE(cfg)
    ours = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in vae.state_dict().items()}
    want = {s.name: (tuple(s.shape), s.dtype) for s in manifest(key)}
    assert ours == want
    if key.endswith("512.vae"):  # one real strict load (37.9 M params) is enough
        vae = SparseSDFVAE(cfg)
        vae.load_state_dict(deterministic_state_dict(key), strict=True)


def test_ape_layout():
    pos = torch.tensor([[1.0, 2.0, 3.0]])
    emb = absolute_position_embedding(pos, 16)  # F = 2: [sin x f0, sin x f1, cos x f0, cos x f1, ... y, z], 4 zeros
    f = torch.tensor([1.0, 0.01])
    want = torch.cat([torch.cat([torch.sin(p * f), torch.cos(p * f)]) for p in (1.0, 2.0, 3.0)] + [torch.zeros(4)])
    torch.testing.assert_close(emb[0], want)


def _latent(g, cfg, n, batch=1):
    rows = []
    for b in range(batch):
        flat = torch.randperm(cfg.resolution**3, generator=g)[:n]
        r = cfg.resolution
        rows.append(torch.cat([torch.full((n, 1), b), torch.stack([flat // (r * r), flat // r % r, flat % r], 1)], 1))
    coords = torch.cat(rows).int()
    return SparseTensor(torch.randn(coords.shape[0], cfg.embed_dim, generator=g), coords)


def _tiny_vae(cfg):
    vae = SparseSDFVAE(cfg).eval()
    vae.load_state_dict(deterministic_state_dict(vae, seed=3))
    return vae


def test_decode_shapes_and_children():
    cfg = tiny_release().sparse_vae_512
    vae = _tiny_vae(cfg)
    lat = _latent(torch.Generator().manual_seed(0), cfg, 20, batch=2)
    with torch.no_grad():
        sdf, feat = vae.decode(lat, return_feat=True)
    assert sdf.feats.shape == (40 * 512, 1) and feat.feats.shape == (40 * 512, cfg.model_channels_decoder // 16)
    assert sdf.feats.abs().max() < 1 and sdf.offsets.tolist() == [0, 20 * 512, 40 * 512]
    assert torch.equal(
        torch.div(sdf.coords[:, 1:], 8, rounding_mode="floor"), lat.coords[:, 1:].repeat_interleave(512, 0)
    )


def test_chunked_decode_equals_unchunked_with_seam_duplicates():
    cfg = replace(tiny_release().sparse_vae_1024, resolution=32)  # chunk_size 2 -> chunks of 16 cells
    vae = _tiny_vae(cfg)
    g = torch.Generator().manual_seed(1)
    lat = _latent(g, cfg, 60)
    # put tokens right at the seam x = 15 | 16 so the 7-voxel overlap shows up
    lat.coords[:4, 1] = torch.tensor([15, 15, 16, 16], dtype=torch.int32)
    lat.coords[:4, 2:] = torch.tensor([[3, 3], [4, 4], [3, 3], [5, 5]], dtype=torch.int32)
    lat = SparseTensor(lat.feats, lat.coords)
    unchunked = _tiny_vae(replace(cfg, chunk_size=1))
    with torch.no_grad():
        out = vae.decode(lat)
        ref = unchunked.decode(lat)
    keys = lambda c: (c[:, 1].long() * 256 + c[:, 2]) * 256 + c[:, 3]
    ref_map = dict(zip(keys(ref.coords).tolist(), ref.feats[:, 0].tolist()))
    got = keys(out.coords).tolist()
    assert set(got) == set(ref_map)  # same voxels...
    assert len(got) > len(set(got))  # ...with duplicates at the seams, as the original
    # a chunk keeps fine voxels up to 7 past its own range, so every duplicate lies in [128, 135) on some axis
    _, inv, counts = torch.unique(keys(out.coords), return_inverse=True, return_counts=True)
    dup = out.coords[counts[inv] > 1, 1:]
    assert dup.numel() and ((dup >= 128) & (dup < 135)).any(1).all()
    torch.testing.assert_close(out.feats[:, 0], torch.tensor([ref_map[k] for k in got]), atol=1e-5, rtol=1e-5)


def test_encoder_roundtrip_shapes():
    cfg = tiny_release().sparse_vae_512
    vae = _tiny_vae(cfg)
    g = torch.Generator().manual_seed(2)
    coords = torch.cat([torch.zeros(300, 1), torch.randint(0, 128, (300, 3), generator=g)], 1).int()
    coords = torch.unique(coords, dim=0)
    with torch.no_grad():
        z = vae.encode(SparseTensor(torch.randn(coords.shape[0], 1, generator=g), coords))
    assert z.feats.shape[1] == cfg.embed_dim
    assert torch.equal(z.coords, torch.unique(torch.cat([coords[:, :1], coords[:, 1:] // 8], 1), dim=0))
