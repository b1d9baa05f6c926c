"""Marching cubes over the active voxels of a sparse SDF, on any torch device, without a dense grid.

What it reproduces (SPEC.md §10.3, SPARSE.md §4.6): the original writes the sparse SDF into a dense
fp32 R^3 grid filled with +1, runs scikit-image `marching_cubes(grid, level, method="lewiner")` and maps
vertices v -> v / R * 2 - 1. Here only cells that have an active corner below the level are visited
(a cell with no inside corner cannot cross the level, since the fill +1 is never below a level <= 1);
inactive corners read +1, as in the dense grid. Per edge crossing the vertex is
`p0 + t (p1 - p0)`, `t = (level - v0) / (v1 - v0)` computed in fp64 from the fp32 values and rounded to
fp32: bitwise scikit-image's vertex for the same edge (checked in tests). Vertices are welded by
their grid edge, so each crossing is one vertex shared by every triangle that uses it.

Triangles (mc_tables.py has the rules): each contour loop on the cell's faces becomes a disk whose
inner edges never join two vertices of one cube face, so every edge is a contour segment shared with
exactly one neighbouring cell or lies inside one cell: the mesh is edge-manifold, consistently oriented
and watertight wherever the inside region does not touch the grid border (tests/test_marching_cubes_
manifold.py). Ambiguous faces use Lewiner's asymptotic decider. A loop that crosses a face twice and
has no vertex off that face is fanned from an extra centre vertex (the mean of its edge vertices), as
Lewiner's cases 7, 12 and 13 are. Differences from scikit-image's Lewiner (documented, tested): no
interior test (loops of one cell stay separate disks where Lewiner may join them by a tunnel), centre
vertices where Lewiner's table has none or elsewhere, and the 32 unambiguous hexagon configurations
split another way; every other unambiguous cell gives Lewiner's triangles exactly.

Cube layout (see mc_tables.py for the full convention)::

            6 ─────── 7        corner i = (i & 1, i >> 1 & 1, i >> 2 & 1)
           ╱│        ╱│        edges  x: 0 (0,1) 1 (2,3) 2 (4,5) 3 (6,7)
          4 ─────── 5 │               y: 4 (0,2) 5 (1,3) 6 (4,6) 7 (5,7)
          │ 2 ──────│ 3               z: 8 (0,4) 9 (1,5) 10 (2,6) 11 (3,7)
          │╱        │╱
          0 ─────── 1

Public: `sparse_sdf_to_mesh(coords, sdf, resolution, threshold)` (one object, original frame; also
accepts a batched SparseTensor), `meshes_from_sparse_sdf(sdf_tensor, resolution, threshold)` (one list
item per batch element, one vectorised pass) and `marching_cubes_sparse(...)` (index space); `marching_cubes_naive(volume, level)` is the loop-per-cell
twin on a small dense numpy volume, for tests only.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..sparse.tensor import SparseTensor
from .mc_tables import CENTRE, CORNERS, EDGE_AXIS, EDGES, FACES, is_ambiguous, loop_table, triangle_table

log = logging.getLogger(__name__)

__all__ = [
    "sparse_sdf_to_mesh",
    "meshes_from_sparse_sdf",
    "marching_cubes_sparse",
    "marching_cubes_naive",
    "key_coords",
    "lookup_keys",
    "Welder",
]

BACKGROUND = 1.0  # value of every inactive voxel in the original's dense grid
KEY_SLOTS = 8  # vertex key = grid key * KEY_SLOTS + slot: 0-2 edge axis, 3 + j centre of loop j
_MAX_CELLS = 1 << 21  # candidate cells per slab: bounds the per-slab transients (~100 bytes a candidate)


def _grid_keys(bxyz: torch.Tensor, r: int) -> torch.Tensor:
    """[..., 4] (b, x, y, z) -> int64 keys, lexicographic."""
    c = bxyz.long()
    return ((c[..., 0] * r + c[..., 1]) * r + c[..., 2]) * r + c[..., 3]


def key_coords(keys: torch.Tensor, r: int) -> torch.Tensor:
    """[M] int64 keys ((b·r + x)·r + y)·r + z → [M, 4] (b, x, y, z)."""
    return torch.stack([keys // r**3, keys // (r * r) % r, keys // r % r, keys % r], -1)


def _unique_last(keys: torch.Tensor, values: torch.Tensor):
    """Sorted unique keys, keeping the value of the last duplicate (the dense scatter's last write)."""
    keys, order = torch.sort(keys, stable=True)
    values = values[order]
    last = torch.ones_like(keys, dtype=torch.bool)
    last[:-1] = keys[1:] != keys[:-1]
    return keys[last], values[last]


def lookup_keys(keys: torch.Tensor, query: torch.Tensor):
    """Row of each query key in the sorted `keys` and whether it is there."""
    pos = torch.searchsorted(keys, query).clamp_(max=keys.numel() - 1)
    return pos, keys[pos] == query


def _surface_voxels(bxyz: torch.Tensor, keys: torch.Tensor, inside: torch.Tensor, r: int) -> torch.Tensor:
    """Rows of bxyz (inside voxels) with an outside voxel among their 6 axis neighbours in the grid.

    A cell that crosses the level has a cube edge with one inside and one outside end, so its inside
    end is such a voxel: cells around the other inside voxels are entirely inside and can be skipped."""
    six = torch.tensor(
        [[0, -1, 0, 0], [0, 1, 0, 0], [0, 0, -1, 0], [0, 0, 1, 0], [0, 0, 0, -1], [0, 0, 0, 1]], device=bxyz.device
    )
    nb = bxyz[:, None, :] + six[None]  # [K, 6, 4]
    in_grid = ((nb[..., 1:] >= 0) & (nb[..., 1:] < r)).all(2)
    pos, found = lookup_keys(keys, _grid_keys(nb, r))
    return bxyz[(in_grid & ~(found & inside[pos])).any(1)]


def _cells_in_slab(inside_bxyz: torch.Tensor, row0: int, row1: int, r: int) -> torch.Tensor:
    """Unique keys of cell origins with b * r + x in [row0, row1) that have a corner among inside_bxyz."""
    d = torch.tensor([(0, *c) for c in CORNERS], device=inside_bxyz.device)  # [8, 4]
    cand = (inside_bxyz[:, None, :] - d[None]).reshape(-1, 4)
    row = cand[:, 0] * r + cand[:, 1]
    ok = (cand[:, 1:] >= 0).all(1) & (cand[:, 1:] <= r - 2).all(1) & (row >= row0) & (row < row1)
    return torch.unique(_grid_keys(cand[ok], r))


def _face_bits(vals: torch.Tensor) -> torch.Tensor:
    """[M] int64 bit f set when face f's inside corners are joined (asymptotic decider, Lewiner's test)."""
    bits = torch.zeros(vals.shape[0], dtype=torch.int64, device=vals.device)
    for f, (q0, q1, q2, q3) in enumerate(FACES):
        a, b, c, d = vals[:, q0], vals[:, q1], vals[:, q2], vals[:, q3]
        # on an ambiguous face one diagonal is inside (< 0) and the other outside; the diagonal with
        # the larger product of values is the connected one
        joined = torch.where(a < 0, a * c > b * d, b * d > a * c)
        bits |= joined.long() << f
    return bits


def _marching_cubes_batched(
    bxyz: torch.Tensor, sdf: torch.Tensor, r: int, level: float, batch_size: int, check_cancel=None
):
    """Core: (verts [V, 3] fp32 index space, faces [F, 3] int64 global, vertex batch ids [V]).

    Vertices come sorted by batch element (their keys start with b), each element's contiguous."""
    if level > BACKGROUND:
        raise ValueError(
            f"mc threshold {level} is above the background value {BACKGROUND} of inactive voxels; "
            f"use a threshold <= 1 (the original uses 0.2)."
        )
    device = bxyz.device
    if bxyz.shape[0] and (int(bxyz[:, 1:].min()) < 0 or int(bxyz[:, 1:].max()) >= r):
        raise ValueError(
            f"sparse SDF coordinates must lie in [0, {r}); got [{int(bxyz[:, 1:].min())}, "
            f"{int(bxyz[:, 1:].max())}] — is the resolution right?"
        )
    empty = (
        torch.zeros(0, 3, dtype=torch.float32, device=device),
        torch.zeros(0, 3, dtype=torch.int64, device=device),
        torch.zeros(0, dtype=torch.int64, device=device),
    )
    keys, values = _unique_last(_grid_keys(bxyz, r), sdf.reshape(-1).float())
    inside = values < level
    inside_bxyz = key_coords(keys[inside], r)  # sorted by (b, x)
    if inside_bxyz.shape[0] == 0:
        return empty
    # slabs of cell rows (b * r + x) keep the candidate cells bounded; rows [r0, r1) need voxel rows [r0, r1]
    n_rows = batch_size * r
    per_row = torch.bincount(inside_bxyz[:, 0] * r + inside_bxyz[:, 1], minlength=n_rows).cumsum(0).tolist()
    bounds, r0 = [], 0
    while r0 < n_rows:  # one sync above; this walks rows on the host, not voxels
        r1 = r0 + 1
        while r1 < n_rows and (per_row[min(r1, n_rows - 1)] - (per_row[r0 - 1] if r0 else 0)) * 8 < _MAX_CELLS:
            r1 += 1
        bounds.append((r0, r1))
        r0 = r1
    welder = Welder(r, level, device)
    for r0, r1 in bounds:  # slabs of cells, not cells
        if check_cancel is not None:  # raises to stop
            check_cancel()
        lo = per_row[r0 - 1] if r0 else 0
        hi = per_row[min(r1, n_rows - 1)]
        if hi == lo:
            continue
        cells = _cells_in_slab(_surface_voxels(inside_bxyz[lo:hi], keys, inside, r), r0, r1, r)
        pos, found = lookup_keys(keys, cells[:, None] + welder.corner_keys[None])  # [M, 8]
        vals = torch.where(found, values[pos], BACKGROUND)
        del pos, found
        welder.add(cells, vals)
    return welder.finish()


class Welder:
    """Triangulates chunks of cells and welds their vertices by grid edge, with bounded memory.

    Each `add(cell_keys [M], corner_values [M, 8])` keeps only the chunk's faces (as indices into its own
    sorted unique edges) and one vertex per unique edge; `finish` ranks all chunks' edges together. The
    output is what one global `unique` over every triangle corner gives (vertices sorted by edge key,
    faces in chunk/cell/slot order) without holding an int64 key and an xyz per triangle corner.
    """

    def __init__(self, r: int, level: float, device):
        self.r, self.level, self.device = r, level, device
        self.table = triangle_table().to(device)  # [256 * 64, T, 3] int8 vertex slots, -1 padded
        self.loops = loop_table().to(device)  # [256 * 64, 12] int8 loop number of centred loops' edges
        self.corner_offsets = torch.tensor(CORNERS, device=device)  # [8, 3]
        self.corner_keys = torch.tensor([(cx * r + cy) * r + cz for cx, cy, cz in CORNERS], device=device)
        self.edge_a = torch.tensor([a for a, _ in EDGES], device=device)
        self.edge_b = torch.tensor([b for _, b in EDGES], device=device)
        self.edge_axis = torch.tensor(EDGE_AXIS, device=device)
        self.faces: list[torch.Tensor] = []
        self.keys: list[torch.Tensor] = []
        self.verts: list[torch.Tensor] = []
        self.sizes: list[int] = []

    def add(self, cells: torch.Tensor, vals: torch.Tensor) -> None:
        """cells [M] int64 grid keys of cell min corners; vals [M, 8] fp32 corner values (corner order)."""
        r, level, device = self.r, self.level, self.device
        rel = vals - level  # inside < 0
        cube = ((rel < 0).long() << torch.arange(8, device=device)).sum(1)
        keep = (cube > 0) & (cube < 255)
        cells, vals, rel, cube = cells[keep], vals[keep], rel[keep], cube[keep]
        row = cube * 64 + _face_bits(rel)  # [M] table row
        tris = self.table[row]  # [M, T, 3] int8 vertex slots, -1 padded
        del rel, cube
        cell_idx, slot = torch.nonzero(tris[:, :, 0] >= 0, as_tuple=True)
        s = tris[cell_idx, slot].long()  # [F, 3] slots: 0-11 edges, CENTRE + j loop centres
        del tris, slot
        if s.numel() == 0:
            return
        # one key per vertex: (grid key) * KEY_SLOTS + slot, with an edge keyed by its low end and its
        # axis (0-2) and a loop centre by its cell and 3 + loop number; keys are linear in (b, x, y, z)
        e = s.clamp(max=CENTRE - 1)
        centre = s >= CENTRE
        base = torch.where(centre, 0, self.corner_keys[self.edge_a[e]]) + cells[cell_idx][:, None]
        vkeys = base * KEY_SLOTS + torch.where(centre, s - CENTRE + 3, self.edge_axis[e])  # [F, 3]
        del e, centre, base
        ukeys, inverse = torch.unique(vkeys.reshape(-1), return_inverse=True)
        # on CUDA the unique values keep a storage of the input's size (3 keys a face), and these stay held
        # until `finish`: a compact copy. With int64 faces beside them, the chunks of a 51 M-face mesh held
        # 2.3 GiB and a 5 GiB-capped chain ran out of memory here (bench/results/e2e.md)
        ukeys = ukeys.clone()
        del vkeys
        # one occurrence per unique vertex: every copy of an edge vertex is bitwise the same
        rep = torch.empty_like(ukeys).scatter_(0, inverse, torch.arange(inverse.numel(), device=device))
        c, vslot = cell_idx[rep // 3], s.reshape(-1)[rep]
        xyz = key_coords(ukeys // KEY_SLOTS, r)[:, 1:].double()  # an edge's low end, a centre's cell
        edge = vslot.clamp(max=CENTRE - 1)
        v0, v1 = vals[c, self.edge_a[edge]].double(), vals[c, self.edge_b[edge]].double()
        t = (level - v0) / (v1 - v0)  # fp64 like scikit-image, then fp32
        del v0, v1
        is_edge = vslot < CENTRE
        t = torch.where(is_edge, t, 0.0)  # a centre's clamped slot may not cross (t inf or NaN)
        xyz += (torch.arange(3, device=device) == self.edge_axis[edge][:, None]) * t[:, None]
        del t, edge
        if not bool(is_edge.all()):  # a few cells: the mean of their loop's edge vertices
            centre = (~is_edge).nonzero()[:, 0]
            cc, j = c[centre], vslot[centre] - CENTRE
            member = self.loops[row[cc]] == j[:, None]  # [Mc, 12]
            ring = (self._edge_offsets(vals[cc]) + xyz[centre][:, None]).float().double()  # [Mc, 12, 3] as stored
            ring = torch.where(member[..., None], ring, 0.0)  # edges off the loop may not cross (inf, NaN)
            xyz[centre] = ring.sum(1) / member.sum(1, keepdim=True)  # mean in fp64
        self.faces.append(inverse.reshape(-1, 3).int())  # chunk-local indices: int32 holds half of int64
        self.sizes.append(ukeys.numel())
        self.keys.append(ukeys)
        self.verts.append(xyz.float())

    def _edge_offsets(self, vals: torch.Tensor) -> torch.Tensor:
        """[K, 8] corner values -> [K, 12, 3] fp64 offsets of all 12 edges' crossings from the cell's
        min corner (meaningless on edges that do not cross)."""
        v0, v1 = vals[:, self.edge_a].double(), vals[:, self.edge_b].double()  # [K, 12]
        t = (self.level - v0) / (v1 - v0)
        axis = torch.arange(3, device=vals.device) == self.edge_axis[:, None]  # [12, 3]
        return self.corner_offsets[self.edge_a].double() + axis * t[..., None]

    def finish(self):
        """(verts [V, 3] fp32 index space, faces [F, 3] int64, vertex batch ids [V])."""
        if not self.keys:
            return (
                torch.zeros(0, 3, dtype=torch.float32, device=self.device),
                torch.zeros(0, 3, dtype=torch.int64, device=self.device),
                torch.zeros(0, dtype=torch.int64, device=self.device),
            )
        uniq, inverse = torch.unique(torch.cat(self.keys), return_inverse=True)  # edges on chunk seams meet
        del self.keys[:]
        verts = torch.empty(uniq.numel(), 3, dtype=torch.float32, device=self.device)
        verts[inverse] = torch.cat(self.verts)
        del self.verts[:]
        vbatch = uniq // (KEY_SLOTS * self.r**3)
        del uniq
        # the int64 faces filled chunk by chunk, each chunk's int32 faces let go once copied (no torch.cat of
        # a second full copy)
        faces = torch.empty(sum(f.shape[0] for f in self.faces), 3, dtype=torch.int64, device=self.device)
        offset, row = 0, 0
        for n in self.sizes:
            f = self.faces.pop(0)
            faces[row : row + f.shape[0]] = inverse[offset : offset + n][f]
            offset, row = offset + n, row + f.shape[0]
        return verts, faces, vbatch


def marching_cubes_sparse(coords: torch.Tensor, sdf: torch.Tensor, resolution: int, level: float):
    """Index-space marching cubes of one sparse field (inactive = +1) -> (verts [V, 3] fp32, faces [F, 3] int64).

    coords [N, 3] integer (x, y, z) in [0, resolution); sdf [N] (any float dtype, read as fp32).
    Duplicate coordinates keep the last value, as a dense scatter does.
    """
    bxyz = torch.cat([torch.zeros_like(coords[:, :1]), coords], 1)
    verts, faces, _ = _marching_cubes_batched(bxyz, sdf, int(resolution), level, 1)
    return verts, faces


def to_original_frame(verts: torch.Tensor, resolution: int) -> torch.Tensor:
    """Index-space vertices -> the original's frame, v / R * 2 - 1."""
    return verts / resolution * 2 - 1  # fp32 ops in the original's order (numpy on fp32 vertices)


def sparse_sdf_to_mesh(coords, sdf, resolution=None, threshold=None):
    """Mesh(es) of a sparse SDF in the original's frame: vertices v / R * 2 - 1 in [-1, 1]^3.

    Two call forms:
    * `sparse_sdf_to_mesh(coords, sdf, resolution, threshold)`: coords [N, 3] (x, y, z) or [N, 4] (b, x, y, z)
      of ONE object, sdf [N] or [N, 1] -> (vertices [V, 3] fp32, faces [F, 3] int64).
    * `sparse_sdf_to_mesh(sdf_tensor, resolution, threshold)` with a SparseTensor (the decoder's output,
      any batch size) -> list of (vertices, faces), one per batch element (what pipeline.decode_sparse calls).
    Everything stays on the input's device. An empty result logs a warning (no voxel below the threshold).
    """
    if isinstance(coords, SparseTensor):
        return meshes_from_sparse_sdf(coords, sdf, resolution)
    if coords.shape[1] == 4:
        if coords.shape[0] and int(coords[:, 0].max()) != int(coords[:, 0].min()):
            raise ValueError("sparse_sdf_to_mesh meshes one object at a time; pass the SparseTensor to mesh a batch.")
        coords = coords[:, 1:]
    verts, faces = marching_cubes_sparse(coords, sdf, resolution, threshold)
    if faces.shape[0] == 0:
        log.warning(
            "The decoded SDF has no voxel below the threshold %s, so the mesh is empty; "
            "check the structure or lower mc_threshold.",
            threshold,
        )
    return to_original_frame(verts, resolution), faces


def meshes_from_sparse_sdf(
    sdf, resolution: int, threshold: float, check_cancel=None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch element (vertices [V_b, 3] fp32 original frame, faces [F_b, 3] int64) of a SparseTensor SDF,
    all elements meshed in one vectorised pass (the batch id is part of every key); check_cancel() (raises to
    stop) before each slab of cells."""
    b = sdf.batch_size
    verts, faces, vbatch = _marching_cubes_batched(sdf.coords, sdf.feats, int(resolution), threshold, b, check_cancel)
    v_counts = torch.bincount(vbatch, minlength=b)
    v_start = torch.cumsum(v_counts, 0) - v_counts
    fbatch = vbatch[faces[:, 0]] if faces.shape[0] else vbatch[:0]  # faces come grouped by element
    order = torch.sort(fbatch, stable=True).indices
    faces, fbatch = faces[order], fbatch[order]
    faces = faces - v_start[fbatch][:, None]
    f_counts = torch.bincount(fbatch, minlength=b)
    out = list(zip(to_original_frame(verts, resolution).split(v_counts.tolist()), faces.split(f_counts.tolist())))
    for i, (_, f) in enumerate(out):
        if f.shape[0] == 0:
            log.warning(
                "Object %d: the decoded SDF has no voxel below the threshold %s, so its mesh is empty; "
                "check the structure or lower mc_threshold.",
                i,
                threshold,
            )
    return out


# ------------------------------------------------------------------------------------------------
# naive twin (tests only)


def marching_cubes_naive(volume: np.ndarray, level: float):
    """Loop-per-cell marching cubes of a small dense volume with the same conventions -> (verts, faces)."""
    vol = np.asarray(volume, dtype=np.float32)
    table, loops = triangle_table(), loop_table()
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
                row = cube * 64 + bits

                def edge_vertex(e, x=x, y=y, z=z, vals=vals):  # bound now: the loop moves on
                    a, b = EDGES[e]
                    p = [x + CORNERS[a][0], y + CORNERS[a][1], z + CORNERS[a][2]]
                    p[EDGE_AXIS[e]] = np.float32(p[EDGE_AXIS[e]] + (level - vals[a]) / (vals[b] - vals[a]))
                    return (tuple(p[:3]), EDGE_AXIS[e]), [np.float32(c) for c in p]

                for tri in table[row].tolist():
                    if tri[0] < 0:
                        break
                    ids = []
                    for slot in tri:
                        if slot < CENTRE:
                            a = EDGES[slot][0]
                            key = ((x + CORNERS[a][0], y + CORNERS[a][1], z + CORNERS[a][2]), EDGE_AXIS[slot])
                            p = edge_vertex(slot)[1]
                        else:  # the mean of its loop's edge vertices
                            key = ((x, y, z), 3 + slot - CENTRE)
                            ring = [edge_vertex(e)[1] for e in range(12) if loops[row, e] == slot - CENTRE]
                            p = list(np.float32(np.mean(np.asarray(ring, np.float64), 0)))
                        if key not in vert_id:
                            vert_id[key] = len(verts)
                            verts.append(p)
                        ids.append(vert_id[key])
                    faces.append(ids)
    return np.asarray(verts, dtype=np.float32).reshape(-1, 3), np.asarray(faces, dtype=np.int64).reshape(-1, 3)
