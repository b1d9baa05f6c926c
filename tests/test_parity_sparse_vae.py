"""Parity of the sparse stack with the original Direct3D-S2 (golden fixtures from tests/golden, made by
running DreamTechAI/Direct3D-S2 @ a1cf235 on CPU; see tests/golden/README.md).

Tolerances and why:
* conv, fp32: the original ran spconv's native CPU algorithm (per-offset GEMMs, fp32), we do one
  [rows, 27*Cin] GEMM -> same products, different summation order: 1e-5 abs/rel on O(1) values.
* downsample / subdivide: pure data movement plus an fp64 sum cast to fp32 -> exact (coords) and
  exact or 1 ulp (feats, the fp64 sums may associate differently): 1e-6.
* VAE decoders, fp16 end to end as released (fixtures: the original on CPU, spconv stand-in for
  torchsparse, exact fp32-softmax stand-in for flash-attn): relative RMS < 3e-3 and max abs < 1e-3 on
  the tanh SDF, < 5e-3 on the 32-ch features; measured 8.4e-4 / 1.7e-4 / 1.5e-3, i.e. about one fp16
  rounding (eps 9.8e-4) from GEMMs that sum in another order. Coordinates must match exactly, in order.
"""

import pytest
import torch
from conftest import golden

from s2core.sparse import SparseConv3d, SparseTensor, sparse_downsample, sparse_subdivide
from s2core.testing import golden_state_dict

_fixture = golden


def _rel_rms(a, b):
    return ((a.double() - b.double()).pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt().clamp_min(1e-30)).item()


def _conv_from_fixture(meta):
    p = meta["config"]["params"]
    conv = SparseConv3d(p["in_channels"], p["out_channels"], p["kernel_size"])
    conv.load_state_dict(golden_state_dict(meta), strict=True)
    return conv


@pytest.mark.parametrize("name", ["sparse_conv__k3", "sparse_conv__k1"])
def test_conv_matches_original(name):
    t, meta = _fixture(name)
    conv = _conv_from_fixture(meta)
    with torch.no_grad():
        out = conv(SparseTensor(t["in.feats"], t["in.coords"])).feats
    torch.testing.assert_close(out, t["out.feats"], atol=1e-5, rtol=1e-5)


def test_conv_parity_fails_with_two_kernel_slices_swapped():
    # negative control: the one-neighbour probes in batch 0 make every tap observable
    t, meta = _fixture("sparse_conv__k3")
    conv = _conv_from_fixture(meta)
    with torch.no_grad():
        k = conv.conv.kernel
        k[[4, 22]] = k[[22, 4]]  # off(4) = (0,0,-1) <-> off(22) = (0,0,+1): a z flip
        out = conv(SparseTensor(t["in.feats"], t["in.coords"])).feats
    assert not torch.allclose(out, t["out.feats"], atol=1e-3, rtol=1e-3)


def test_downsample_matches_original():
    t, meta = _fixture("sparse_downsample__mean")
    x = SparseTensor(t["in.feats"], t["in.coords"])
    for f in meta["config"]["params"]["factor"]:
        y = sparse_downsample(x, f)
        assert torch.equal(y.coords, t[f"out.f{f}_coords"]), f"factor {f}"
        torch.testing.assert_close(y.feats, t[f"out.f{f}_feats"], atol=1e-6, rtol=1e-6)


def test_subdivide_matches_original():
    t, _ = _fixture("sparse_subdivide__x2")
    y = sparse_subdivide(SparseTensor(t["in.feats"], t["in.coords"]))
    assert torch.equal(y.coords, t["out.coords"]) and torch.equal(y.feats, t["out.feats"])


def _vae_from_fixture(meta):
    from dataclasses import fields

    from s2core.config import SparseVAEConfig
    from s2core.sparse_vae import SparseSDFVAE

    p = meta["config"]["params"]
    cfg = SparseVAEConfig(**{f.name: p[f.name] for f in fields(SparseVAEConfig) if f.name in p})
    vae = SparseSDFVAE(cfg).eval()
    vae.load_state_dict(golden_state_dict(meta), strict=True)
    return vae


# fp16 end to end (the released precision), on CPU like the fixtures: measured rel RMS 8.4e-4 (sdf),
# 1.5e-3 (features), max abs 1.7e-4 — one fp16 rounding (eps 9.8e-4) apart. Bounds leave ~3x margin;
# a wrong tap, shift, window or chunk bound moves them by orders of magnitude (see the negative test).
SDF_REL_RMS, FEAT_REL_RMS, SDF_MAX_ABS = 3e-3, 5e-3, 1e-3


def _decode(name, tamper=None):
    t, meta = _fixture(name)
    vae = _vae_from_fixture(meta)
    if tamper is not None:
        with torch.no_grad():
            tamper(vae)
    with torch.no_grad():
        chunked = vae.cfg.chunk_size > 1
        out = vae.decode(SparseTensor(t["in.latent"], t["in.coords"]), factor=1.0, return_feat=not chunked)
    return t, (out, None) if chunked else out


def test_vae_512_decode_matches_original():
    t, (sdf, feat) = _decode("sparse_vae_512__decode")
    assert torch.equal(sdf.coords, t["out.coords"])  # subdivide order, parent-major
    assert sdf.feats.dtype == torch.float16
    assert _rel_rms(sdf.feats, t["out.sdf"]) < SDF_REL_RMS
    assert (sdf.feats.float() - t["out.sdf"].float()).abs().max() < SDF_MAX_ABS
    rows = t["mid.feat_rows"].long()
    assert _rel_rms(feat.feats[rows], t["mid.feat_sub"]) < FEAT_REL_RMS


def test_vae_1024_chunked_decode_matches_original_including_seams():
    t, (sdf, _) = _decode("sparse_vae_1024__decode_chunked")
    # same rows in the same order: chunk by chunk, with the original's duplicated seam layers
    assert torch.equal(sdf.coords, t["out.coords"])
    assert torch.unique(sdf.coords, dim=0).shape[0] < sdf.coords.shape[0]
    assert _rel_rms(sdf.feats, t["out.sdf"]) < SDF_REL_RMS
    assert (sdf.feats.float() - t["out.sdf"].float()).abs().max() < SDF_MAX_ABS


def test_vae_parity_fails_with_two_kernel_slices_swapped():
    def swap(vae):
        k = vae.decoder.upsample[1].act_layers[0].conv.kernel
        k[[12, 14]] = k[[14, 12]]  # off(12) = (-1,0,0) <-> off(14) = (+1,0,0): an x flip

    t, (sdf, _) = _decode("sparse_vae_512__decode", swap)
    assert _rel_rms(sdf.feats, t["out.sdf"]) > 10 * SDF_REL_RMS


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["sparse_vae_512__decode", "sparse_vae_1024__decode_chunked"])
def test_vae_decode_on_cuda_matches_original(name):
    # same fp16 model on the GPU (cuBLAS / SDPA kernels) against the CPU fixture: same bounds
    t, meta = _fixture(name)
    vae = _vae_from_fixture(meta).cuda()
    with torch.no_grad():
        sdf = vae.decode(SparseTensor(t["in.latent"].cuda(), t["in.coords"].cuda()), factor=1.0)
    sdf = sdf[0] if isinstance(sdf, tuple) else sdf
    assert torch.equal(sdf.coords.cpu(), t["out.coords"])
    assert _rel_rms(sdf.feats.cpu(), t["out.sdf"]) < SDF_REL_RMS
