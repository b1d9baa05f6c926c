"""The GPU stand-ins for torchsparse / flash_attn (tools/golden/standins_gpu.py) on their own: they must
compute what the real packages compute, because bench/bench_sparse_vae.py times the ORIGINAL decoder on
them. (Their agreement with the original end to end needs the original checkout, which CI lacks:
`python tools/golden/standins_gpu.py --check --upstream PATH` runs that against the golden fixtures.)

Tolerances: fp32 on CPU against fp64 brute-force references -> 1e-5 (summation order only).
"""

import importlib
import importlib.util
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from s2core.sparse.conv import sparse_conv3d_reference

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tools" / "golden"))
standins = importlib.import_module("standins_gpu")


def _voxels(n=150, batches=2, extent=7, seed=0):
    """[N, 4] int32 unique voxels in `batches` contiguous batch blocks (dense enough for every tap)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(batches):
        xyz = torch.unique(torch.randint(0, extent, (n, 3), generator=g), dim=0)
        out.append(torch.cat([torch.full((len(xyz), 1), b), xyz], 1))
    return torch.cat(out).int()


@pytest.mark.parametrize("k", [3, 1])
def test_torchsparse_conv3d_matches_bruteforce_submanifold(k):
    ts = standins.make_torchsparse()
    coords = _voxels()
    feats = torch.randn(len(coords), 6, generator=torch.Generator().manual_seed(1))
    # the original constructs it positionally: (in, out, kernel_size, stride, padding, dilation, bias)
    conv = ts["torchsparse.nn"].Conv3d(6, 5, k, 1, 1 if k == 3 else 0, 1, True)
    sd = conv.state_dict()
    assert list(sd) == ["kernel", "bias"]
    assert sd["kernel"].shape == ((27, 6, 5) if k == 3 else (6, 5)) and sd["bias"].shape == (5,)
    x = ts["torchsparse"].SparseTensor(feats, coords)
    with torch.no_grad():
        y = conv(x)
    assert y.C is coords and y.coords is coords  # submanifold: same set, same order
    assert tuple(conv.stride) == (1, 1, 1) and conv.out_channels == 5
    w, b = conv.kernel.detach(), conv.bias.detach()
    ref = sparse_conv3d_reference(feats, coords, w, b) if k == 3 else feats.double() @ w.double() + b.double()
    torch.testing.assert_close(y.F.double(), ref, atol=1e-5, rtol=1e-5)


def test_torchsparse_conv3d_tap_order_is_torchsparse_one():
    # one voxel with one neighbour at +x: only tap k = (dx+1) + 3(dy+1) + 9(dz+1) = 14 may carry it
    ts = standins.make_torchsparse()
    conv = ts["torchsparse.nn"].Conv3d(1, 1, 3, bias=False)
    with torch.no_grad():
        conv.kernel.zero_()
        conv.kernel[14] = 1.0
        coords = torch.tensor([[0, 4, 4, 4], [0, 5, 4, 4]], dtype=torch.int32)
        y = conv(ts["torchsparse"].SparseTensor(torch.tensor([[2.0], [7.0]]), coords))
    assert y.F[:, 0].tolist() == [7.0, 0.0]  # out[p] += in[p + off(14)] = in[(5,4,4)]


def test_torchsparse_caches_are_shared_along_a_conv_chain():
    ts = standins.make_torchsparse()
    coords = _voxels(60, 1)
    x = ts["torchsparse"].SparseTensor(torch.randn(len(coords), 4), coords)
    c1, c2 = ts["torchsparse.nn"].Conv3d(4, 4, 3, bias=True), ts["torchsparse.nn"].Conv3d(4, 4, 3, bias=True)
    with torch.no_grad():
        y = c1(x)
        nbr = x._caches["s2core"]["kernel_map_3"]
        z = c2(y)
    assert y._caches is x._caches and z._caches is x._caches
    assert z._caches["s2core"]["kernel_map_3"] is nbr  # built once per coordinate set, as torchsparse's kmap


def test_torchsparse_functional_and_ntuple():
    ts = standins.make_torchsparse()
    assert ts["torchsparse.utils"].make_ntuple(3, ndim=3) == (3, 3, 3)
    assert ts["torchsparse.utils"].make_ntuple([1, 2, 3], 3) == (1, 2, 3)
    coords = _voxels(40, 1)
    feats = torch.randn(len(coords), 3)
    w, b = torch.randn(27, 3, 2), torch.randn(2)
    x = ts["torchsparse"].SparseTensor(feats, coords)
    y = ts["torchsparse.nn.functional"].conv3d(
        x, w, kernel_size=(3, 3, 3), bias=b, stride=(1, 1, 1), padding=(1, 1, 1), dilation=1
    )
    torch.testing.assert_close(y.F.double(), sparse_conv3d_reference(feats, coords, w, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(stride=2), dict(dilation=2), dict(transposed=True), dict(kernel_size=5)])
def test_torchsparse_rejects_what_it_does_not_implement(kw):
    ts = standins.make_torchsparse()
    args = dict(kernel_size=3)
    args.update(kw)
    conv = ts["torchsparse.nn"].Conv3d(2, 2, bias=True, **args)
    coords = _voxels(20, 1)
    with pytest.raises(NotImplementedError, match="only does stride-1 submanifold"):
        conv(ts["torchsparse"].SparseTensor(torch.randn(len(coords), 2), coords))


# ---------------------------------------------------------------------------------------------------
# flash_attn


def _softmax_ref(q, k, v, cu_q, cu_k, scale):
    """Per sequence, fp64: softmax(q k^T * scale) v with GQA head h -> kv head h // (H/Hk); and lse [H, Nq]."""
    h, hk = q.shape[1], k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((h, q.shape[0]), float("-inf"), dtype=torch.float64)
    for i in range(len(cu_q) - 1):
        qs, ks, vs = (
            q[cu_q[i] : cu_q[i + 1]].double(),
            k[cu_k[i] : cu_k[i + 1]].double(),
            v[cu_k[i] : cu_k[i + 1]].double(),
        )
        if len(ks) == 0:
            continue
        ks, vs = ks.repeat_interleave(h // hk, 1), vs.repeat_interleave(h // hk, 1)
        s = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        out[cu_q[i] : cu_q[i + 1]] = torch.einsum("hqk,khd->qhd", s.softmax(-1), vs)
        lse[:, cu_q[i] : cu_q[i + 1]] = s.logsumexp(-1)
    return out, lse


def _ragged(lens_q, lens_k, h=4, hk=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), h, d, generator=g)
    k = torch.randn(int(cu_k[-1]), hk, d, generator=g)
    v = torch.randn(int(cu_k[-1]), hk, d, generator=g)
    return q, k, v, cu_q, cu_k


# lengths span the 16 / 32 / 64 / 128 buckets, in mixed order, with one sequence that has no keys
LENS_Q, LENS_K = [1, 40, 5, 100, 17, 3, 8], [2, 33, 5, 90, 0, 70, 8]


def test_flash_attn_varlen_matches_softmax_reference_across_buckets():
    fa = standins.make_flash_attn()
    q, k, v, cu_q, cu_k = _ragged(LENS_Q, LENS_K)
    ref, ref_lse = _softmax_ref(q, k, v, cu_q.tolist(), cu_k.tolist(), 0.3)
    out = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(LENS_Q), max(LENS_K), softmax_scale=0.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    out2, lse, _ = fa.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(LENS_Q), max(LENS_K), softmax_scale=0.3, return_attn_probs=True
    )
    assert lse.shape == (4, q.shape[0]) and lse.dtype == torch.float32
    torch.testing.assert_close(out2.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_flash_attn_lse_path_in_query_chunks_matches_reference(monkeypatch):
    # SSA's compressed attention sends every token as a query: the lse path must work in query chunks (here
    # 4 heads x 90 keys x 4 B = 1440 B per query, so a 5 kB budget cuts the 100-query sequence into 3-query chunks)
    monkeypatch.setattr(standins, "LSE_CHUNK_BYTES", 5000)
    fa = standins.make_flash_attn()
    q, k, v, cu_q, cu_k = _ragged(LENS_Q, LENS_K, seed=3)
    ref, ref_lse = _softmax_ref(q, k, v, cu_q.tolist(), cu_k.tolist(), 0.25)
    out, lse, _ = fa.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(LENS_Q), max(LENS_K), softmax_scale=0.25, return_attn_probs=True
    )
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_flash_attn_packed_and_dense_entry_points():
    fa = standins.make_flash_attn()
    lens = [3, 30, 9, 64]
    q, k, v, cu, _ = _ragged(lens, lens, h=4, hk=4)
    ref, _ = _softmax_ref(q, k, v, cu.tolist(), cu.tolist(), 1 / math.sqrt(16))  # default scale 1/sqrt(D)
    out = fa.flash_attn_varlen_qkvpacked_func(torch.stack([q, k, v], 1), cu, max(lens))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    out = fa.flash_attn_varlen_kvpacked_func(q, torch.stack([k, v], 1), cu, cu, max(lens), max(lens))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # dense [B, S, H, D]: every sequence of length 8 (the windowed path's "all windows full" branch)
    qb, kb, vb, cub, _ = _ragged([8] * 3, [8] * 3, h=4, hk=2)
    refb, refb_lse = _softmax_ref(qb, kb, vb, cub.tolist(), cub.tolist(), 0.25)
    shape = (3, 8)
    outb = fa.flash_attn_func(
        qb.unflatten(0, shape), kb.unflatten(0, shape), vb.unflatten(0, shape), softmax_scale=0.25
    )
    torch.testing.assert_close(outb.flatten(0, 1).double(), refb, atol=1e-5, rtol=1e-5)
    o, lse, _ = fa.flash_attn_kvpacked_func(
        qb.unflatten(0, shape), torch.stack([kb, vb], 1).unflatten(0, shape), softmax_scale=0.25, return_attn_probs=True
    )
    assert lse.shape == (3, 4, 8)
    torch.testing.assert_close(lse.transpose(0, 1).flatten(1).double(), refb_lse, atol=1e-5, rtol=1e-5)
    qkv = torch.stack([q, q, q], 1)[:64].unflatten(0, (2, 32))
    torch.testing.assert_close(fa.flash_attn_qkvpacked_func(qkv), fa.flash_attn_func(*qkv.unbind(2)))


def test_flash_attn_rejects_causal():
    fa = standins.make_flash_attn()
    q, k, v, cu, _ = _ragged([4], [4])
    with pytest.raises(NotImplementedError, match="no causal mask"):
        fa.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, causal=True)


STANDIN_MODULES = ("torchsparse", "torchsparse.nn", "torchsparse.nn.functional", "torchsparse.utils", "flash_attn")


def _isolate(monkeypatch, names):
    """Remove `names` from sys.modules for this test; monkeypatch restores them (or their absence) after."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)  # records the old value, or that there was none
        del sys.modules[name]


def test_install_puts_importable_packages_in_sys_modules(monkeypatch):
    _isolate(monkeypatch, STANDIN_MODULES)
    standins.install_torchsparse_standin()
    standins.install_flash_attn_standin()
    ts = importlib.import_module("torchsparse")
    from torchsparse.utils import make_ntuple  # the original's import form

    assert make_ntuple(2, ndim=3) == (2, 2, 2)
    assert importlib.import_module("torchsparse.nn.functional").conv3d is standins.ts_conv3d
    assert ts.nn.Conv3d is standins.TSConv3d and ts.SparseTensor is standins.TSSparseTensor
    assert importlib.util.find_spec("flash_attn") is not None
    from flash_attn import flash_attn_varlen_func  # noqa: F401  (spatial_sparse_attention.py's form)


def test_install_standins_sets_backends_and_lists_what_it_replaced(monkeypatch, tmp_path):
    missing = [n for n in ("einops", "trimesh", "skimage") if importlib.util.find_spec(n) is None]
    _isolate(monkeypatch, STANDIN_MODULES + tuple(missing) + ("skimage.measure",) * ("skimage" in missing))
    for key in standins.ENV:
        monkeypatch.setenv(key, "spconv")
    monkeypatch.setattr(sys, "path", list(sys.path))
    used = standins.install_standins(tmp_path, force=True)
    assert {"torchsparse", "flash_attn"} <= set(used) and set(used) - {"torchsparse", "flash_attn"} == set(missing)
    assert all(isinstance(why, str) and why for why in used.values())
    assert os.environ["SPARSE_BACKEND"] == "torchsparse"
    assert os.environ["SPARSE_ATTN_BACKEND"] == "flash_attn"
    assert sys.path[0] == str(tmp_path.resolve())
    assert sys.modules["torchsparse"].nn.Conv3d is standins.TSConv3d


def test_install_standins_refuses_after_the_original_was_imported(monkeypatch):
    monkeypatch.setitem(sys.modules, "direct3d_s2", types.ModuleType("direct3d_s2"))
    with pytest.raises(RuntimeError, match="before importing direct3d_s2"):
        standins.install_standins(None)


# ---------------------------------------------------------------------------------------------
# the whole-pipeline stand-ins (bench/e2e_original.py)


def _udf_index(vertices, faces, dim, factor=8, threshold=4.0):
    """What the original's mesh2index does with the udf grid (re-stated here for the test only)."""
    udf = torch.full((dim**3,), 10_000_000, dtype=torch.int32)
    standins.compute_valid_udf(vertices, faces.int(), udf, faces.shape[0], dim, threshold)
    idx = ((udf.float() / 1e7).view(1, dim, dim, dim) < threshold / dim).nonzero()
    idx[:, 1:] //= factor
    return udf, torch.unique(idx, dim=0).int()


def test_udf_ext_standin_gives_the_sparse_voxelizers_index():
    # s2core's sparse voxelizer follows the CUDA kernel's rules (its own tests); the dense stand-in must give
    # the same latent cells on a closed mesh, exactly (same float32 lattice points, same distance function)
    import trimesh

    from s2core.mesh.voxelize import mesh_to_latent_index, normalize_vertices

    m = trimesh.creation.icosphere(subdivisions=2)
    v, f = torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces)
    _, idx = _udf_index(normalize_vertices(v.double()).float() * 0.5, f, 64)
    ours = mesh_to_latent_index(v, f, resolution=64).int()
    assert idx.shape[0] > 50 and torch.equal(idx, ours)


def test_udf_ext_standin_writes_distance_times_1e7_with_atomic_min():
    # one triangle in the plane z = 0: the lattice point right above its inside at height h gets int(h * 1e7);
    # points farther than threshold / dim stay at the initial 1e7; a second, closer triangle lowers the value
    dim = 32
    s = 1.0 / (dim - 1)
    tri = torch.tensor([[-0.3, -0.3, 0.0], [0.3, -0.3, 0.0], [-0.3, 0.3, 0.0]])
    closer = tri + torch.tensor([0.0, 0.0, 0.5 * s])
    v = torch.cat([tri, closer])
    f = torch.tensor([[0, 1, 2], [3, 4, 5]])
    udf = torch.full((dim**3,), 10_000_000, dtype=torch.int32)
    standins.compute_valid_udf(v, f[:1].int(), udf, 1, dim, 4.0)
    i = j = 12  # (12 / 31 - 0.5) = -0.113: inside the triangle's x, y range
    for k, expect_near in ((16, True), (20, False)):  # z = 16/31 - 0.5 = 0.016 (< 4/32); 20/31 - 0.5 = 0.145
        h = torch.tensor(k, dtype=torch.float32) / (dim - 1) - 0.5
        val = int(udf[(i * dim + j) * dim + k])
        assert val == (int(h.abs() * 10_000_000) if expect_near else 10_000_000)
    before = int(udf[(i * dim + j) * dim + 16])
    standins.compute_valid_udf(v, f.int(), udf, 2, dim, 4.0)
    assert int(udf[(i * dim + j) * dim + 16]) < before


def test_pipeline_standins_install_voxelizer_placeholders_and_a_scheduler(monkeypatch):
    names = ("udf_ext",) + tuple(n for n in standins.PIPELINE_IMPORT_ONLY if importlib.util.find_spec(n) is None)
    _isolate(monkeypatch, names)
    used, sched = standins.install_pipeline_standins()
    assert set(names) <= set(used)
    assert sys.modules["udf_ext"].compute_valid_udf is standins.compute_valid_udf
    if "pymeshfix" in used:
        from pymeshfix import _meshfix  # fill_hole.py's import form

        with pytest.raises(RuntimeError, match="import-only placeholder"):
            _meshfix()
    s = sched(num_train_timesteps=1000, shift=6.0)
    s.set_timesteps(50)
    assert len(s.timesteps) == 50 and abs(float(s.timesteps[0]) - 1000.0) < 1e-3


def test_flow_match_standin_steps_with_the_schedules_sigmas():
    # diffusers: prev = (sample.float() + (sigma_next - sigma) * v).to(v.dtype), the 0-dim sigma difference times
    # an fp16 velocity rounding to fp16 first (a 0-dim tensor does not promote), then the fp32 add
    from s2core.flow_sampler import flow_schedule

    s = standins.FlowMatchEulerStandIn(num_train_timesteps=1000, shift=6.0)
    s.set_timesteps(3)
    sig = flow_schedule(3, 6.0).sigmas
    x, v = torch.ones(4, dtype=torch.float16), torch.full((4,), 2.0, dtype=torch.float16)
    for i, t in enumerate(s.timesteps):
        x_new = s.step(v, t, x).prev_sample
        assert x_new.dtype == torch.float16
        step = ((sig[i + 1] - sig[i]).double() * 2.0).half().float()
        torch.testing.assert_close(x_new.float(), (x.float() + step).half().float(), rtol=0, atol=0)
        x = x_new


def test_flow_match_standin_equals_diffusers():
    # diffusers' own outputs, recorded by tools/golden/make_scheduler_golden.py (diffusers 0.33.1): timesteps and
    # 64 fp16 values stepped through the dense (50, 6.0) and 1024 (15, 8.0) schedules
    from safetensors.torch import load_file

    ref = load_file(str(Path(__file__).parent / "data" / "flow_match_diffusers.safetensors"))
    for steps, shift in ((50, 6.0), (15, 8.0)):
        ours = standins.FlowMatchEulerStandIn(num_train_timesteps=1000, shift=shift)
        ours.set_timesteps(steps)
        torch.testing.assert_close(ours.timesteps.float(), ref[f"timesteps.{steps}"], rtol=0, atol=0)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, generator=g).half()
        assert torch.equal(x, ref[f"x0.{steps}"])
        for t in ours.timesteps:
            x = ours.step(torch.randn(64, generator=g).half(), t, x).prev_sample
        assert torch.equal(x, ref[f"x.{steps}"])


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_torch_flash_varlen_adapter_unpads_lse_and_falls_back_to_repeated_kv_heads(monkeypatch, layout):
    # torch's flash kernel is CUDA-only: a fake with its signature checks the adapter's plumbing (lse layouts
    # [H, Nq] or [B, H, max_q], a kernel refusing grouped kv heads -> retried with repeated heads)
    q, k, v, cu_q, cu_k = _ragged([5, 9, 3], [4, 6, 7], h=4, hk=2)
    ref, ref_lse = _softmax_ref(q, k, v, cu_q.tolist(), cu_k.tolist(), 0.5)
    calls = []

    def fake(q_, k_, v_, cq, ck, mq, mk, p, causal, dbg, scale=None):
        calls.append(k_.shape[1])
        if k_.shape[1] != q_.shape[1]:
            raise RuntimeError("Number of heads in key/value must equal")
        out, lse = _softmax_ref(q_, k_, v_, cq.tolist(), ck.tolist(), scale)
        if layout == "padded":
            b, pad = len(cq) - 1, torch.full((len(cq) - 1, q_.shape[1], mq), 7.0, dtype=torch.float64)
            for i in range(b):
                pad[i, :, : cq[i + 1] - cq[i]] = lse[:, cq[i] : cq[i + 1]]
            lse = pad
        return out.to(q_.dtype), lse.float(), None, None, None

    monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", fake)
    monkeypatch.setattr(standins, "_FAST_LSE", {})
    out, lse = standins._torch_flash_varlen(q, k, v, cu_q, cu_k, 9, 7, 0.5)
    assert calls == [2, 4] and standins._FAST_LSE["native_gqa"] is False
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
