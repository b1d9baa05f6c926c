"""Mesh → sparse latent index, as the original's `mesh2index` computes it, without a dense grid (SPEC.md §10.2).

The original normalises the mesh (`normalize_mesh`, longest side to [-0.95, 0.95]), halves it, and runs a
CUDA kernel that fills a dense `size³` int32 grid (4 GiB at 1024) with the distance of each lattice point
to the nearest triangle; lattice point (i, j, k) sits at (i/(size-1) - 0.5, ...). Every lattice point
closer than 4/size to the surface marks its latent cell (i//8, j//8, k//8); the unique cells, sorted, are
the tokens of the 1024 stage.

Here only lattice points near the surface are ever touched: each triangle's bounding box in lattice
indices, grown by 5 points on each side (the original's box; the distance threshold is under 4 lattice
steps), is the candidate set. It is walked in two levels: first the (triangle, latent cell) pairs the
box overlaps, dropping cells already marked; then the box's lattice points inside each remaining cell
(at most factor³), dropping again any cell marked meanwhile, and only those get a distance. Each level
is one flat range over all triangles walked in windows of `max_candidates`, so memory is bounded
whatever the triangle sizes. The distance is the kernel's point–triangle distance in float32,
degenerate-triangle rules included (`point_triangle_distance`). The only grid is the latent occupancy,
(size/factor)³ bools (2 MiB at 1024/8).

Letters: F triangles, V vertices, n candidates in a window, D = size (lattice points per axis).
"""
from __future__ import annotations

import numpy as np
import torch

GROW = 5  # lattice points added on each side of a triangle's box: int(threshold + 1) with threshold 4


def normalize_vertices(vertices: torch.Tensor, scale: float = 0.95) -> torch.Tensor:
    """Centre the bounding box at the origin and scale its longest side to [-scale, scale] (`normalize_mesh`)."""
    lo, hi = vertices.min(0).values, vertices.max(0).values
    extent = float((hi - lo).max())
    if not extent > 0:
        raise ValueError("The mesh has zero extent (all vertices coincide), so it cannot be normalised; "
                         "pass a mesh with a surface.")
    return (vertices - (lo + hi) / 2) * (2.0 * scale / extent)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


def _segment_distance(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance from points p [n,3] to segments ab, projection parameter clamped to [0, 1]."""
    d = b - a
    t = _dot(p - a, d) / _dot(d, d)
    closest = torch.where((t < 0)[:, None], a, torch.where((t > 1)[:, None], b, a + t[:, None] * d))
    return (p - closest).norm(dim=-1)


def point_triangle_distance(p: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """Unsigned distance [n] from points p [n,3] to triangles (v0, v1, v2) [n,3] each, with the CUDA kernel's rules.

    * all three vertices equal → distance to v0; two equal → distance to the segment they leave
      (v0==v1 → v0v2, otherwise v0v1);
    * zero normal without equal vertices (collinear) → distance to v0 (the kernel's quirk, kept);
    * otherwise the plane distance if the projection is strictly inside (the three edge cross products
      pairwise have positive dot products), else the nearest of the three edges.
    """
    e0, e1 = v1 - v0, v2 - v0
    normal = torch.cross(e0, e1, dim=-1)
    nn2 = _dot(normal, normal)
    q = p - v0
    unit = normal / nn2.sqrt().clamp_min(torch.finfo(p.dtype).tiny)[:, None]
    plane = _dot(unit, q)
    proj = p - plane[:, None] * unit
    c0 = torch.cross(v0 - v1, v0 - proj, dim=-1)
    c1 = torch.cross(v1 - v2, v1 - proj, dim=-1)
    c2 = torch.cross(v2 - v0, v2 - proj, dim=-1)
    inside = (_dot(c0, c1) > 0) & (_dot(c1, c2) > 0) & (_dot(c0, c2) > 0)
    s01 = _segment_distance(p, v0, v1)
    s02 = _segment_distance(p, v0, v2)
    s12 = _segment_distance(p, v1, v2)
    d = torch.where(inside, plane.abs(), torch.minimum(torch.minimum(s01, s02), s12))
    d = torch.where(nn2 == 0, q.norm(dim=-1), d)
    eq01, eq02, eq12 = (v0 == v1).all(-1), (v0 == v2).all(-1), (v1 == v2).all(-1)
    d = torch.where(eq12 | eq02, s01, d)
    d = torch.where(eq01, s02, d)
    return torch.where(eq01 & eq02, q.norm(dim=-1), d)


def _as_tensor(x, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(x), device=device).to(dtype)


def check_mesh(vertices: torch.Tensor, faces: torch.Tensor) -> None:
    """Raise a ValueError a person can act on for empty meshes, bad shapes, non-finite vertices, bad faces."""
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"Expected vertices [V, 3] and triangle faces [F, 3], got {tuple(vertices.shape)} and "
                         f"{tuple(faces.shape)}; triangulate the mesh first.")
    if faces.shape[0] == 0 or vertices.shape[0] == 0:
        raise ValueError("The mesh is empty (no faces), so there is no surface to voxelize; connect a mesh "
                         "with triangles.")
    if not bool(torch.isfinite(vertices).all()):
        raise ValueError("The mesh has NaN or infinite vertex coordinates; repair or re-export it before use.")
    if int(faces.min()) < 0 or int(faces.max()) >= vertices.shape[0]:
        raise ValueError(f"The mesh's faces index vertices outside [0, {vertices.shape[0] - 1}]; the file is "
                         "corrupt or faces and vertices do not belong together.")


def _windows(box_lo: torch.Tensor, box_dims: torch.Tensor, window: int):
    """All integer points of K boxes ([K, 3] low corners and extents) as one flat range, in windows.

    Yields (box id [n], point [n, 3]) for at most `window` points at a time; boxes may span windows."""
    counts = box_dims.clamp_min(0).prod(1)
    if counts.numel() == 0:
        return
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    total = int(ends[-1])
    for first in range(0, total, window):  # windows of points, not a loop over boxes
        flat = torch.arange(first, min(first + window, total), device=box_lo.device)
        b = torch.searchsorted(ends, flat, right=True)
        local = flat - starts[b]
        ny, nz = box_dims[b, 1], box_dims[b, 2]
        yield b, torch.stack([local // (ny * nz), local // nz % ny, local % nz], 1) + box_lo[b]


@torch.no_grad()
def mesh_to_latent_index(vertices, faces, resolution: int = 1024, factor: int = 8, threshold: float = 4.0,
                         normalize: bool = True, device: torch.device | str | None = None,
                         max_candidates: int = 1 << 21) -> torch.Tensor:
    """Latent cells [N, 4] int32 (0, x, y, z), sorted, of the lattice points within threshold/resolution of the mesh.

    vertices [V, 3], faces [F, 3] (numpy or torch). normalize: apply `normalize_vertices` first (the
    pipeline always does, `mesh2index` itself does not). Coordinates lie in [0, ceil(resolution/factor)).
    device: where to compute (default CUDA when available). max_candidates bounds the (triangle, cell)
    pairs and lattice points examined at once (memory ~ 0.5 KB each).
    """
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    verts = _as_tensor(vertices, torch.float64, device)
    tri_idx = _as_tensor(faces, torch.int64, device)
    check_mesh(verts, tri_idx)
    if normalize:
        verts = normalize_vertices(verts)
    D = int(resolution)
    verts = verts.float() * 0.5  # the original halves float32 vertices: the mesh sits in [-0.475, 0.475]
    tris = verts[tri_idx]  # [F, 3 vertices, 3 coords]

    # per-triangle lattice box, grown and clamped as the kernel does; its exact rounding cannot matter
    # because the box is more than a lattice step wider than the distance threshold on every side
    lo = torch.floor((tris.min(1).values.double() + 0.5) * (D - 1)).long() - GROW
    hi = torch.floor((tris.max(1).values.double() + 0.5) * (D - 1)).long() + GROW
    lo, hi = lo.clamp(0, D - 1), hi.clamp(0, D - 1)
    L = (D - 1) // factor + 1
    occupied = torch.zeros(L * L * L, dtype=torch.bool, device=device)
    limit = threshold / D  # float32 in the kernel; 4/1024 is exact

    # Level 1: (triangle, latent cell) pairs of each triangle's box, skipping cells already marked.
    # Level 2: the box's lattice points inside each surviving cell (at most factor³), distance-tested.
    # A point can only mark its own cell, so points in marked cells never need a distance.
    clo, chi = lo // factor, hi // factor
    for t, cell in _windows(clo, chi - clo + 1, max_candidates):  # [n] triangle ids, [n, 3] cells
        key = (cell[:, 0] * L + cell[:, 1]) * L + cell[:, 2]
        todo = ~occupied[key]
        t, cell, key = t[todo], cell[todo], key[todo]
        sub_lo = torch.maximum(lo[t], cell * factor)  # the triangle's box clipped to the cell
        sub_hi = torch.minimum(hi[t], cell * factor + factor - 1)
        for j, ijk in _windows(sub_lo, sub_hi - sub_lo + 1, max_candidates):
            k = key[j]
            live = ~occupied[k]  # marked by an earlier window of this pass
            ijk, k, tri = ijk[live], k[live], tris[t[j[live]]]
            d = point_triangle_distance(ijk.float() / (D - 1) - 0.5, tri[:, 0], tri[:, 1], tri[:, 2])
            occupied[k[d < limit]] = True
    cells = occupied.view(L, L, L).nonzero()  # lexicographic, as torch.unique orders the original's rows
    return torch.cat([torch.zeros_like(cells[:, :1]), cells], 1).int()


def candidate_count(vertices, faces, resolution: int = 1024) -> int:
    """How many lattice points `mesh_to_latent_index` would examine before skipping (for benchmarks)."""
    verts = normalize_vertices(_as_tensor(vertices, torch.float64, torch.device("cpu"))).float() * 0.5
    tris = verts[_as_tensor(faces, torch.int64, torch.device("cpu"))]
    D = resolution
    lo = (torch.floor((tris.min(1).values.double() + 0.5) * (D - 1)).long() - GROW).clamp(0, D - 1)
    hi = (torch.floor((tris.max(1).values.double() + 0.5) * (D - 1)).long() + GROW).clamp(0, D - 1)
    return int((hi - lo + 1).prod(1).sum())


