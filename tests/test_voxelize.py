"""Mesh → latent index (SPEC.md §10.2) against a brute-force dense reference written here.

The original computes this with a CUDA extension (`third_party/voxelize`, `udf_ext`) that cannot build or
run on a CPU, so parity is stated against its documented semantics instead: a lattice of D³ points at
(i/(D-1) - 0.5, ...), the mesh normalised then halved, a point is active when its distance to the nearest
triangle is below 4/D, latent cell = index // factor, unique and sorted. The reference evaluates every
lattice point against every triangle with an independent closest-point algorithm (Ericson's, float64); our
path only visits grown triangle boxes in float32. Small D keeps it to a second or two on a CPU.
"""

import numpy as np
import pytest
import torch
import trimesh

from s2core.mesh.voxelize import mesh_to_latent_index, normalize_vertices, point_triangle_distance

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _closest_point_distance(p, a, b, c):
    """Ericson, Real-Time Collision Detection §5.1.5: points p [n,1,3] against triangles a, b, c [1,F,3] → [n,F]."""
    dot = lambda x, y: (x * y).sum(-1)  # noqa: E731
    ab, ac, ap, bp, cp = b - a, c - a, p - a, p - b, p - c
    d1, d2, d3, d4, d5, d6 = dot(ap, ab), dot(ap, ac), dot(bp, ab), dot(bp, ac), dot(cp, ab), dot(cp, ac)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = 1.0 / (va + vb + vc)
        q = a + (vb * denom)[..., None] * ab + (vc * denom)[..., None] * ac  # face region
        regions = [  # first matching region wins, in Ericson's order
            ((d1 <= 0) & (d2 <= 0), a + 0 * p),
            ((d3 >= 0) & (d4 <= d3), b + 0 * p),
            ((d6 >= 0) & (d5 <= d6), c + 0 * p),
            ((vc <= 0) & (d1 >= 0) & (d3 <= 0), a + (d1 / (d1 - d3))[..., None] * ab),
            ((vb <= 0) & (d2 >= 0) & (d6 <= 0), a + (d2 / (d2 - d6))[..., None] * ac),
            (
                (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0),
                b + ((d4 - d3) / ((d4 - d3) + (d5 - d6)))[..., None] * (c - b),
            ),
        ]
    for cond, point in reversed(regions):
        q = np.where(cond[..., None], point, q)
    return np.linalg.norm(p - q, axis=-1)


def _dense_reference(mesh, D, factor, threshold=4.0):
    v = normalize_vertices(torch.from_numpy(np.asarray(mesh.vertices, np.float64))).numpy() * 0.5
    f = np.asarray(mesh.faces)
    grid = np.stack(np.meshgrid(*[np.arange(D)] * 3, indexing="ij"), -1).reshape(-1, 3)
    pts = grid / (D - 1) - 0.5
    tri = v[f][None]  # [1, F, 3, 3]
    # only points that can be within the threshold of a triangle: near one of its vertices (cheap pruning)
    edge = np.linalg.norm(tri - np.roll(tri, 1, axis=2), axis=-1).max()
    near = torch.cdist(torch.from_numpy(pts), torch.from_numpy(v)).min(1).values.numpy() < threshold / D + edge
    grid, pts = grid[near], pts[near]
    best = np.concatenate(
        [
            _closest_point_distance(chunk[:, None], tri[:, :, 0], tri[:, :, 1], tri[:, :, 2]).min(1)
            for chunk in np.array_split(pts, max(1, len(pts) // 2048))
        ]
    )
    active = grid[best < threshold / D] // factor
    cells = np.unique(active, axis=0)
    return np.concatenate([np.zeros((len(cells), 1), int), cells], 1)


def _plate():
    m = trimesh.creation.box(extents=(1.0, 0.7, 0.004))  # thin: both faces in one latent cell layer
    m.apply_transform(trimesh.transformations.rotation_matrix(0.3, [1, 2, 0.5]))
    return m


MESHES = {
    "sphere": lambda: trimesh.creation.icosphere(subdivisions=1),
    "torus": lambda: trimesh.creation.torus(major_radius=1.0, minor_radius=0.3, major_sections=12, minor_sections=6),
    "thin-plate": _plate,
}


@pytest.mark.parametrize(
    "name,D,factor",
    [("sphere", 40, 4), ("torus", 33, 8), ("thin-plate", 40, 4)],
    ids=["sphere-D40-f4", "torus-D33-f8", "thin-plate-D40-f4"],
)
def test_matches_dense_reference(name, D, factor):
    mesh = MESHES[name]()
    want = _dense_reference(mesh, D, factor)
    got = mesh_to_latent_index(mesh.vertices, mesh.faces, resolution=D, factor=factor, device="cpu")
    assert got.dtype == torch.int32 and got.shape[1] == 4
    np.testing.assert_array_equal(got.numpy(), want)
    # windows smaller than one big triangle's box give the same set
    small = mesh_to_latent_index(
        mesh.vertices,
        mesh.faces,
        resolution=D,
        factor=factor,
        device="cpu",
        max_candidates=61 if name == "thin-plate" else 4099,
    )
    assert torch.equal(small, got)


def test_point_triangle_distance_rules():
    v0, v1, v2 = torch.tensor([[0.0, 0, 0]]), torch.tensor([[1.0, 0, 0]]), torch.tensor([[0.0, 1, 0]])
    P = lambda *x: torch.tensor([x], dtype=torch.float32)  # noqa: E731
    # above the interior: plane distance; beyond an edge: edge distance; beyond a vertex: vertex distance
    assert point_triangle_distance(P(0.2, 0.2, 0.5), v0, v1, v2).item() == pytest.approx(0.5)
    assert point_triangle_distance(P(0.5, -1.0, 0.0), v0, v1, v2).item() == pytest.approx(1.0)
    assert point_triangle_distance(P(2.0, 0.0, 0.0), v0, v1, v2).item() == pytest.approx(1.0)
    # degenerate: two equal vertices → segment; collinear → distance to v0 (the CUDA kernel's quirk)
    assert point_triangle_distance(P(0.5, 1.0, 0.0), v0, v1, v1).item() == pytest.approx(1.0)
    col = torch.tensor([[2.0, 0, 0]])
    assert point_triangle_distance(P(1.5, 0.0, 0.0), v0, v1, col).item() == pytest.approx(1.5)
    assert point_triangle_distance(P(0.0, 0.0, 3.0), v0, v0, v0).item() == pytest.approx(3.0)


def test_bad_meshes():
    with pytest.raises(ValueError, match="empty"):
        mesh_to_latent_index(np.zeros((3, 3)), np.zeros((0, 3), int), device="cpu")
    v = np.array([[0, 0, 0], [1, 0, 0], [0, np.nan, 0]], float)
    with pytest.raises(ValueError, match="NaN"):
        mesh_to_latent_index(v, np.array([[0, 1, 2]]), device="cpu")
    with pytest.raises(ValueError, match="outside"):
        mesh_to_latent_index(np.eye(3), np.array([[0, 1, 5]]), device="cpu")
    with pytest.raises(ValueError, match="zero extent"):
        mesh_to_latent_index(np.zeros((3, 3)), np.array([[0, 1, 2]]), device="cpu")


def test_non_manifold_mesh_is_fine():
    # three triangles sharing one edge (non-manifold) still voxelize: the index only needs distances
    v = np.array([[0, 0, 0], [1, 0, 0], [0.5, 1, 0], [0.5, -1, 0.2], [0.5, 0, 1]], float)
    f = np.array([[0, 1, 2], [0, 1, 3], [0, 1, 4]])
    got = mesh_to_latent_index(v, f, resolution=24, factor=4, device="cpu")
    want = _dense_reference(trimesh.Trimesh(v, f, process=False), 24, 4)
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    mesh = trimesh.creation.icosphere(subdivisions=4)
    a = mesh_to_latent_index(mesh.vertices, mesh.faces, resolution=256, device="cpu")
    b = mesh_to_latent_index(mesh.vertices, mesh.faces, resolution=256, device="cuda").cpu()
    assert torch.equal(a, b)
