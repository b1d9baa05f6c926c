"""Mesh → sparse latent index, as the original's `mesh2index` computes it, without a dense grid (SPEC.md §10.2).

The original normalises the mesh (`normalize_mesh`, longest side to [-0.95, 0.95]), halves it, and runs a
CUDA kernel that fills a dense `size³` int32 grid (4 GiB at 1024) with the distance of each lattice point
to the nearest triangle; lattice point (i, j, k) sits at (i/(size-1) - 0.5, ...). Every lattice point
closer than 4/size to the surface marks its latent cell (i//8, j//8, k//8); the unique cells, sorted, are
the tokens of the 1024 stage.

Here only lattice points near the surface are ever touched: each triangle's bounding box in lattice
indices, grown by 5 points on each side (the original's box; the distance threshold is under 4 lattice
steps), is the candidate set. It is walked in two levels: first the (triangle, latent cell) pairs the
box overlaps, as one flat range over all triangles in windows of `max_candidates` (here, in PyTorch);
then, for each pair whose cell is not marked yet, the box's lattice points inside that cell (at most
factor³) get a distance, and the cell is marked when one is under the threshold
(`kernels/voxelize.py::mark_cells`: one Triton program per pair on CUDA, PyTorch windows of
`max_candidates` points elsewhere). Memory is bounded whatever the triangle sizes. The distance is the
kernel's point–triangle distance in float32, degenerate-triangle rules included
(`point_triangle_distance`), evaluated as one fixed sequence of IEEE operations, so every backend and
device marks the same cells. The only grid is the latent occupancy, (size/factor)³ bools (2 MiB at 1024/8).

Letters: F triangles, V vertices, n candidates in a window, D = size (lattice points per axis).
"""

from __future__ import annotations

import numpy as np
import torch

from .._kernels import voxelize as _kernel

GROW = 5  # lattice points added on each side of a triangle's box: int(threshold + 1) with threshold 4


def normalize_vertices(vertices: torch.Tensor, scale: float = 0.95) -> torch.Tensor:
    """Centre the bounding box at the origin and scale its longest side to [-scale, scale] (`normalize_mesh`)."""
    lo, hi = vertices.min(0).values, vertices.max(0).values
    extent = float((hi - lo).max())
    if not extent > 0:
        raise ValueError(
            "The mesh has zero extent (all vertices coincide), so it cannot be normalised; pass a mesh with a surface."
        )
    return (vertices - (lo + hi) / 2) * (2.0 * scale / extent)


def point_triangle_distance(p: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """Unsigned distance [n] from points p [n,3] to triangles (v0, v1, v2) [n,3] each, with the CUDA kernel's rules.

    * all three vertices equal → distance to v0; two equal → distance to the segment they leave
      (v0==v1 → v0v2, otherwise v0v1);
    * zero normal without equal vertices (collinear) → distance to v0 (the kernel's quirk, kept);
    * otherwise the plane distance if the projection is strictly inside (the three edge cross products
      pairwise have positive dot products), else the nearest of the three edges.

    One fixed sequence of float32 operations, the same on CPU, CUDA and in the Triton kernel
    (`kernels/voxelize.py`, which holds it).
    """
    return _kernel.point_triangle_distance(p, v0, v1, v2)


def _as_tensor(x, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(x), device=device).to(dtype)


def check_mesh(vertices: torch.Tensor, faces: torch.Tensor) -> None:
    """Raise a ValueError a person can act on for empty meshes, bad shapes, non-finite vertices, bad faces."""
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(
            f"Expected vertices [V, 3] and triangle faces [F, 3], got {tuple(vertices.shape)} and "
            f"{tuple(faces.shape)}; triangulate the mesh first."
        )
    if faces.shape[0] == 0 or vertices.shape[0] == 0:
        raise ValueError(
            "The mesh is empty (no faces), so there is no surface to voxelize; connect a mesh with triangles."
        )
    if not bool(torch.isfinite(vertices).all()):
        raise ValueError("The mesh has NaN or infinite vertex coordinates; repair or re-export it before use.")
    if int(faces.min()) < 0 or int(faces.max()) >= vertices.shape[0]:
        raise ValueError(
            f"The mesh's faces index vertices outside [0, {vertices.shape[0] - 1}]; the file is "
            "corrupt or faces and vertices do not belong together."
        )


@torch.no_grad()
def mesh_to_latent_index(
    vertices,
    faces,
    resolution: int = 1024,
    factor: int = 8,
    threshold: float = 4.0,
    normalize: bool = True,
    device: torch.device | str | None = None,
    max_candidates: int = 1 << 21,
    backend: str = "auto",
    check_cancel=None,
) -> torch.Tensor:
    """Latent cells [N, 4] int32 (0, x, y, z), sorted, of the lattice points within threshold/resolution of the mesh.

    vertices [V, 3], faces [F, 3] (numpy or torch). normalize: apply `normalize_vertices` first (the
    pipeline always does, `mesh2index` itself does not). Coordinates lie in [0, ceil(resolution/factor)).
    device: where to compute (default CUDA when available). max_candidates bounds the (triangle, cell)
    pairs and lattice points examined at once (memory ~ 0.5 KB each on the reference path, ~ 0.1 KB on
    the kernel's). backend: "auto" (the Triton kernel on CUDA, PyTorch elsewhere), "triton" (also on CPU
    with TRITON_INTERPRET=1) or "reference" (PyTorch); all give the same cells. check_cancel() is called
    (it raises to stop) before every window: on a CPU a large mesh takes minutes.
    """
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}.")
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
    tris = verts[tri_idx].contiguous()  # [F, 3 vertices, 3 coords]

    # per-triangle lattice box, grown and clamped as the kernel does; its exact rounding cannot matter
    # because the box is more than a lattice step wider than the distance threshold on every side
    lo = torch.floor((tris.min(1).values.double() + 0.5) * (D - 1)).long() - GROW
    hi = torch.floor((tris.max(1).values.double() + 0.5) * (D - 1)).long() + GROW
    lo, hi = lo.clamp(0, D - 1).contiguous(), hi.clamp(0, D - 1).contiguous()
    L = (D - 1) // factor + 1
    occupied = torch.zeros(L, L, L, dtype=torch.bool, device=device)
    coord = _kernel.lattice_coordinates(D, device)  # lattice point i sits at coord[i] along each axis
    limit = threshold / D  # compared in float32; 4/1024 is exact

    # Level 1 (here): (triangle, latent cell) pairs of each triangle's box, in windows.
    # Level 2 (`kernels/voxelize.mark_cells`): for each pair whose cell is unmarked, the box's lattice points
    # inside that cell (at most factor³) get a distance; the cell is marked when one is under the limit.
    # A point can only mark its own cell, so points in marked cells never need a distance.
    clo, chi = lo // factor, hi // factor
    for t, cell in _kernel.box_windows(clo, chi - clo + 1, max_candidates):  # [n] triangle ids, [n, 3] cells
        if check_cancel is not None:
            check_cancel()
        _kernel.mark_cells(
            occupied,
            tris,
            coord,
            lo,
            hi,
            t,
            cell,
            factor,
            limit,
            max_points=max_candidates,
            backend=backend,
            check_cancel=check_cancel,
        )
    cells = occupied.nonzero()  # lexicographic, as torch.unique orders the original's rows
    return torch.cat([torch.zeros_like(cells[:, :1]), cells], 1).int()
