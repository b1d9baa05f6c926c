"""The sparse conv kernel (kernels/sparse_conv.py) against its reference, and the reference against the
decoder's own path (s2core/sparse/conv.py: search map, derived map, subdivide then convolve).

Tolerance: kernel and reference both accumulate in fp32 and round the sum to fp16 before the bias add; only
the summation order differs (tap by tap on the tensor cores vs one GEMM), so an output may land an ulp or two
away and the bias add rounds from there: max-abs 4e-3 at |y| <= 4 (fp16 ulp 2e-3), rel-RMS 1e-3.
"""

import zlib

import pytest
import torch

from kernels import sparse_conv as K
from s2core.sparse import SparseTensor, conv, kernel_map, sparse_conv3d, sparse_subdivide, sparse_subdivide_conv3d
from tests.kernels.ssa_cases import assert_close, poisoned_outputs


def _voxels(n: int, grid: int, seed: int, batch: int = 1) -> torch.Tensor:
    """[~n·batch, 4] int32 unique voxels of `batch` samples on a grid³ (a clustered blob, so most taps hit)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        flat = torch.randperm(grid**3, generator=g)[:n]
        xyz = torch.stack([flat // grid**2, flat // grid % grid, flat % grid], 1)
        rows.append(torch.cat([torch.full((n, 1), b), xyz], 1))
    return torch.cat(rows).int()


def _case(n, grid, cin, cout, seed, batch=1):
    g = torch.Generator().manual_seed(seed + 1)
    coords = _voxels(n, grid, seed, batch)
    x = SparseTensor(torch.randn(coords.shape[0], cin, generator=g).half(), coords)
    w = (torch.randn(27, cin, cout, generator=g) / (27 * cin) ** 0.5).half()
    b = (0.1 * torch.randn(cout, generator=g)).half()
    return x, w, b


CASES = [  # (n voxels a sample, grid, Cin, Cout, batch): ragged row counts, channels below/at/above 16
    (37, 4, 32, 32, 1),  # 37 of 64 voxels: most taps live
    (50, 6, 8, 16, 2),  # two samples overlapping in space: no tap crosses samples
    (1, 3, 16, 8, 1),  # a single voxel: only the centre tap
    (70, 5, 64, 64, 1),  # the widest the kernel takes
]


@pytest.mark.triton
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_direct_matches_reference(case, bias, monkeypatch):
    n, grid, cin, cout, batch = case
    x, w, b = _case(n, grid, cin, cout, zlib.crc32(f"{case}{bias}".encode()), batch)
    b = b if bias else None
    nbr = kernel_map(x)
    with poisoned_outputs(monkeypatch):
        y = K.sparse_conv3d(x.feats, nbr, w, b, "direct", backend="triton")
    ref = K.sparse_conv3d_reference(x.feats, nbr, w, b, "direct")
    assert y.shape == (x.feats.shape[0], cout) and y.dtype == torch.float16
    assert_close(y, ref, 1e-3, 4e-3, f"{case} bias={bias}")


@pytest.mark.triton
@pytest.mark.parametrize("mode", ["derived", "copied"])
@pytest.mark.parametrize("case", CASES[:3])
def test_subdivided_modes_match_reference(case, mode, monkeypatch):
    n, grid, cin, cout, batch = case
    x, w, b = _case(n, grid, cin, cout, zlib.crc32(f"{case}{mode}".encode()), batch)
    pmap = kernel_map(x)
    g = torch.Generator().manual_seed(zlib.crc32(mode.encode()))
    feats = torch.randn(8 * x.feats.shape[0], cin, generator=g).half() if mode == "derived" else x.feats
    with poisoned_outputs(monkeypatch):
        y = K.sparse_conv3d(feats, pmap, w, None if mode == "copied" else b, mode, backend="triton")
    ref = K.sparse_conv3d_reference(feats, pmap, w, None if mode == "copied" else b, mode)
    assert y.shape == (8 * pmap.shape[0], cout)
    assert_close(y, ref, 1e-3, 4e-3, f"{case} {mode}")


@pytest.mark.triton
def test_empty_set():
    x = torch.zeros(0, 8, dtype=torch.float16)
    nbr = torch.zeros(0, 27, dtype=torch.int32)
    w = torch.zeros(27, 8, 8, dtype=torch.float16)
    for mode in K.MODES:
        assert K.sparse_conv3d(x, nbr, w, None, mode, backend="triton").shape == (0, 8)


def test_modes_are_the_decoders_maps():
    """derived = the map `subdivided_kernel_map` builds for the children; copied = the children's map read on
    the parents' rows: the neighbour rows the reference gathers are the decoder's own, exactly."""
    x, _, _ = _case(40, 5, 4, 4, seed=3, batch=2)
    pmap = kernel_map(x)
    sub = sparse_subdivide(x)
    child_map = kernel_map(sub).long()  # derived from x's map by sparse_subdivide
    n = child_map.shape[0]
    want = torch.where(child_map < n, child_map, -1)
    assert torch.equal(K.neighbours("derived", pmap, n), want)
    parent_of = torch.where(want >= 0, want // 8, -1)
    assert torch.equal(K.neighbours("copied", pmap, n), parent_of)


def test_reference_is_the_decoders_convolution():
    """In fp64 (no rounding to hide a wrong tap), the reference in each mode equals the decoder path it stands
    for: conv on a searched map, conv on a subdivided set, conv of subdivide(x)."""
    x, _, _ = _case(40, 5, 3, 2, seed=4, batch=2)
    x = x.replace(x.feats.double())
    g = torch.Generator().manual_seed(9)
    w, b = torch.randn(27, 3, 2, generator=g).double(), torch.randn(2, generator=g).double()
    ref = K.sparse_conv3d_reference(x.feats, kernel_map(x), w, b, "direct")
    assert torch.allclose(ref, sparse_conv3d(x, w, b), atol=1e-12)
    sub = sparse_subdivide(x.replace(x.feats))
    sub = sub.replace(torch.randn(sub.feats.shape, generator=g).double())
    derived = K.sparse_conv3d_reference(sub.feats, kernel_map(x), w, b, "derived")
    assert torch.allclose(derived, sparse_conv3d(sub, w, b), atol=1e-12)
    copied = K.sparse_conv3d_reference(x.feats, kernel_map(x), w, b, "copied")
    assert torch.allclose(copied, sparse_conv3d(sparse_subdivide(x), w, b), atol=1e-12)
    fused = sparse_subdivide_conv3d(x, w, b)
    assert torch.allclose(fused.feats, copied, atol=1e-12) and torch.equal(fused.coords, sparse_subdivide(x).coords)


@pytest.mark.gpu
def test_decoder_path_takes_the_kernel_gpu(monkeypatch):
    """On CUDA in fp16 with USE_KERNEL the decoder's convolutions of few channels run the kernel ("copied" and
    "derived") and agree with the gather + GEMM path."""
    x, w, b = _case(3000, 24, 32, 32, seed=11)
    x = x.to("cuda")
    w, b = w.cuda(), b.cuda()
    slow = sparse_conv3d(sparse_subdivide(x), w, b)  # USE_KERNEL off: the gather + GEMM path
    monkeypatch.setattr(conv, "USE_KERNEL", True)
    modes = []
    launch = K._sparse_conv3d_triton
    monkeypatch.setattr(K, "_sparse_conv3d_triton", lambda *a, **k: modes.append(a[4]) or launch(*a, **k))
    fast = sparse_subdivide_conv3d(x, w, b).feats  # caches x's map
    sub = sparse_subdivide(x)
    assert "parent_kernel_map_3" in sub.cache
    derived = sparse_conv3d(sub, w, b)
    assert modes == ["copied", "derived"]
    assert_close(fast, slow, 1e-3, 4e-3, "copied vs gather")
    assert_close(derived, slow, 1e-3, 4e-3, "derived vs gather")
