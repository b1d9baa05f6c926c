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

How a case is triangulated:
1. Contour loops on the cube's surface. On every face the iso-contour is one segment per
   inside/outside transition pair; on an ambiguous face (inside corners on one diagonal, outside on
   the other) a per-cell *face bit* says whether the inside corners are joined across the face (the
   runtime code sets it with the asymptotic decider, as Lewiner's face test does). A face's segments
   depend only on that face's four values, so the two cells sharing it agree. Segments are directed
   with the inside region on their left seen from outside the cube and chain into closed loops.
2. Each loop becomes a disk, with two rules that make the mesh edge-manifold and watertight:
   * a triangle edge either is a contour segment (shared with the neighbouring cell) or joins two
     vertices that share no cube face (so it is inside this cell and no other cell can emit it);
   * a loop that crosses one (ambiguous) face twice has two vertices on that face that are not
     neighbours on the loop; any triangulation of its own vertices either joins such a pair or lays a
     triangle flat in the face, so it is fanned from an extra *centre vertex* (slot 12 + loop number,
     placed at the mean of the loop's vertices), as Lewiner does in his cases 7, 12 and 13.
   Every other loop is fanned from one of its vertices (no two of its vertices share a face unless
   they are neighbours, so any fan obeys the first rule).
3. The fan apex in unambiguous cells follows scikit-image's Lewiner tables where their choice is a
   rotation-invariant rule, which we found by running it on single cubes and state geometrically:
   * two corners on a cube edge a-b (its quad): split along the diagonal from the vertex p at a to
     the vertex q at b with det(b - a, dir p, dir q) > 0 (dir = the crossed edge's direction away from
     the minority corner);
   * three corners on a face, m adjacent to both ends (its pentagon): fan from the vertex on the
     face-normal edge of the end e with det(e - m, o - m, n) > 0 (o the other end, n the inward normal).
   * four corners of a face (its quad): a choice that no rotation-invariant rule gives (the quad's
     own 90-degree symmetry swaps the diagonals); observed: split along the diagonal through the
     corners with equal in-face coordinates for x- and y-normal faces, unequal for z-normal faces.
   The hexagons (a corner with its three neighbours, four-corner chains) are likewise symmetric under a
   rotation that Lewiner's triangulation breaks and follow no rule we could state; we fan them from
   the lowest edge id (same vertices and orientation, a different split), as every loop in an
   ambiguous cell.
Triangles come out with normals pointing from the inside (low values) towards the outside, the
orientation scikit-image returns by default (gradient_direction="descent") for an SDF. Cube interiors
are not tested (no tunnels, unlike Lewiner's interior test): each loop is its own disk, a valid
manifold choice that can differ from Lewiner's topology in cells with an interior ambiguity.

`triangle_table()` -> int8 tensor [256 * 64, T, 3] of vertex slots (0-11 edge ids, 12 + j the centre of
loop j), padded with -1, row = cube_index * 64 + face_bits. `loop_table()` -> int8 [256 * 64, 12]: the
loop number of each crossed edge whose loop has a centre vertex, else -1. Built once and cached.
"""

from __future__ import annotations

import functools

import torch

CORNERS = [(i & 1, i >> 1 & 1, i >> 2 & 1) for i in range(8)]
EDGES = [(0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (1, 3), (4, 6), (5, 7), (0, 4), (1, 5), (2, 6), (3, 7)]
EDGE_AXIS = [0] * 4 + [1] * 4 + [2] * 4
CENTRE = 12  # first centre-vertex slot
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
_EDGE_FACES = [[f for f in range(6) if set(e) <= set(FACES[f])] for e in EDGES]  # the 2 faces of each edge


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


def _sub(a: int, b: int) -> tuple[int, int, int]:
    return tuple(x - y for x, y in zip(CORNERS[a], CORNERS[b]))


def _det(u, v, w) -> int:
    return u[0] * (v[1] * w[2] - v[2] * w[1]) - u[1] * (v[0] * w[2] - v[2] * w[0]) + u[2] * (v[0] * w[1] - v[1] * w[0])


def _fan_apex(loop: list[int], minority: list[int]) -> int:
    """The fan apex of an unambiguous single-loop cell (module doc, point 3)."""

    def corner_dir(e):  # (minority corner of edge e, direction of e away from it)
        a, b = EDGES[e]
        return (a, _sub(b, a)) if a in minority else (b, _sub(a, b))

    if len(loop) == 4 and len(minority) == 2:
        a, b = minority
        for k in range(4):
            (ca, da), (cb, db) = corner_dir(loop[k]), corner_dir(loop[(k + 2) % 4])
            if ca == a and cb == b and _det(_sub(b, a), da, db) > 0:
                return loop[k]
    if len(loop) == 4 and len(minority) == 4:  # the four corners of a face, whose normal is `axis`
        axis = EDGE_AXIS[loop[0]]
        u, v = [k for k in range(3) if k != axis]
        for e in loop:
            c = EDGES[e][0]  # the edge's corners differ only along `axis`
            if (CORNERS[c][u] == CORNERS[c][v]) == (axis != 2):
                return e
    if len(loop) == 5 and len(minority) == 3:
        for m in minority:
            ends = [c for c in minority if c != m]
            if all(sum(x != y for x, y in zip(CORNERS[m], CORNERS[c])) == 1 for c in ends):
                normal = None
                for e in loop:  # the edges leaving the face are the ones at the three corners
                    c, d = corner_dir(e)
                    if c == m:
                        normal = d
                for e in loop:
                    c, d = corner_dir(e)
                    if c in ends and d == normal:
                        o = ends[1] if c == ends[0] else ends[0]
                        if _det(_sub(c, m), _sub(o, m), normal) > 0:
                            return e
    return min(loop)


def triangulate(cube_index: int, face_bits: int) -> tuple[list[tuple[int, int, int]], list[list[int]]]:
    """(triangles as vertex slots, the loops that got a centre vertex) of one cube configuration and
    one choice of ambiguous-face joins."""
    inside = [bool(cube_index >> i & 1) for i in range(8)]
    nxt, face_of = {}, {}
    for f in range(6):
        for a, b in face_segments(inside, f, bool(face_bits >> f & 1)):
            assert a not in nxt, "two segments leave one edge"
            nxt[a], face_of[a] = b, f
    ambiguous_cell = any(is_ambiguous(inside, f) for f in range(6))
    tris, centred, seen = [], [], set()
    loops = []
    for start in sorted(nxt):
        if start in seen:
            continue
        loop = [start]
        while nxt[loop[-1]] != start:
            loop.append(nxt[loop[-1]])
        seen.update(loop)
        loops.append(loop)
    for loop in loops:
        faces = [face_of[e] for e in loop]
        # the loop runs with the inside on its left seen from outside the cube, i.e. clockwise seen
        # from the outside region of the field; reverse it so triangle normals point to the outside
        loop = loop[::-1]
        twice = {f for f in faces if faces.count(f) > 1}
        if twice:  # fan from a vertex off the faces crossed twice, else from a centre vertex
            free = [e for e in loop if not twice & set(_EDGE_FACES[e])]
            if not free:
                c = CENTRE + len(centred)
                centred.append(loop)
                tris += [(c, loop[i], loop[(i + 1) % len(loop)]) for i in range(len(loop))]
                continue
            k = loop.index(min(free))
            loop = loop[k:] + loop[:k]
            tris += [(loop[0], loop[i], loop[i + 1]) for i in range(1, len(loop) - 1)]
            continue
        minority = [i for i in range(8) if inside[i]]
        if len(minority) > 4:
            minority = [i for i in range(8) if not inside[i]]
        apex = min(loop) if ambiguous_cell or len(loops) > 1 else _fan_apex(loop, minority)
        k = loop.index(apex)
        loop = loop[k:] + loop[:k]
        tris += [(loop[0], loop[i], loop[i + 1]) for i in range(1, len(loop) - 1)]
    return tris, centred


@functools.lru_cache(maxsize=None)
def _tables() -> tuple[torch.Tensor, torch.Tensor]:
    rows, loops = [], []
    for c in range(256):
        inside = [bool(c >> i & 1) for i in range(8)]
        mask = sum(1 << f for f in range(6) if is_ambiguous(inside, f))  # only these bits matter
        variants = {}
        for b in range(64):
            if b & mask not in variants:
                variants[b & mask] = triangulate(c, b & mask)
            tris, centred = variants[b & mask]
            rows.append(tris)
            member = [-1] * 12
            for j, loop in enumerate(centred):
                for e in loop:
                    member[e] = j
            loops.append(member)
    width = max(len(r) for r in rows)
    padded = [list(r) + [(-1, -1, -1)] * (width - len(r)) for r in rows]  # one tensor call, not 16k
    return torch.tensor(padded, dtype=torch.int8), torch.tensor(loops, dtype=torch.int8)


def triangle_table() -> torch.Tensor:
    """int8 [256 * 64, T, 3] vertex slots per (cube_index * 64 + face_bits), -1 padded (module doc)."""
    return _tables()[0]


def loop_table() -> torch.Tensor:
    """int8 [256 * 64, 12]: for each crossed edge in a loop with a centre vertex, that loop's number."""
    return _tables()[1]


def max_centres() -> int:
    return int(loop_table().max()) + 1
