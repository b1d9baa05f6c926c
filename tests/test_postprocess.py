"""Mesh cleanup (SPEC.md §10.4): debris, holes, simplification, normals, bad input."""

import sys

import numpy as np
import pytest
import torch
import trimesh

from s2core.mesh.postprocess import (
    connected_components,
    fill_holes,
    postprocess_mesh,
    remove_small_components,
    simplify_mesh,
    vertex_normals,
)


def _sphere(sub=3, centre=(0, 0, 0), r=1.0):
    m = trimesh.creation.icosphere(subdivisions=sub, radius=r)
    return torch.tensor(m.vertices + np.asarray(centre), dtype=torch.float32), torch.tensor(m.faces)


def _trimesh(v, f):
    return trimesh.Trimesh(v.numpy(), f.numpy(), process=False)


def test_fill_holes_makes_watertight():
    v, f = _sphere(3)
    # cut two holes: the faces around vertex 0 (a 5-gon) and a strip of faces around another vertex
    far = int(torch.argmin(v[:, 0]))
    keep = ~((f == 0).any(1) | (f == far).any(1))
    assert not _trimesh(v, f[keep]).is_watertight
    fv, ff = fill_holes(v, f[keep])
    m = _trimesh(fv, ff)
    assert m.is_watertight and m.is_winding_consistent
    assert fv.shape[0] == v.shape[0] + 2  # one centroid per hole
    assert m.volume == pytest.approx(_trimesh(v, f).volume, rel=0.02)  # same orientation (positive volume)
    # a size limit leaves bigger holes open
    lv, lf = fill_holes(v, f[keep], max_hole_edges=3)
    assert lf.shape[0] == int(keep.sum())


def test_filled_mesh_exports_and_reimports(tmp_path):
    from s2core.mesh.export import save_mesh

    v, f = _sphere(3)
    fv, ff, n = postprocess_mesh(v, f[~(f == 0).any(1)], close_holes=True, simplify_ratio=None)
    assert len(fv) == len(v)  # vertex 0 lost its faces (dropped), one centroid added
    for fmt in ("glb", "obj", "ply"):
        back = trimesh.load(save_mesh(fv, ff, tmp_path / f"filled.{fmt}", normals=n), force="mesh", process=False)
        assert (len(back.vertices), len(back.faces)) == (len(fv), len(ff)) and back.is_watertight


def test_remove_debris():
    v1, f1 = _sphere(3)
    v2, f2 = _sphere(0, centre=(3, 0, 0), r=0.05)
    v = torch.cat([v1, v2])
    f = torch.cat([f1, f2 + v1.shape[0]])
    rv, rf = remove_small_components(v, f, min_ratio=0.1)
    assert rf.shape == f1.shape and rv.shape == v1.shape
    assert torch.equal(rv, v1)  # the big piece kept untouched, vertices renumbered compactly


def test_components_long_strip():
    n = 3000  # a long triangle strip: one component; propagation must not need n passes to say so
    idx = torch.arange(n)
    f = torch.stack([idx, idx + 1, idx + 2], 1)
    label = connected_components(f, n + 2)
    assert torch.equal(label, torch.zeros(n + 2, dtype=torch.int64))


@pytest.mark.parametrize("target", [2000, 777])
def test_simplify_hits_target(target):
    v, f = _sphere(5)  # 20480 faces
    sv, sf = simplify_mesh(v, f, target_faces=target)
    assert abs(sf.shape[0] - target) <= 0.01 * target
    assert _trimesh(sv, sf).is_watertight
    # the original's simplify_ratio: fraction of faces REMOVED
    rv, rf = simplify_mesh(v, f, reduction=0.95)
    assert abs(rf.shape[0] - 0.05 * f.shape[0]) <= 0.01 * 0.05 * f.shape[0]


def test_simplify_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "fast_simplification", None)
    v, f = _sphere(2)
    with pytest.raises(ImportError, match="pip install fast-simplification"):
        simplify_mesh(v, f, target_faces=100)
    with pytest.raises(ValueError, match="exactly one"):
        simplify_mesh(v, f)


def test_normals_point_outwards():
    v, f = _sphere(3)
    n = vertex_normals(v, f)
    cos = (n * v / v.norm(dim=1, keepdim=True)).sum(1)
    assert cos.min() > 0.99


def test_postprocess_defaults_and_steps():
    v1, f1 = _sphere(4)
    v2, f2 = _sphere(0, centre=(3, 0, 0), r=0.05)
    v = torch.cat([v1, v2])
    f = torch.cat([f1, f2 + v1.shape[0]])
    f = f[~(f == 0).any(1)]  # one hole
    pv, pf, pn = postprocess_mesh(v, f, remove_debris=True, close_holes=True, simplify_ratio=None)
    m = _trimesh(pv, pf)
    assert m.is_watertight and len(m.split(only_watertight=False)) == 1
    assert pn.shape == pv.shape
    if _has_fast_simplification():
        dv, df, _ = postprocess_mesh(v1, f1)  # the original's remesh: keep ~5 %
        assert abs(df.shape[0] - round(0.05 * f1.shape[0])) <= 0.01 * 0.05 * f1.shape[0]


def _has_fast_simplification():
    try:
        import fast_simplification  # noqa: F401

        return True
    except ImportError:
        return False


def test_bad_input():
    with pytest.raises(ValueError, match="empty"):
        postprocess_mesh(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64), simplify_ratio=None)
    v, f = _sphere(1)
    v[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        postprocess_mesh(v, f, simplify_ratio=None)
    # three faces on one edge: non-manifold → holes undefined
    v = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1]], dtype=torch.float32)
    f = torch.tensor([[0, 1, 2], [1, 0, 3], [0, 1, 4]])
    with pytest.raises(ValueError, match="non-manifold"):
        fill_holes(v, f)
    with pytest.raises(ValueError, match=r"\[V, 3\]"):
        postprocess_mesh(torch.zeros(4, 2), torch.zeros(1, 3, dtype=torch.int64))
