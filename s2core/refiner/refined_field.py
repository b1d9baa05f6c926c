"""The refined field where marching cubes needs it, and its mesh (SPARSE.md §8.2 step 4, §8.3 step 5).

The refiners stream their field as x-slabs; `CrossingCollector` keeps, from each slab, only the corners of
marching-cubes cells whose corners straddle the level (`RefinedField`), and `mesh_refined_field` meshes
those cells with `mesh.marching_cubes`'s tables, one mesh per batch element, in the original's frame.

Letters: B batch, R grid edge, X rows of a slab, M kept voxels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..mesh.marching_cubes import Welder, key_coords, lookup_keys, to_original_frame

log = logging.getLogger(__name__)


@dataclass
class RefinedField:
    """The refined field where marching cubes needs it.

    | field      | shape / dtype      | meaning                                                        |
    |------------|--------------------|----------------------------------------------------------------|
    | keys       | [M] int64          | ((b·R + x)·R + y)·R + z of each kept voxel, sorted, unique      |
    | values     | [M] float          | field value at those voxels (model dtype)                      |
    | resolution | int                | grid edge R (512 or 1024)                                      |
    | level      | float              | iso-level to mesh at (2 × mc_threshold for 512, mc_threshold for 1024) |

    Holds every corner of every grid cell (2×2×2 voxels, min corner in [0, R-2]) whose corners are not
    all above or all below `level` — and nothing else. Marching cubes over the cells whose 8 corners are
    all present gives the same mesh as over the original's dense grid. Vertices map to the original's
    frame by v / R * 2 - 1. One int64 key per voxel (not [M, 4] coordinates) halves what is held.
    """

    keys: torch.Tensor
    values: torch.Tensor
    resolution: int
    level: float

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values), leaving this field empty, so that a consumer holding the only references can free
        them before its own peak (at 1024, ~0.4 GiB before marching cubes welds ~50 M faces)."""
        keys, values = self.keys, self.values
        self.keys, self.values = keys[:0], values[:0]
        return keys, values

    @property
    def coords(self) -> torch.Tensor:
        """[M, 4] int32 (batch, x, y, z), decoded from `keys` (for inspection and tests)."""
        R, k = self.resolution, self.keys
        return torch.stack([k // R**3, k // R**2 % R, k // R % R, k % R], 1).int()


def max_crossing_corners(resolution: int) -> int:
    """Most field voxels a real surface can need: 128·R² (a sphere of radius 0.45 R needs about 10·R²;
    R³/8 at R = 1024). More means the level is crossed all through the volume, i.e. noise."""
    return 128 * resolution * resolution


def _too_many_corners(n: int, resolution: int) -> ValueError:
    return ValueError(
        f"The refined field crosses the level at {n} of the {resolution}³ grid's voxels (a surface needs at "
        f"most {max_crossing_corners(resolution)}), so it is noise filling the volume, not a surface; the "
        "refiner weights are probably untrained or do not match this model — load the official refiner "
        "checkpoint or turn interior removal off."
    )


class CrossingCollector:
    """Receives consecutive x-slabs [B, X, R, R] of a field and keeps the corners of straddling cells.

    The last row of each slab is kept to form the cells between slabs; corners on it that the previous
    slab already kept are not kept again, so keys come out unique (and sorted when B = 1).
    """

    def __init__(self, resolution: int, level: float, near: bool = False, max_corners: int | None = None):
        self.R, self.level, self.near = resolution, level, near
        self.max_corners = max_crossing_corners(resolution) if max_corners is None else max_corners
        self.prev: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None
        self.x_next = 0
        self.count = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def push(self, slab: torch.Tensor, decoded: torch.Tensor | None = None) -> None:
        """slab [B, X, R, R] field values for rows x_next..x_next+X-1; decoded: same-shape bool mask of
        decoded voxels, only used with `near` (cells must touch a decoded voxel to count)."""
        x0 = self.x_next
        self.x_next += slab.shape[1]
        block, dblock, kept_first = slab, decoded, None
        if self.prev is not None:
            block = torch.cat([self.prev[0], slab], 1)
            if self.near:
                dblock = torch.cat([self.prev[1], decoded], 1)
            kept_first = self.prev[2]
            x0 -= 1
        if block.shape[1] < 2:
            self.prev = (
                slab[:, -1:],
                decoded[:, -1:] if self.near else None,
                torch.zeros_like(slab[:, -1:], dtype=torch.bool),
            )
            return
        v = block.float()  # fp16 values and the level compare exactly in fp32
        above, below = v > self.level, v < self.level
        del v
        cross = ~(_cell_all(above) | _cell_all(below))  # [B, X-1, R-1, R-1]
        del above, below
        if self.near:
            cross &= _cell_any(dblock)
        corner = torch.zeros(block.shape, dtype=torch.bool, device=block.device)
        for ox in (0, 1):
            for oy in (0, 1):
                for oz in (0, 1):
                    corner[:, ox : ox + cross.shape[1], oy : oy + cross.shape[2], oz : oz + cross.shape[3]] |= cross
        del cross
        self.prev = (slab[:, -1:], decoded[:, -1:] if self.near else None, corner[:, -1:].clone())
        if kept_first is not None:
            corner[:, :1] &= ~kept_first
        flat = corner.view(-1).nonzero().squeeze(1)  # [m] into [B, X, R, R]
        del corner
        if flat.numel() == 0:
            return
        self.count += flat.numel()
        if self.count > self.max_corners:
            raise _too_many_corners(self.count, self.R)
        self.values.append(block.reshape(-1)[flat])
        n_row = block.shape[1] * self.R * self.R
        R = self.R
        # [B, X, R, R] flat index → grid key ((b·R + x0 + x)·R + y)·R + z
        self.keys.append(flat + (flat // n_row) * (R - block.shape[1]) * R * R + x0 * R * R)

    def finish(self, dtype: torch.dtype, device: torch.device) -> RefinedField:
        if not self.keys:
            return RefinedField(
                torch.zeros(0, dtype=torch.int64, device=device),
                torch.zeros(0, dtype=dtype, device=device),
                self.R,
                self.level,
            )
        keys, vals = torch.cat(self.keys), torch.cat(self.values)
        self.keys, self.values = [], []
        if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):  # B > 1: slabs interleave elements
            keys, order = torch.sort(keys)
            vals = vals[order]
        return RefinedField(keys, vals, self.R, self.level)


def _cell_all(m: torch.Tensor) -> torch.Tensor:
    """[B, X, Y, Z] bool → [B, X-1, Y-1, Z-1]: all 8 corners of each cell set."""
    a = m[:, :-1] & m[:, 1:]
    a = a[:, :, :-1] & a[:, :, 1:]
    return a[:, :, :, :-1] & a[:, :, :, 1:]


def _cell_any(m: torch.Tensor) -> torch.Tensor:
    a = m[:, :-1] | m[:, 1:]
    a = a[:, :, :-1] | a[:, :, 1:]
    return a[:, :, :, :-1] | a[:, :, :, 1:]


@torch.no_grad()
def mesh_refined_field(
    field: RefinedField, max_cells: int = 1 << 21, check_cancel=None, consume: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Marching cubes of a `RefinedField` → per batch element (vertices [V, 3] fp32, faces [F, 3] int64).

    Vertices are in the original's frame (v / R * 2 - 1). Uses the conventions, tables, face decider and
    vertex welding of `mesh.marching_cubes` (a corner is inside when below the level; vertices
    interpolated in fp64 and rounded to fp32; welded per grid edge), but visits only cells whose 8
    corners are all in the field: `sparse_sdf_to_mesh` reads missing voxels as +1, right for a decoded
    band and wrong here, where the background is inside (-1) as often as outside. Cells are taken
    max_cells at a time, so the transients are bounded by the chunk, not the field; check_cancel() (raises
    to stop) before each chunk. consume: the caller hands the field over; it is emptied (`take`) and its
    tensors freed before the vertices are welded (the pipeline passes True).
    """
    R, level, device = field.resolution, field.level, field.keys.device
    keys, values = field.take() if consume else (field.keys, field.values)  # keys sorted and unique
    if keys.numel() > max_crossing_corners(R):
        raise _too_many_corners(keys.numel(), R)
    B = int(keys[-1]) // R**3 + 1 if keys.numel() else 1
    welder = Welder(R, level, device)
    for start in range(0, keys.numel(), max_cells):  # chunks of candidate cells bound memory
        if check_cancel is not None:
            check_cancel()
        cells = keys[start : start + max_cells]
        xyz = key_coords(cells, R)[:, 1:]
        inner = (xyz <= R - 2).all(1)  # every cell's min corner is a field voxel
        del xyz
        cells = cells[inner]
        pos, found = lookup_keys(keys, cells[:, None] + welder.corner_keys[None])  # [M, 8]
        full = found.all(1)
        cells, pos = cells[full], pos[full]
        del found, full
        welder.add(cells, values[pos].float())
        del pos, cells
    del keys, values
    verts, faces, vbatch = welder.finish()
    if faces.shape[0] == 0:
        log.warning("The refined field does not cross the level %s, so the mesh is empty.", level)
        return [
            (torch.zeros(0, 3, device=device), torch.zeros(0, 3, dtype=torch.int64, device=device)) for _ in range(B)
        ]
    verts = to_original_frame(verts, R)
    if B == 1:  # one object: nothing to split (and no sorted copies of a ~1 GiB face array)
        return [(verts, faces)]
    v_counts = torch.bincount(vbatch, minlength=B)
    v_start = torch.cumsum(v_counts, 0) - v_counts
    fbatch = vbatch[faces[:, 0]]
    order = torch.sort(fbatch, stable=True).indices
    faces, fbatch = faces[order], fbatch[order]
    faces = faces - v_start[fbatch][:, None]
    return list(zip(verts.split(v_counts.tolist()), faces.split(torch.bincount(fbatch, minlength=B).tolist())))
