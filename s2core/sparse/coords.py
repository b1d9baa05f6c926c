"""Coordinate keys: one int64 per voxel row `(b, x, y, z)`, and the window partition built on them.

A key orders as its row does lexicographically, so sorting, `torch.unique` and `searchsorted` on keys act on
coordinates; the sparse conv's neighbour search, the downsampling's parents, `structure.sort_block`, the SSA
plan (cells, blocks) and both windowed attentions (SDPA in the VAE, the SSA window kernel) all use this one
packing:

    bit  63 | 62 ......... 36 | 35 ..... 24 | 23 ..... 12 | 11 ...... 0
       sign |   b  (27 bits)  |    x + 1    |    y + 1    |    z + 1

Why 12 bits an axis: the finest sparse grid is the 1024 stage, coordinates 0..1023 (the chunked decode shifts
each chunk to its own origin and back, so no padded coordinate leaves 0..1023), and the sparse conv looks one
step outside it (-1 and 1024). The +1 makes -1 an ordinary field value, so a neighbour's key is the key plus a
constant (`key_deltas`) with no borrow between fields. 12 bits hold coordinates -1..4093 with neighbours
(4x headroom) and leave 27 bits of batch, of which `sort_block` needs 9 more for its within-block digits
(batch < 2^18 there). The packing does not check the range: that would cost a host sync per coordinate set.
"""

from __future__ import annotations

import torch

__all__ = [
    "AXIS_BITS",
    "pack_keys",
    "coords_to_keys",
    "keys_to_coords",
    "key_deltas",
    "window_keys",
    "window_partition",
]

AXIS_BITS = 12
_MASK = (1 << AXIS_BITS) - 1


def pack_keys(b: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
    """b [N] and xyz [N, 3] (integers, xyz in -1..4094) -> [N] int64 keys, lexicographic in (b, x, y, z)."""
    b, xyz = b.long(), xyz.long() + 1
    return (((b << AXIS_BITS | xyz[:, 0]) << AXIS_BITS | xyz[:, 1]) << AXIS_BITS) | xyz[:, 2]


def coords_to_keys(coords: torch.Tensor) -> torch.Tensor:
    """[N, 4] (b, x, y, z) -> [N] int64 keys."""
    return pack_keys(coords[:, 0], coords[:, 1:])


def keys_to_coords(keys: torch.Tensor) -> torch.Tensor:
    """[M] int64 keys -> [M, 4] int64 (b, x, y, z)."""
    return torch.stack(
        [
            keys >> 3 * AXIS_BITS,
            (keys >> 2 * AXIS_BITS & _MASK) - 1,
            (keys >> AXIS_BITS & _MASK) - 1,
            (keys & _MASK) - 1,
        ],
        1,
    )


def key_deltas(offsets: torch.Tensor) -> torch.Tensor:
    """[K, 3] (dx, dy, dz) -> [K] int64: key(b, x+dx, y+dy, z+dz) = key(b, x, y, z) + delta, for neighbours
    that stay in the packed range (the +1 offset keeps every field non-negative, so nothing borrows)."""
    off = offsets.long()
    return (off[:, 0] << 2 * AXIS_BITS) + (off[:, 1] << AXIS_BITS) + off[:, 2]


def window_keys(coords: torch.Tensor, window_size: int, shift: int) -> torch.Tensor:
    """[N] int64 key of each row's window (b, (x+s)//w, (y+s)//w, (z+s)//w), lexicographic like the original's
    (the shift is added to the coordinates, nothing rolls or is masked)."""
    c = coords.long()
    return pack_keys(c[:, 0], (c[:, 1:] + shift) // window_size)


def window_partition(coords: torch.Tensor, window_size: int, shift: int):
    """The rows listed window by window, windows in key order and rows in their order inside each:
    (perm [N] int32, cu_windows [W+1] int32 positions in perm, max_window: int). One host sync: call once per
    coordinate set (the SSA plan and the VAE's WindowPlan both start here)."""
    key = window_keys(coords, window_size, shift)
    perm = torch.argsort(key, stable=True)
    _, counts = torch.unique_consecutive(key[perm], return_counts=True)
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=coords.device)
    cu[1:] = torch.cumsum(counts, 0)
    return perm.to(torch.int32), cu, int(counts.max()) if counts.numel() else 0
