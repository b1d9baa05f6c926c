"""Sparse conv, downsample, subdivide (s2core/sparse/conv.py) vs brute force written from SPARSE.md §2.

Tolerances: fp32 vs an fp64 brute force, sums of <= 27*Cin products of O(1) values -> 1e-4 abs.
"""

import pytest
import torch

from s2core.sparse import SparseTensor
from s2core.sparse.conv import (
    SparseConv3d,
    build_kernel_map,
    kernel_map,
    kernel_map_rows,
    kernel_offsets,
    sparse_conv3d,
    sparse_conv3d_reference,
    sparse_downsample,
    sparse_subdivide,
)


def _random_set(g, b, n, r, offset=0):
    rows = []
    for i in range(b):
        flat = torch.randperm(r**3, generator=g)[:n]
        xyz = torch.stack([flat // (r * r), flat // r % r, flat % r], 1) + offset
        rows.append(torch.cat([torch.full((n, 1), i), xyz], 1))
    return torch.cat(rows).int()


def test_kernel_offset_order_is_x_fastest():
    off = kernel_offsets()
    assert off[0].tolist() == [-1, -1, -1] and off[1].tolist() == [0, -1, -1]
    assert off[3].tolist() == [-1, 0, -1] and off[9].tolist() == [-1, -1, 0] and off[13].tolist() == [0, 0, 0]


def test_single_neighbour_lands_through_the_right_slice():
    # one output voxel p at (5,5,5) and one input at p+off; only slice k of the kernel is one-hot.
    for k, (dx, dy, dz) in enumerate(kernel_offsets().tolist()):
        coords = torch.tensor([[0, 5, 5, 5], [0, 5 + dx, 5 + dy, 5 + dz]], dtype=torch.int32)
        if k == 13:
            coords = coords[:1]
        feats = torch.zeros(coords.shape[0], 2)
        feats[-1] = torch.tensor([1.0, 2.0])
        kernel = torch.zeros(27, 2, 3)
        kernel[k] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        out = sparse_conv3d(SparseTensor(feats, coords), kernel)
        assert out[0].tolist() == [1.0, 2.0, 0.0], f"offset {k} = {(dx, dy, dz)}"
        if k != 13:  # the reverse direction goes through the mirrored slice, not k
            assert out[1].tolist() == [0.0, 0.0, 0.0]


def test_random_two_batch_set_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    coords = _random_set(g, 2, 150, 7, offset=0)  # dense enough for many neighbours; b=0 and b=1 overlap in space
    perm = torch.cat([torch.randperm(150, generator=g), 150 + torch.randperm(150, generator=g)])
    coords = coords[perm]  # arbitrary order inside each element
    feats = torch.randn(coords.shape[0], 5, generator=g)
    kernel = torch.randn(27, 5, 4, generator=g)
    bias = torch.randn(4, generator=g)
    out = sparse_conv3d(SparseTensor(feats, coords), kernel, bias)
    ref = sparse_conv3d_reference(feats, coords, kernel, bias)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def test_kernel_map_is_cached_and_shared_by_replace():
    g = torch.Generator().manual_seed(1)
    x = SparseTensor(torch.randn(50, 2, generator=g), _random_set(g, 1, 50, 5))
    conv = SparseConv3d(2, 2)
    y = conv(x)
    assert "kernel_map_3" in x.cache and y.cache is x.cache
    nbr = build_kernel_map(x.coords)
    assert torch.equal(x.cache["kernel_map_3"], nbr)
    # symmetric: if q is p's neighbour through k then p is q's through 26 - k
    n = nbr.shape[0]
    p, k = torch.nonzero(nbr < n, as_tuple=True)
    assert torch.equal(nbr[nbr[p, k], 26 - k], p)


def test_empty_input_and_1x1():
    x = SparseTensor(torch.zeros(0, 3), torch.zeros(0, 4, dtype=torch.int32), batch_size=1)
    assert sparse_conv3d(x, torch.randn(27, 3, 5), torch.randn(5)).shape == (0, 5)
    conv = SparseConv3d(3, 5, kernel_size=1)
    assert conv.conv.kernel.shape == (3, 5) and set(conv.state_dict()) == {"conv.kernel", "conv.bias"}
    f = torch.randn(4, 3)
    y = conv(SparseTensor(f, torch.tensor([[0, 0, 0, i] for i in range(4)], dtype=torch.int32)))
    torch.testing.assert_close(y.feats, f @ conv.conv.kernel + conv.conv.bias)


def test_downsample_mean_includes_the_zero():
    coords = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0], [0, 2, 0, 0], [1, 0, 0, 1]], dtype=torch.int32)
    feats = torch.tensor([[1.0], [3.0], [5.0], [7.0]])
    y = sparse_downsample(SparseTensor(feats, coords), 2)
    assert y.coords.tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]]  # sorted (b, x, y, z)
    torch.testing.assert_close(y.feats, torch.tensor([[4.0 / 3.0], [2.5], [3.5]]))
    assert y.offsets.tolist() == [0, 2, 3]


def test_subdivide_order():
    coords = torch.tensor([[0, 1, 2, 3], [1, 0, 0, 0]], dtype=torch.int32)
    y = sparse_subdivide(SparseTensor(torch.tensor([[1.0], [2.0]]), coords))
    assert y.coords[:3].tolist() == [[0, 2, 4, 6], [0, 2, 4, 7], [0, 2, 5, 6]]
    assert y.coords[7].tolist() == [0, 3, 5, 7] and y.coords[8].tolist() == [1, 0, 0, 0]
    assert y.feats[:8].flatten().tolist() == [1.0] * 8 and y.offsets.tolist() == [0, 8, 16]


@pytest.mark.gpu
def test_cuda_fp16_matches_fp64_reference():
    # fp16 inputs/weights, fp32-accumulating GEMMs: error ~ fp16 rounding of the output (|out| ~ 1)
    g = torch.Generator().manual_seed(5)
    coords = _random_set(g, 2, 400, 9)
    feats = torch.randn(coords.shape[0], 32, generator=g).half()
    kernel = (torch.randn(27, 32, 16, generator=g) / 30).half()
    ref = sparse_conv3d_reference(feats, coords, kernel)
    out = sparse_conv3d(SparseTensor(feats.cuda(), coords.cuda()), kernel.cuda())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double().cpu(), ref, atol=5e-3, rtol=5e-3)


def test_subdivided_kernel_map_equals_a_fresh_search():
    g = torch.Generator().manual_seed(6)
    coords = _random_set(g, 2, 60, 5)
    x = SparseTensor(torch.randn(len(coords), 2, generator=g), coords)
    kernel_map_of_x = build_kernel_map(x.coords)
    x.cache["kernel_map_3"] = kernel_map_of_x
    y = sparse_subdivide(sparse_subdivide(x))  # derived twice
    assert "kernel_map_3" not in y.cache  # derived lazily: convs read rows of it
    want = build_kernel_map(y.coords)
    rows = kernel_map_rows(y)
    n = want.shape[0]
    assert torch.equal(torch.cat([rows(s, min(s + 24, n)) for s in range(0, n, 24)]), want)
    assert torch.equal(kernel_map(y), want)
