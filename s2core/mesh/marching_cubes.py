"""Marching cubes over the active voxels of a sparse SDF, on any torch device, without a dense grid.

What it reproduces (SPEC.md §10.3, SPARSE.md §4.6): the original writes the sparse SDF into a dense
fp32 R^3 grid filled with +1, runs scikit-image `marching_cubes(grid, level, method="lewiner")` and maps
vertices v -> v / R * 2 - 1. Here only cells that have an active corner below the level are visited
(a cell with no inside corner cannot cross the level, since the fill +1 is never below a level <= 1);
inactive corners read +1, as in the dense grid. Per edge crossing the vertex is
`p0 + t (p1 - p0)`, `t = (level - v0) / (v1 - v0)` computed in fp64 from the fp32 values and rounded to
fp32: bitwise scikit-image's vertex for the same edge (checked in tests). Vertices are welded by
their grid edge, so each crossing is one vertex shared by every triangle that uses it.

Differences from Lewiner (documented, tested): on a face whose corners alternate inside/outside we
join/separate with the same asymptotic decider, but inside a cube we never add Lewiner's extra centre
vertex and triangulate each contour loop as a fan, so triangles (not vertex positions) may differ in
ambiguous cells. The output is watertight wherever the inside region does not touch the grid border.

Cube layout (see mc_tables.py for the full convention)::

            6 ─────── 7        corner i = (i & 1, i >> 1 & 1, i >> 2 & 1)
           ╱│        ╱│        edges  x: 0 (0,1) 1 (2,3) 2 (4,5) 3 (6,7)
          4 ─────── 5 │               y: 4 (0,2) 5 (1,3) 6 (4,6) 7 (5,7)
          │ 2 ──────│ 3               z: 8 (0,4) 9 (1,5) 10 (2,6) 11 (3,7)
          │╱        │╱
          0 ─────── 1

Public: `sparse_sdf_to_mesh(coords, sdf, resolution, threshold)` (original frame) and
`marching_cubes_sparse(...)` (index space); `marching_cubes_naive(volume, level)` is the loop-per-cell
twin on a small dense numpy volume, for tests only.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .mc_tables import CORNERS, EDGE_AXIS, EDGES, FACES, is_ambiguous, triangle_table

log = logging.getLogger(__name__)

__all__ = ["sparse_sdf_to_mesh", "marching_cubes_sparse", "marching_cubes_naive"]

BACKGROUND = 1.0  # value of every inactive voxel in the original's dense grid
_MAX_CELLS = 1 << 23  # candidate cells per slab (bounds memory: ~50 bytes per cell and corner)


def _grid_keys(xyz: torch.Tensor, r: int) -> torch.Tensor:
    xyz = xyz.long()
    return (xyz[..., 0] * r + xyz[..., 1]) * r + xyz[..., 2]


def _unique_last(keys: torch.Tensor, values: torch.Tensor):
    """Sorted unique keys, keeping the value of the last duplicate (the dense scatter's last write)."""
    keys, order = torch.sort(keys, stable=True)
    values = values[order]
    last = torch.ones_like(keys, dtype=torch.bool)
    last[:-1] = keys[1:] != keys[:-1]
    return keys[last], values[last]


def _surface_voxels(xyz: torch.Tensor, keys: torch.Tensor, inside: torch.Tensor, r: int) -> torch.Tensor:
    """Rows of xyz (inside voxels) with an outside voxel among their 6 axis neighbours in the grid.

    A cell that crosses the level has a cube edge with one inside and one outside end, so its inside
    end is such a voxel: cells around the other inside voxels are entirely inside and can be skipped."""
    six = torch.tensor([[-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1], [0, 0, 1]], device=xyz.device)
    nb = xyz[:, None, :] + six[None]  # [K, 6, 3]
    in_grid = ((nb >= 0) & (nb < r)).all(2)
    nbk = _grid_keys(nb, r)
    pos = torch.searchsorted(keys, nbk).clamp_(max=keys.numel() - 1)
    nb_inside = (keys[pos] == nbk) & inside[pos]
    return xyz[(in_grid & ~nb_inside).any(1)]


def _cells_in_slab(inside_xyz: torch.Tensor, x0: int, x1: int, r: int) -> torch.Tensor:
    """Unique cell origins with x in [x0, x1) that have an inside corner among inside_xyz."""
    d = torch.tensor(CORNERS, device=inside_xyz.device)  # [8, 3]
    cand = (inside_xyz[:, None, :] - d[None]).reshape(-1, 3)
    ok = (cand >= 0).all(1) & (cand <= r - 2).all(1) & (cand[:, 0] >= x0) & (cand[:, 0] < x1)
    return torch.unique(_grid_keys(cand[ok], r))


def _face_bits(vals: torch.Tensor) -> torch.Tensor:
    """[M] int64 bit f set when face f's inside corners are joined (asymptotic decider, Lewiner's test)."""
    bits = torch.zeros(vals.shape[0], dtype=torch.int64, device=vals.device)
    for f, (q0, q1, q2, q3) in enumerate(FACES):
        a, b, c, d = vals[:, q0], vals[:, q1], vals[:, q2], vals[:, q3]
        # on an ambiguous face one diagonal is inside (< 0) and the other outside; the diagonal with
        # the larger product of values is the connected one
        inside_ac = a < 0
        joined = torch.where(inside_ac, a * c > b * d, b * d > a * c)
        bits |= joined.long() << f
    return bits


def marching_cubes_sparse(coords: torch.Tensor, sdf: torch.Tensor, resolution: int, level: float):
    """Index-space marching cubes of a sparse field (inactive = +1) -> (verts [V, 3] fp32, faces [F, 3] int64).

    coords [N, 3] integer (x, y, z) in [0, resolution); sdf [N] (any float dtype, read as fp32).
    Duplicate coordinates keep the last value, as a dense scatter does.
    """
    if level > BACKGROUND:
        raise ValueError(f"mc threshold {level} is above the background value {BACKGROUND} of inactive voxels; "
                         f"use a threshold <= 1 (the original uses 0.2).")
    device = coords.device
    r = int(resolution)
    if coords.shape[0] and (int(coords.min()) < 0 or int(coords.max()) >= r):
        raise ValueError(f"sparse SDF coordinates must lie in [0, {r}); got [{int(coords.min())}, "
                         f"{int(coords.max())}] — is the resolution right?")
    keys, values = _unique_last(_grid_keys(coords, r), sdf.reshape(-1).float())
    inside = values < level
    inside_xyz = torch.stack([keys // (r * r), keys // r % r, keys % r], 1)[inside]  # sorted by x
    empty = (torch.zeros(0, 3, dtype=torch.float32, device=device), torch.zeros(0, 3, dtype=torch.int64, device=device))
    if inside_xyz.shape[0] == 0:
        return empty
    table = triangle_table().to(device)
    corner_off = torch.tensor(CORNERS, device=device)  # [8, 3]
    edge_a = torch.tensor([a for a, _ in EDGES], device=device)
    edge_b = torch.tensor([b for _, b in EDGES], device=device)
    edge_axis = torch.tensor(EDGE_AXIS, device=device)

    # slabs of cell x so that candidate cells stay bounded; a slab [x0, x1) needs inside voxels with x in [x0, x1]
    xs = inside_xyz[:, 0]
    per_x = torch.bincount(xs, minlength=r).cumsum(0).tolist()  # one sync, outside any hot loop
    bounds, x0 = [], 0
    while x0 < r - 1:
        x1 = x0 + 1
        while x1 < r - 1 and (per_x[x1] - (per_x[x0 - 1] if x0 else 0)) * 8 < _MAX_CELLS:
            x1 += 1
        bounds.append((x0, x1))
        x0 = x1
    edge_keys, edge_pos, face_keys = [], [], []
    for x0, x1 in bounds:  # slabs of cells, not cells
        lo = per_x[x0 - 1] if x0 else 0
        hi = per_x[x1] if x1 < r else per_x[-1]
        if hi == lo:
            continue
        cells = _cells_in_slab(_surface_voxels(inside_xyz[lo:hi], keys, inside, r), x0, x1, r)  # [M] origins
        origin = torch.stack([cells // (r * r), cells // r % r, cells % r], 1)  # [M, 3]
        corner_keys = _grid_keys(origin[:, None, :] + corner_off[None], r)  # [M, 8]
        pos = torch.searchsorted(keys, corner_keys).clamp_(max=keys.numel() - 1)
        vals = torch.where(keys[pos] == corner_keys, values[pos], torch.full_like(values[pos], BACKGROUND))
        rel = vals - level  # [M, 8], inside < 0
        cube = ((rel < 0).long() << torch.arange(8, device=device)).sum(1)
        keep = (cube > 0) & (cube < 255)
        origin, vals, rel, cube = origin[keep], vals[keep], rel[keep], cube[keep]
        tris = table[cube * 64 + _face_bits(rel)].long()  # [M, T, 3] edge ids, -1 padded
        cell_idx, slot = torch.nonzero(tris[:, :, 0] >= 0, as_tuple=True)
        e = tris[cell_idx, slot]  # [F, 3]
        c = cell_idx[:, None].expand_as(e)
        p0 = origin[c] + corner_off[edge_a[e]]  # [F, 3, 3] grid point at the edge's low end
        v0 = vals[c, edge_a[e]].double()
        v1 = vals[c, edge_b[e]].double()
        t = (level - v0) / (v1 - v0)  # fp64 like scikit-image, then fp32
        xyz = p0.double()
        xyz[torch.arange(3, device=device).view(1, 1, 3) == edge_axis[e][..., None]] += t.reshape(-1)
        face_keys.append(_grid_keys(p0, r) * 3 + edge_axis[e])  # one key per grid edge
        edge_keys.append(face_keys[-1].reshape(-1))
        edge_pos.append(xyz.float().reshape(-1, 3))
    if not face_keys:
        return empty
    all_keys = torch.cat(edge_keys)
    uniq, inverse = torch.unique(all_keys, return_inverse=True)
    verts = torch.empty(uniq.numel(), 3, dtype=torch.float32, device=device)
    verts[inverse] = torch.cat(edge_pos)  # every copy of an edge vertex is bitwise the same
    faces = inverse.reshape(-1, 3)
    return verts, faces


def sparse_sdf_to_mesh(coords: torch.Tensor, sdf: torch.Tensor, resolution: int, threshold: float):
    """Mesh of one sparse SDF in the original's frame: vertices v / R * 2 - 1 in [-1, 1]^3.

    coords [N, 3] (x, y, z) or [N, 4] (batch, x, y, z) with a single batch element; sdf [N] or [N, 1].
    Returns (vertices [V, 3] fp32, faces [F, 3] int64) on coords' device; both empty (with a warning)
    when no voxel is below the threshold.
    """
    if coords.shape[1] == 4:
        if coords.shape[0] and int(coords[:, 0].max()) != int(coords[:, 0].min()):
            raise ValueError("sparse_sdf_to_mesh meshes one object at a time; split the batch first.")
        coords = coords[:, 1:]
    verts, faces = marching_cubes_sparse(coords, sdf, resolution, threshold)
    if faces.shape[0] == 0:
        log.warning("The decoded SDF has no voxel below the threshold %s, so the mesh is empty; "
                    "check the structure or lower mc_threshold.", threshold)
    return verts / resolution * 2 - 1, faces


# ------------------------------------------------------------------------------------------------
# naive twin (tests only)

def marching_cubes_naive(volume: np.ndarray, level: float):
    """Loop-per-cell marching cubes of a small dense volume with the same conventions -> (verts, faces)."""
    vol = np.asarray(volume, dtype=np.float32)
    table = triangle_table()
    vert_id, verts, faces = {}, [], []
    nx, ny, nz = vol.shape
    for x in range(nx - 1):
        for y in range(ny - 1):
            for z in range(nz - 1):
                vals = [float(vol[x + cx, y + cy, z + cz]) for cx, cy, cz in CORNERS]
                inside = [v < level for v in vals]
                cube = sum(1 << i for i in range(8) if inside[i])
                if cube in (0, 255):
                    continue
                bits = 0
                for f, (q0, q1, q2, q3) in enumerate(FACES):
                    if is_ambiguous(inside, f):
                        a, b, c, d = (vals[q] - level for q in (q0, q1, q2, q3))
                        bits |= int(a * c > b * d if a < 0 else b * d > a * c) << f
                for tri in table[cube * 64 + bits].tolist():
                    if tri[0] < 0:
                        break
                    ids = []
                    for e in tri:
                        a, b = EDGES[e]
                        p0 = (x + CORNERS[a][0], y + CORNERS[a][1], z + CORNERS[a][2])
                        key = (p0, EDGE_AXIS[e])
                        if key not in vert_id:
                            t = (level - vals[a]) / (vals[b] - vals[a])
                            p = list(p0)
                            p[EDGE_AXIS[e]] = np.float32(p[EDGE_AXIS[e]] + t)
                            vert_id[key] = len(verts)
                            verts.append(p)
                        ids.append(vert_id[key])
                    faces.append(ids)
    return np.asarray(verts, dtype=np.float32).reshape(-1, 3), np.asarray(faces, dtype=np.int64).reshape(-1, 3)
