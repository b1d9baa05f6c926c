"""Sparse marching cubes (s2core/mesh/marching_cubes.py) against hand-written cubes, analytic shapes,
its loop-per-cell twin and scikit-image's Lewiner marching cubes (what the original calls).

Exactness: edge-crossing vertices are compared bitwise with scikit-image (same fp64 interpolation,
rounded to fp32). Both add centre vertices in some ambiguous cells (not always the same cells), so
against it we check the edge vertices (ours a subset) and a symmetric vertex-to-vertex Hausdorff
distance below one voxel (a centre vertex is the mean of edge vertices of its own cell). Manifoldness
and triangle-for-triangle parity in unambiguous cells: test_marching_cubes_manifold.py.
"""

import logging
import math

import numpy as np
import pytest
import torch
import trimesh
from conftest import golden
from skimage import measure

from s2core.mesh.marching_cubes import marching_cubes_naive, marching_cubes_sparse, sparse_sdf_to_mesh


def _dense_to_sparse(vol, active):
    idx = np.argwhere(active)
    return torch.from_numpy(idx), torch.from_numpy(vol[active].astype(np.float32))


def _both_paths(vol, level):
    """(vectorised, naive) results for a dense volume whose every voxel is active."""
    coords, vals = _dense_to_sparse(vol, np.ones(vol.shape, bool))
    v, f = marching_cubes_sparse(coords, vals, max(vol.shape), level)
    return (v.numpy(), f.numpy()), marching_cubes_naive(vol, level)


def _normals(v, f):
    t = v[f]
    return np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0])


def _triangle_set(v, f):
    """Oriented triangles as coordinate tuples, independent of vertex numbering and rotation."""
    out = set()
    for tri in v[f].tolist():
        tri = [tuple(p) for p in tri]
        k = tri.index(min(tri))
        out.add(tuple(tri[k:] + tri[:k]))
    return out


# (inside corners, expected vertices, triangles, outward normal direction, area); corner values -1 in, +1 out
CANONICAL = {
    "one-corner": ([0], [(0.5, 0, 0), (0, 0.5, 0), (0, 0, 0.5)], 1, (1, 1, 1), math.sqrt(3) / 8),
    "edge": ([0, 1], [(0, 0.5, 0), (1, 0.5, 0), (0, 0, 0.5), (1, 0, 0.5)], 2, (0, 1, 1), math.sqrt(0.5)),
    "face": ([0, 1, 2, 3], [(0, 0, 0.5), (1, 0, 0.5), (0, 1, 0.5), (1, 1, 0.5)], 2, (0, 0, 1), 1.0),
    "three-corners": ([0, 1, 2], [(0.5, 1, 0), (1, 0.5, 0), (0, 0, 0.5), (1, 0, 0.5), (0, 1, 0.5)], 3, (0, 0, 1), None),
    "opposite-corners": (
        [0, 7],
        [(0.5, 0, 0), (0, 0.5, 0), (0, 0, 0.5), (0.5, 1, 1), (1, 0.5, 1), (1, 1, 0.5)],
        2,
        None,
        math.sqrt(3) / 4,
    ),
}


@pytest.mark.parametrize("name", list(CANONICAL))
@pytest.mark.parametrize("path", [0, 1], ids=["vectorised", "naive"])
def test_canonical_cube(name, path):
    inside, want_v, n_tri, normal, area = CANONICAL[name]
    vol = np.ones((2, 2, 2), np.float32)
    for c in inside:
        vol[c & 1, c >> 1 & 1, c >> 2 & 1] = -1
    v, f = _both_paths(vol, 0.0)[path]
    assert sorted(map(tuple, v.tolist())) == sorted(want_v)
    assert f.shape == (n_tri, 3)
    nrm = _normals(v, f)
    if normal is not None:  # every triangle faces away from the inside corners
        assert (nrm @ np.asarray(normal, np.float32) > 0).all()
    if area is not None:
        assert np.isclose(np.linalg.norm(nrm, axis=1).sum() / 2, area, atol=1e-6)


@pytest.mark.parametrize("path", [0, 1], ids=["vectorised", "naive"])
def test_ambiguous_face_uses_the_asymptotic_decider(path):
    # corners 0 and 3 inside share the z=0 face diagonally; strongly negative -> joined across the face
    for value, n_loops in [(-1.0, 2), (-3.0, 1)]:
        vol = np.ones((2, 2, 2), np.float32)
        vol[0, 0, 0] = vol[1, 1, 0] = value
        v, f = _both_paths(vol, 0.0)[path]
        assert v.shape[0] == 6
        comps = trimesh.Trimesh(v, f, process=False).split(only_watertight=False)
        assert len(comps) == n_loops
        sk_v, _, _, _ = measure.marching_cubes(vol, 0.0, method="lewiner")
        assert set(map(tuple, v.tolist())) <= set(map(tuple, sk_v.tolist()))


def _noise_volume(seed, n=10):
    g = np.random.default_rng(seed)
    return g.normal(size=(n, n, n)).astype(np.float32)  # many ambiguous cells


def test_naive_twin_agrees_with_vectorised_on_noise():
    vol = _noise_volume(0)
    (v, f), (vn, fn) = _both_paths(vol, 0.1)
    assert _triangle_set(v, f) == _triangle_set(vn, fn)


@pytest.mark.parametrize("seed", [1, 2])
def test_vertices_bitwise_equal_to_scikit_image_and_hausdorff(seed):
    vol = _noise_volume(seed)
    (v, f), _ = _both_paths(vol, 0.2)
    sk_v, sk_f, _, _ = measure.marching_cubes(vol, 0.2, method="lewiner")
    on_edge = (v == np.round(v)).sum(1) >= 2  # an edge crossing; else a loop's centre vertex
    ours, theirs = set(map(tuple, v[on_edge].tolist())), set(map(tuple, sk_v.tolist()))
    assert ours <= theirs  # every edge crossing is bitwise scikit-image's
    assert (~on_edge).sum() < 0.1 * len(v)
    # centre vertices on both sides are means of edge vertices of their own cell: within one voxel
    for a, b in [(sk_v, v), (v, sk_v)]:
        extra = np.asarray(sorted(set(map(tuple, a.tolist())) - set(map(tuple, b.tolist()))), np.float32)
        d = torch.cdist(
            torch.from_numpy(extra.reshape(-1, 3)).double(), torch.from_numpy(np.ascontiguousarray(b)).double()
        )
        assert d.numel() == 0 or d.min(1).values.max() < 1.0


@pytest.mark.parametrize("r", [16, 32])
@pytest.mark.parametrize("shape", ["sphere", "torus", "box"])
def test_analytic_shapes_watertight_euler_area(shape, r):
    g = (np.mgrid[:r, :r, :r].astype(np.float64) + 0.5) / r * 2 - 1
    if shape == "sphere":
        sdf, euler, area = np.sqrt((g**2).sum(0)) - 0.6, 2, 4 * math.pi * 0.36
    elif shape == "torus":
        q = np.sqrt(g[0] ** 2 + g[1] ** 2) - 0.5
        sdf, euler, area = np.sqrt(q**2 + g[2] ** 2) - 0.2, 0, 4 * math.pi**2 * 0.5 * 0.2
    else:
        q = np.abs(g) - 0.5
        sdf = np.sqrt((np.maximum(q, 0) ** 2).sum(0)) + np.minimum(q.max(0), 0)
        euler, area = 2, 6.0
    sdf = sdf * r / 2  # voxel units
    coords, vals = _dense_to_sparse(sdf, sdf < 2)  # a band outside, the whole inside active
    v, f = sparse_sdf_to_mesh(coords, vals, r, 0.0)
    mesh = trimesh.Trimesh(v.numpy(), f.numpy(), process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0
    assert mesh.euler_number == euler
    # second order for smooth shapes (measured 1.3% / 0.34% sphere, 2.5% / 0.57% torus); the box's
    # edges are chamfered by one cell, first order (7.5% / 3.7%)
    bound = {"sphere": 0.02, "torus": 0.03, "box": 0.08}[shape] * (16 / r) ** (1 if shape == "box" else 2)
    assert abs(mesh.area / area - 1) < bound


def test_original_frame_matches_dense_scikit_pipeline():
    # the original: dense fp32 grid filled with +1, SDF written at the active voxels, Lewiner, v / R * 2 - 1
    r = 20
    g = np.mgrid[:r, :r, :r].astype(np.float32)
    sdf = (np.sqrt(((g - 9.4) ** 2).sum(0)) - 6) / 8
    band = np.abs(sdf) < 0.3  # narrow band: the +1 fill makes an inner shell, as in the original
    grid = np.ones((r, r, r), np.float32)
    coords, vals = _dense_to_sparse(sdf, band)
    coords = torch.cat([torch.zeros(len(coords), 1, dtype=coords.dtype), coords], 1)  # (b, x, y, z)
    vals = vals.half()  # the decoder's fp16 output, read as fp32 by both
    v, f = sparse_sdf_to_mesh(coords, vals[:, None], r, 0.2)
    grid[band] = vals.float().numpy()
    sk_v = measure.marching_cubes(grid, 0.2, method="lewiner")[0] / r * 2 - 1
    assert set(map(tuple, v.numpy().tolist())) <= set(map(tuple, sk_v.tolist()))
    mesh = trimesh.Trimesh(v.numpy(), f.numpy(), process=False)
    assert mesh.is_watertight and len(mesh.split(only_watertight=False)) == 2  # outer + inner shell


def test_duplicates_keep_the_last_value():
    coords = torch.tensor([[0, 0, 0], [0, 0, 0]])
    v, f = marching_cubes_sparse(coords, torch.tensor([-1.0, 1.0]), 4, 0.0)  # last write +1: nothing inside
    assert f.shape == (0, 3)
    v, f = marching_cubes_sparse(coords, torch.tensor([1.0, -1.0]), 4, 0.0)
    assert f.shape == (1, 3)


def test_empty_and_bad_inputs(caplog):
    with caplog.at_level(logging.WARNING):
        v, f = sparse_sdf_to_mesh(torch.zeros(0, 3, dtype=torch.int64), torch.zeros(0), 8, 0.2)
    assert v.shape == (0, 3) and f.shape == (0, 3) and "mesh is empty" in caplog.text
    with pytest.raises(ValueError, match="background"):
        marching_cubes_sparse(torch.zeros(1, 3, dtype=torch.int64), torch.zeros(1), 8, 1.5)
    with pytest.raises(ValueError, match="resolution"):
        marching_cubes_sparse(torch.tensor([[0, 0, 8]]), torch.zeros(1), 8, 0.2)


@pytest.mark.gpu
def test_cuda_equals_cpu():
    vol = _noise_volume(3, 24)
    coords, vals = _dense_to_sparse(vol, np.abs(vol) < 1.5)
    v, f = marching_cubes_sparse(coords, vals, 24, 0.1)
    vc, fc = marching_cubes_sparse(coords.cuda(), vals.cuda(), 24, 0.1)
    assert _triangle_set(v.numpy(), f.numpy()) == _triangle_set(vc.cpu().numpy(), fc.cpu().numpy())


def test_batched_sparse_tensor_meshes_each_element_like_alone():
    from s2core.sparse import SparseTensor

    r = 16
    g = np.mgrid[:r, :r, :r].astype(np.float32)
    fields = [np.sqrt(((g - 7.5) ** 2).sum(0)) - 5, np.abs(g - 8).max(0) - 4.2]  # sphere, cube at the same place
    coords, vals = [], []
    for b, sdf in enumerate(fields):
        c, v = _dense_to_sparse(sdf, np.abs(sdf) < 2)
        coords.append(torch.cat([torch.full((len(c), 1), b), c], 1))
        vals.append(v)
    st = SparseTensor(torch.cat(vals)[:, None], torch.cat(coords).int())
    meshes = sparse_sdf_to_mesh(st, r, 0.0)  # the pipeline's call form
    assert len(meshes) == 2
    for b, (v, f) in enumerate(meshes):
        v1, f1 = sparse_sdf_to_mesh(coords[b], vals[b], r, 0.0)
        assert _triangle_set(v.numpy(), f.numpy()) == _triangle_set(v1.numpy(), f1.numpy())
        assert trimesh.Trimesh(v.numpy(), f.numpy(), process=False).is_watertight


def test_real_decoder_output_matches_the_originals_sparse2mesh_exactly():
    # the original's sparse2mesh on the original decoder's fp16 output (golden fixture, element 1):
    # dense fp32 grid of +1 (here only up to the object's max corner: the rest is +1 and meshless),
    # Lewiner at 0.2, v / 512 * 2 - 1 in fp32. Our vertices must be bitwise the same set.
    from s2core.sparse import SparseTensor

    t, _ = golden("sparse_vae_512__decode")
    sdf, coords = t["out.sdf"], t["out.coords"]
    v, f = sparse_sdf_to_mesh(SparseTensor(sdf, coords), 512, 0.2)[1]
    sel = coords[:, 0] == 1
    xyz = coords[sel, 1:].long().numpy()
    grid = np.ones(tuple(xyz.max(0) + 3), np.float32)
    grid[xyz[:, 0], xyz[:, 1], xyz[:, 2]] = sdf[sel, 0].float().numpy()
    sk_v, sk_f, _, _ = measure.marching_cubes(grid, 0.2, method="lewiner")
    sk_v = sk_v / 512 * 2 - 1
    assert set(map(tuple, v.numpy().tolist())) == set(map(tuple, sk_v.tolist()))
    ours, theirs = trimesh.Trimesh(v.numpy(), f.numpy(), process=False), trimesh.Trimesh(sk_v, sk_f, process=False)
    assert ours.is_watertight and ours.euler_number == theirs.euler_number
    assert np.isclose(ours.area, theirs.area, rtol=1e-3)
