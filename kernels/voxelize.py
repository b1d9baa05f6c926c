"""Mesh voxelization, level 2: mark the latent cells that hold a lattice point near a triangle (SPEC.md §10.2).

The caller (s2core/mesh/voxelize.py) lists (triangle, latent cell) pairs: the cells of each triangle's grown
lattice box [lo, hi] (inclusive, per axis). For pair (t, g), with cell g = (gx, gy, gz) of `factor`³ lattice
points, the candidate points are the box clipped to the cell,

    i in [max(lo_t, g·factor), min(hi_t, g·factor + factor - 1)]   per axis,

and the cell is marked when any of them is closer than `limit` to triangle t:

    occupied[g] |= any_i  dist(coord[i], triangle t) < limit,       coord[i] = (c[i_x], c[i_y], c[i_z]),
    c[k] = float32(float32(k / (D-1)) - 0.5)                         (`lattice_coordinates`).

`dist` is the original CUDA kernel's point–triangle distance with its degenerate-triangle rules, in float32
(`point_triangle_distance`): all three vertices equal → distance to v0; two equal → distance to the segment
they leave (v0 == v1 → v0v2, otherwise v0v1); zero normal without equal vertices (collinear) → distance to v0;
otherwise |plane distance| when the projection is strictly inside (the three edge cross products pairwise
have positive dot products), else the nearest of the three edges (projection parameter clamped to [0, 1]).

Marking is monotone (cells only ever become True), so a pair whose cell is already marked can be skipped
without changing the result, and concurrent stores of True race harmlessly.

Exactness. Both implementations evaluate the same fixed sequence of IEEE float32 operations, each rounded once:
vectors are handled per component, dot(a, b) = (a_x·b_x + a_y·b_y) + a_z·b_z, cross(a, b) = (a_y·b_z - a_z·b_y,
a_z·b_x - a_x·b_z, a_x·b_y - a_y·b_x), norms are sqrt(dot(v, v)) correctly rounded, min propagates NaN
(torch.minimum's rule). The reference is eager PyTorch, one kernel per operation, so nothing is contracted or
reassociated on CPU or CUDA (no torch.cross, .sum or .norm, whose reduction order, FMA contraction or CPU double
accumulation differ between devices), and its square roots are `_sqrt_rn` (torch's own float32 CPU sqrt is 1 ulp
off on some CPUs, which made a CPU-dependent difference until 2026-12-05). The Triton kernel is compiled with
enable_fp_fusion=False (no FMA contraction, ptxas --fmad=false) and uses div_rn / sqrt_rn (IEEE, where `/` and
tl.sqrt are approximate); the interpreter runs the same operations in numpy float32. Lattice coordinates come from
one table computed once on the host (float64 quotient rounded to float32, which is the correctly rounded float32
quotient), so CUDA's reciprocal-multiply shortcut for `tensor / scalar` never enters. Hence the kernel in the
interpreter and the CPU reference agree bitwise on any CPU (tested). On an H100 (2026-11-25, before `_sqrt_rn`)
they did not: the eager reference on CUDA and the kernel on CUDA both differed from the CPU reference in the last
bits of some distances (the CPU sqrt above is a likely cause; not re-measured yet), so a lattice point within a few
ulps of the threshold can be marked on one device and not the other; the GPU tests bound the difference (relative
1e-5) and on the 1.3 M-face bench mesh both give the same 88,188 cells (bench/results/voxelize.md). At the
threshold the original (its CUDA kernel, float32 with nvcc's default FMA contraction and its own operation order)
keeps a point when d < limit, like us; a point within a few ulps of the limit may be kept by the original and not
by us or the other way round (or differ between two GPUs for the original itself), so tests compare discrete
results with the reference bitwise only where both run the same IEEE operations, and against other devices with a
margin. Assumed, not enforced: float32 subnormals are not flushed to zero (neither Triton's default arithmetic nor
PyTorch's flushes them); with flushing, a sliver triangle whose squared normal is subnormal could take the
collinear branch on one side only.

Layouts: occupied [L, L, L] bool, contiguous (the latent grid, L = ceil(D / factor)); tris [F, 3, 3] float32
contiguous (triangle, vertex, coordinate); coord [D] float32; lo, hi [F, 3] int64 contiguous (inclusive boxes,
within [0, D)); pairs: tri [n] int64, cell [n, 3] int64 contiguous. The kernel writes only occupied.
A program owns PAIRS pairs (1 on CUDA; wide tiles in the interpreter, which pays per operation) x BLOCK
lattice points: it reads each pair's cell flag and drops pairs already marked, then walks the clipped boxes
(at most factor³ points each) in chunks of BLOCK points until each pair has a point close enough or no
points left, and stores True for the pairs that found one.
"""

from __future__ import annotations

import numpy as np
import torch

from ._common import tl, triton  # Triton, or stand-ins that let this module import without it (see _common)
from ._common import use_triton as _use_triton

__all__ = [
    "mark_cells",
    "mark_cells_reference",
    "point_triangle_distance",
    "lattice_coordinates",
    "box_windows",
    "PAIRS",
    "BLOCK",
]

PAIRS = 1  # pairs a program owns on CUDA (its rows)
BLOCK = 128  # lattice points per pair tested at once on CUDA (a clipped box has at most factor³ = 512)
PAIRS_INTERPRETED = 1024  # the CPU interpreter pays per operation, not per element: wide tiles
_TINY = float(np.finfo(np.float32).tiny)


# ---------------------------------------------------------------- reference (PyTorch, one op per kernel)


def _sub3(a, b):
    return a[0] - b[0], a[1] - b[1], a[2] - b[2]


def _dot3(a, b):
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _cross3(a, b):
    return a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """float32 square root rounded to nearest on every CPU, as sqrt_rn / numpy / CUDA's sqrt compute it.

    torch's float32 CPU sqrt goes through a vectorised math library whose result is 1 ulp off for ~17% of inputs
    on some CPUs (measured on an AVX2 AMD EPYC with torch 2.13; exact on others). Here: the float64 root rounded
    to float32 (at most 1 ulp off), then corrected with exact float64 arithmetic: the midpoints between the
    candidate and its float32 neighbours have 25 significant bits, so their squares are exact in float64 and
    comparing them with x picks the correctly rounded root (never a tie: a float32 x is no such square)."""
    s = x.double().sqrt().float()
    up, down = torch.nextafter(s, s.new_tensor(float("inf"))), torch.nextafter(s, s.new_zeros(()))
    mid_up, mid_down = (s.double() + up.double()) / 2, (s.double() + down.double()) / 2
    s = torch.where(mid_up * mid_up < x.double(), up, s)
    return torch.where(mid_down * mid_down > x.double(), down, s)


def _segment3(p, a, b):
    """Distance from points p to segments ab (tuples of [n] tensors), projection parameter clamped to [0, 1]."""
    d = _sub3(b, a)
    t = _dot3(_sub3(p, a), d) / _dot3(d, d)
    lo, hi = t < 0, t > 1
    closest = tuple(torch.where(lo, a[k], torch.where(hi, b[k], a[k] + t * d[k])) for k in range(3))
    r = _sub3(p, closest)
    return _sqrt_rn(_dot3(r, r))


def point_triangle_distance(p: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """Unsigned distance [n] from points p [n, 3] to triangles (v0, v1, v2) [n, 3] each (rules in the module doc)."""
    P, A, B, C = (x.unbind(-1) for x in (p, v0, v1, v2))
    normal = _cross3(_sub3(B, A), _sub3(C, A))
    nn2 = _dot3(normal, normal)
    q = _sub3(P, A)
    length = _sqrt_rn(nn2).clamp_min(torch.finfo(p.dtype).tiny)
    unit = tuple(x / length for x in normal)
    plane = _dot3(unit, q)
    proj = tuple(P[k] - plane * unit[k] for k in range(3))
    c0 = _cross3(_sub3(A, B), _sub3(A, proj))
    c1 = _cross3(_sub3(B, C), _sub3(B, proj))
    c2 = _cross3(_sub3(C, A), _sub3(C, proj))
    inside = (_dot3(c0, c1) > 0) & (_dot3(c1, c2) > 0) & (_dot3(c0, c2) > 0)
    s01, s02, s12 = _segment3(P, A, B), _segment3(P, A, C), _segment3(P, B, C)
    to_v0 = _sqrt_rn(_dot3(q, q))
    d = torch.where(inside, plane.abs(), torch.minimum(torch.minimum(s01, s02), s12))
    d = torch.where(nn2 == 0, to_v0, d)
    eq01, eq02, eq12 = (v0 == v1).all(-1), (v0 == v2).all(-1), (v1 == v2).all(-1)
    d = torch.where(eq12 | eq02, s01, d)
    d = torch.where(eq01, s02, d)
    return torch.where(eq01 & eq02, to_v0, d)


def lattice_coordinates(D: int, device=None) -> torch.Tensor:
    """[D] float32: c[k] = float32(k / (D-1)) - 0.5 in float32, the lattice point coordinate along any axis."""
    c = (torch.arange(D, dtype=torch.float64) / max(D - 1, 1)).float() - 0.5
    return c.to(device)


def box_windows(box_lo: torch.Tensor, box_dims: torch.Tensor, window: int):
    """All integer points of K boxes ([K, 3] low corners and extents) as one flat range, in windows.

    Yields (box id [n] int64, point [n, 3] int64) for at most `window` points at a time; a box may span
    windows. One host sync (the total), then none per window."""
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


def _limit32(limit: float) -> float:
    return float(np.float32(limit))  # the threshold both backends compare against, as float32


def mark_cells_reference(
    occupied, tris, coord, lo, hi, tri, cell, factor: int, limit: float, max_points: int = 1 << 21, check_cancel=None
):
    """PyTorch: pairs whose cell is unmarked, then their clipped boxes' points in windows of max_points;
    check_cancel() (raises to stop) before each window, as a CPU run can take minutes."""
    L = occupied.shape[0]
    flat = occupied.view(-1)
    limit = _limit32(limit)
    key = (cell[:, 0] * L + cell[:, 1]) * L + cell[:, 2]
    todo = ~flat[key]
    tri, cell, key = tri[todo], cell[todo], key[todo]
    sub_lo = torch.maximum(lo[tri], cell * factor)  # the triangle's box clipped to the cell
    sub_hi = torch.minimum(hi[tri], cell * factor + factor - 1)
    for j, ijk in box_windows(sub_lo, sub_hi - sub_lo + 1, max_points):
        if check_cancel is not None:
            check_cancel()
        k = key[j]
        live = ~flat[k]  # marked by an earlier window
        ijk, k, v = ijk[live], k[live], tris[tri[j[live]]]
        d = point_triangle_distance(coord[ijk], v[:, 0], v[:, 1], v[:, 2])
        flat[k[d < limit]] = True
    return occupied


# ---------------------------------------------------------------- Triton


@triton.jit
def _dot(ax, ay, az, bx, by, bz):
    return ax * bx + ay * by + az * bz


@triton.jit
def _cross(ax, ay, az, bx, by, bz):
    return ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx


@triton.jit
def _segment(px, py, pz, ax, ay, az, bx, by, bz, dx, dy, dz, dd):
    # distance from lanes p to segment ab; d = b - a and dd = dot(d, d) are the program's scalars
    t = tl.div_rn(_dot(px - ax, py - ay, pz - az, dx, dy, dz), dd)
    lo = t < 0
    hi = t > 1
    rx = px - tl.where(lo, ax, tl.where(hi, bx, ax + t * dx))
    ry = py - tl.where(lo, ay, tl.where(hi, by, ay + t * dy))
    rz = pz - tl.where(lo, az, tl.where(hi, bz, az + t * dz))
    return tl.sqrt_rn(_dot(rx, ry, rz, rx, ry, rz))


@triton.jit
def _mark_kernel(
    occ,
    tris,
    coord,
    lo,
    hi,
    pair_tri,
    pair_cell,
    n_pairs,
    L,
    limit,
    FACTOR: tl.constexpr,
    PAIRS: tl.constexpr,
    BLOCK: tl.constexpr,
    TINY: tl.constexpr,
):
    # occ [L³] uint8 (the bool grid); tris [F, 9] f32; coord [D] f32; lo/hi [F, 3] i64; pair_tri [n]; pair_cell [n, 3]
    # program p: pairs [p·PAIRS, (p+1)·PAIRS) (rows) x BLOCK lattice points of each one's clipped box (columns)
    i = tl.program_id(0).to(tl.int64) * PAIRS + tl.arange(0, PAIRS)
    pm = i < n_pairs
    t = tl.load(pair_tri + i, mask=pm, other=0).to(tl.int64)
    gx = tl.load(pair_cell + 3 * i, mask=pm, other=0).to(tl.int32)
    gy = tl.load(pair_cell + 3 * i + 1, mask=pm, other=0).to(tl.int32)
    gz = tl.load(pair_cell + 3 * i + 2, mask=pm, other=0).to(tl.int32)
    key = (gx.to(tl.int64) * L + gy) * L + gz
    done = tl.load(occ + key, mask=pm, other=1).to(tl.int32)  # marked already (or no pair): nothing to learn
    # the triangle's box clipped to the cell: a sub-box of nx × ny × nz points from (x0, y0, z0)
    x0 = tl.maximum(tl.load(lo + 3 * t).to(tl.int32), gx * FACTOR)
    y0 = tl.maximum(tl.load(lo + 3 * t + 1).to(tl.int32), gy * FACTOR)
    z0 = tl.maximum(tl.load(lo + 3 * t + 2).to(tl.int32), gz * FACTOR)
    nx = tl.maximum(tl.minimum(tl.load(hi + 3 * t).to(tl.int32), gx * FACTOR + FACTOR - 1) - x0 + 1, 0)
    ny = tl.maximum(tl.minimum(tl.load(hi + 3 * t + 1).to(tl.int32), gy * FACTOR + FACTOR - 1) - y0 + 1, 0)
    nz = tl.maximum(tl.minimum(tl.load(hi + 3 * t + 2).to(tl.int32), gz * FACTOR + FACTOR - 1) - z0 + 1, 0)
    n = nx * ny * nz
    nyz = tl.maximum(ny * nz, 1)[:, None]
    nz1 = tl.maximum(nz, 1)[:, None]
    ny1 = tl.maximum(ny, 1)[:, None]
    x0, y0, z0 = x0[:, None], y0[:, None], z0[:, None]
    # the triangle and all that depends on it alone, [PAIRS, 1] (same operations as the reference)
    v = tris + 9 * t
    ax, ay, az = tl.load(v)[:, None], tl.load(v + 1)[:, None], tl.load(v + 2)[:, None]
    bx, by, bz = tl.load(v + 3)[:, None], tl.load(v + 4)[:, None], tl.load(v + 5)[:, None]
    cx, cy, cz = tl.load(v + 6)[:, None], tl.load(v + 7)[:, None], tl.load(v + 8)[:, None]
    e0x, e0y, e0z = bx - ax, by - ay, bz - az  # also the segment v0v1
    e1x, e1y, e1z = cx - ax, cy - ay, cz - az  # also the segment v0v2
    e2x, e2y, e2z = cx - bx, cy - by, cz - bz  # the segment v1v2
    nrx, nry, nrz = _cross(e0x, e0y, e0z, e1x, e1y, e1z)
    nn2 = _dot(nrx, nry, nrz, nrx, nry, nrz)
    length = tl.maximum(tl.sqrt_rn(nn2), TINY)
    ux, uy, uz = tl.div_rn(nrx, length), tl.div_rn(nry, length), tl.div_rn(nrz, length)
    abx, aby, abz = ax - bx, ay - by, az - bz
    bcx, bcy, bcz = bx - cx, by - cy, bz - cz
    cax, cay, caz = cx - ax, cy - ay, cz - az
    dd01 = _dot(e0x, e0y, e0z, e0x, e0y, e0z)
    dd02 = _dot(e1x, e1y, e1z, e1x, e1y, e1z)
    dd12 = _dot(e2x, e2y, e2z, e2x, e2y, e2z)
    eq01 = (ax == bx) & (ay == by) & (az == bz)
    eq02 = (ax == cx) & (ay == cy) & (az == cz)
    eq12 = (bx == cx) & (by == cy) & (bz == cz)
    flat = nn2 == 0

    hit = done * 0
    go = tl.max(tl.where((n > 0) & (done == 0), 1, 0), 0)
    s = go * 0  # a tensor: loop-carried values must be Triton values when compiled
    while go > 0:  # chunks of BLOCK points, until every pair of the program has a hit or no points left
        li = s + tl.arange(0, BLOCK)[None, :]
        m = (li < n[:, None]) & (hit == 0)[:, None] & (done == 0)[:, None]
        px = tl.load(coord + x0 + li // nyz, mask=m, other=0.0)
        py = tl.load(coord + y0 + li // nz1 % ny1, mask=m, other=0.0)
        pz = tl.load(coord + z0 + li % nz1, mask=m, other=0.0)
        qx, qy, qz = px - ax, py - ay, pz - az
        plane = _dot(ux, uy, uz, qx, qy, qz)
        jx, jy, jz = px - plane * ux, py - plane * uy, pz - plane * uz  # projection onto the plane
        c0x, c0y, c0z = _cross(abx, aby, abz, ax - jx, ay - jy, az - jz)
        c1x, c1y, c1z = _cross(bcx, bcy, bcz, bx - jx, by - jy, bz - jz)
        c2x, c2y, c2z = _cross(cax, cay, caz, cx - jx, cy - jy, cz - jz)
        inside = (
            (_dot(c0x, c0y, c0z, c1x, c1y, c1z) > 0)
            & (_dot(c1x, c1y, c1z, c2x, c2y, c2z) > 0)
            & (_dot(c0x, c0y, c0z, c2x, c2y, c2z) > 0)
        )
        s01 = _segment(px, py, pz, ax, ay, az, bx, by, bz, e0x, e0y, e0z, dd01)
        s02 = _segment(px, py, pz, ax, ay, az, cx, cy, cz, e1x, e1y, e1z, dd02)
        s12 = _segment(px, py, pz, bx, by, bz, cx, cy, cz, e2x, e2y, e2z, dd12)
        to_v0 = tl.sqrt_rn(_dot(qx, qy, qz, qx, qy, qz))
        edges = tl.minimum(
            tl.minimum(s01, s02, propagate_nan=tl.PropagateNan.ALL), s12, propagate_nan=tl.PropagateNan.ALL
        )
        d = tl.where(inside, tl.abs(plane), edges)
        d = tl.where(flat, to_v0, d)
        d = tl.where(eq12 | eq02, s01, d)
        d = tl.where(eq01, s02, d)
        d = tl.where(eq01 & eq02, to_v0, d)
        hit = hit | tl.max(tl.where(m & (d < limit), 1, 0), 1)
        s += BLOCK
        go = tl.max(tl.where((s < n) & (hit == 0) & (done == 0), 1, 0), 0)
    tl.store(occ + key, hit.to(tl.uint8), mask=pm & (hit != 0))


def _mark_cells_triton(
    occupied,
    tris,
    coord,
    lo,
    hi,
    tri,
    cell,
    factor: int,
    limit: float,
    pairs: int | None = None,
    block: int | None = None,
):
    assert occupied.dtype == torch.bool and occupied.is_contiguous() and occupied.ndim == 3
    assert tris.dtype == torch.float32 and tris.is_contiguous() and tris.shape[1:] == (3, 3)
    assert coord.dtype == torch.float32 and coord.is_contiguous()
    assert lo.is_contiguous() and hi.is_contiguous() and cell.is_contiguous() and cell.shape[1:] == (3,)
    pairs = pairs or (PAIRS if occupied.is_cuda else PAIRS_INTERPRETED)
    block = block or (BLOCK if occupied.is_cuda else max(16, triton.next_power_of_2(factor**3) // 4))
    assert pairs & (pairs - 1) == 0 and block & (block - 1) == 0, "pairs and block must be powers of two"
    n = tri.shape[0]
    if n == 0:
        return occupied
    _mark_kernel[(triton.cdiv(n, pairs),)](
        occupied.view(torch.uint8),
        tris,
        coord,
        lo,
        hi,
        tri.contiguous(),
        cell,
        n,
        occupied.shape[0],
        _limit32(limit),
        FACTOR=factor,
        PAIRS=pairs,
        BLOCK=block,
        TINY=_TINY,
        num_warps=max(1, min(8, pairs * block // 32)),
        enable_fp_fusion=False,
    )
    return occupied


def mark_cells(
    occupied,
    tris,
    coord,
    lo,
    hi,
    tri,
    cell,
    factor: int,
    limit: float,
    max_points: int = 1 << 21,
    backend: str = "auto",
    pairs: int | None = None,
    block: int | None = None,
    check_cancel=None,
):
    """Mark (in place) occupied[cell[i]] when a lattice point of triangle tri[i]'s box [lo, hi] inside that cell is
    closer than `limit` to the triangle (see module doc); returns occupied.

    max_points bounds the reference's points per window (the kernel needs no buffers). backend: "auto" (Triton
    on CUDA when installed, the reference elsewhere), "triton" (also on CPU with TRITON_INTERPRET=1) or "reference".
    pairs, block: the kernel's tile, pairs per program x points per pair (powers of two; defaults by device).
    check_cancel: called (it raises to stop) before each window of the reference; the kernel is one launch.
    """
    if _use_triton(backend, occupied, dtypes=None):
        return _mark_cells_triton(occupied, tris, coord, lo, hi, tri, cell, factor, limit, pairs, block)
    return mark_cells_reference(occupied, tris, coord, lo, hi, tri, cell, factor, limit, max_points, check_cancel)
