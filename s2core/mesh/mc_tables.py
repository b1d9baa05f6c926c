"""Marching-cubes tables, generated here from first principles (no table copied from elsewhere).

Conventions (shared with `marching_cubes.py`)::

            6 ─────── 7          corner i sits at (i & 1, i >> 1 & 1, i >> 2 & 1) = (x, y, z)
           ╱│        ╱│          edges (corner a -> corner b, a < b), id: axis
          4 ─────── 5 │            x: 0 (0,1)  1 (2,3)  2 (4,5)  3 (6,7)
          │ │       │ │            y: 4 (0,2)  5 (1,3)  6 (4,6)  7 (5,7)
          │ 2 ──────│ 3            z: 8 (0,4)  9 (1,5) 10 (2,6) 11 (3,7)
          │╱        │╱           faces: id = 2 * axis + side (side 1 = the +axis face)
          0 ─────── 1   x →, y ↗, z ↑

A corner is *inside* when its value is below the level (as scikit-image's Lewiner marching cubes,
which counts value == level as outside). Cube index = sum of 2^i over inside corners.

How a case is triangulated: on every cube face, the iso-contour is one segment per inside/outside
transition pair; on an ambiguous face (inside corners on one diagonal, outside on the other) a
per-cell *face bit* says whether the inside corners are joined across the face (the runtime code
sets it with the asymptotic decider, as Lewiner's face test does). Because a face's segments depend
only on that face's four values, neighbouring cells agree and the surface is watertight. Segments
are directed with the inside region on their left seen from outside the cube, so they chain into
closed loops (each crossed edge has one segment in and one out); each loop is fanned into triangles.
Triangles come out with normals pointing from the inside (low values) towards the outside, the
orientation scikit-image returns by default (gradient_direction="descent") for an SDF.

`triangle_table()` -> int8 tensor [256 * 64, T, 3] of edge ids (row = cube_index * 64 + face_bits),
padded with -1; built once on first use and cached.
"""
from __future__ import annotations

import functools

import torch

CORNERS = [(i & 1, i >> 1 & 1, i >> 2 & 1) for i in range(8)]
EDGES = [(0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (1, 3), (4, 6), (5, 7), (0, 4), (1, 5), (2, 6), (3, 7)]
EDGE_AXIS = [0] * 4 + [1] * 4 + [2] * 4
_EDGE_ID = {frozenset(e): i for i, e in enumerate(EDGES)}


def _face_cycles() -> list[list[int]]:
    """Corners of each face in counter-clockwise order seen from outside the cube."""
    cycles = []
    for axis in range(3):
        u, v = (axis + 1) % 3, (axis + 2) % 3  # (axis, u, v) right-handed
        for side in (0, 1):
            square = [(0, 0), (1, 0), (1, 1), (0, 1)] if side == 1 else [(0, 0), (0, 1), (1, 1), (1, 0)]
            cyc = []
            for a, b in square:
                p = [0, 0, 0]
                p[axis], p[u], p[v] = side, a, b
                cyc.append(CORNERS.index(tuple(p)))
            cycles.append(cyc)
    return cycles


FACES = _face_cycles()  # [6][4] corner ids, face id = 2 * axis + side


def face_segments(inside: list[bool], face: int, joined: bool) -> list[tuple[int, int]]:
    """Directed segments (edge id -> edge id) of the contour on one face, inside region on the left."""
    q = FACES[face]
    s = [inside[c] for c in q]
    edges = [_EDGE_ID[frozenset((q[k], q[(k + 1) % 4]))] for k in range(4)]  # E_k = (q_k, q_k+1)
    exits = [k for k in range(4) if s[k] and not s[(k + 1) % 4]]  # walking CCW leaves the inside
    entries = [k for k in range(4) if not s[k] and s[(k + 1) % 4]]
    if not exits:
        return []
    if len(exits) == 1:
        return [(edges[exits[0]], edges[entries[0]])]
    if joined:  # cut off each outside corner q_m: exit E_(m-1) -> entry E_m
        return [(edges[k], edges[(k + 1) % 4]) for k in exits]
    return [(edges[k], edges[(k - 1) % 4]) for k in exits]  # cut off each inside corner q_k


def is_ambiguous(inside: list[bool], face: int) -> bool:
    s = [inside[c] for c in FACES[face]]
    return s[0] == s[2] and s[1] == s[3] and s[0] != s[1]


def triangulate(cube_index: int, face_bits: int) -> list[tuple[int, int, int]]:
    """Triangles (edge ids) of one cube configuration and one choice of ambiguous-face joins."""
    inside = [bool(cube_index >> i & 1) for i in range(8)]
    nxt = {}
    for f in range(6):
        for a, b in face_segments(inside, f, bool(face_bits >> f & 1)):
            assert a not in nxt, "two segments leave one edge"
            nxt[a] = b
    tris, seen = [], set()
    for start in sorted(nxt):
        if start in seen:
            continue
        loop = [start]
        while nxt[loop[-1]] != start:
            loop.append(nxt[loop[-1]])
        seen.update(loop)
        # the loop runs with the inside on its left seen from outside the cube, i.e. clockwise seen
        # from the outside region of the field; reverse it so triangle normals point to the outside
        loop = loop[::-1]
        tris += [(loop[0], loop[i], loop[i + 1]) for i in range(1, len(loop) - 1)]
    return tris


@functools.lru_cache(maxsize=None)
def triangle_table() -> torch.Tensor:
    """int8 [256 * 64, T, 3] edge ids per (cube_index * 64 + face_bits), -1 padded (see module doc)."""
    rows = []
    for c in range(256):
        inside = [bool(c >> i & 1) for i in range(8)]
        mask = sum(1 << f for f in range(6) if is_ambiguous(inside, f))  # only these bits matter
        variants = {}
        for b in range(64):
            if b & mask not in variants:
                variants[b & mask] = triangulate(c, b & mask)
            rows.append(variants[b & mask])
    width = max(len(r) for r in rows)
    table = torch.full((len(rows), width, 3), -1, dtype=torch.int8)
    for i, r in enumerate(rows):
        if r:
            table[i, :len(r)] = torch.tensor(r, dtype=torch.int8)
    return table
