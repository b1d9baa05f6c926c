"""Coordinate keys (s2core/sparse/coords.py): order, round trip and neighbour deltas over the whole stated range
(coordinates -1..4094, batch up to 2^27 - 1), and `sort_block` at the batch bound its within-block digits leave."""

import torch

from s2core.sparse.coords import coords_to_keys, key_deltas, keys_to_coords, window_keys, window_partition
from s2core.structure import sort_block

LO, HI = -1, 4094  # axis range of a key field (x + 1 in 0..4095)


def _edge_coords(g: torch.Generator, n: int, batch_max: int) -> torch.Tensor:
    """Random rows with the extremes of every field mixed in."""
    xyz = torch.randint(LO, HI + 1, (n, 3), generator=g)
    xyz[: n // 4] = torch.tensor([LO, HI])[torch.randint(0, 2, (n // 4, 3), generator=g)]
    b = torch.randint(0, batch_max + 1, (n, 1), generator=g)
    b[:3, 0] = torch.tensor([0, batch_max, batch_max - 1])
    return torch.cat([b, xyz], 1)


def _lex_rank(c: torch.Tensor) -> torch.Tensor:
    order = torch.arange(c.shape[0])
    for col in reversed(range(c.shape[1])):  # stable sorts, least significant column first
        order = order[torch.sort(c[order, col], stable=True).indices]
    return order


def test_keys_order_lexicographically_and_round_trip():
    g = torch.Generator().manual_seed(0)
    c = _edge_coords(g, 4000, (1 << 27) - 1)
    keys = coords_to_keys(c)
    assert (keys >= 0).all()
    assert torch.equal(keys_to_coords(keys), c)
    assert torch.equal(c[torch.sort(keys, stable=True).indices], c[_lex_rank(c)])


def test_neighbour_deltas_do_not_borrow():
    g = torch.Generator().manual_seed(1)
    c = _edge_coords(g, 2000, 1000)
    c[:, 1:] = c[:, 1:].clamp(0, HI - 1)  # a voxel whose ±1 neighbours are in range
    d = torch.arange(-1, 2)
    offs = torch.stack(torch.meshgrid(d, d, d, indexing="ij"), -1).reshape(27, 3)
    nb = c[:, None, :].repeat(1, 27, 1)
    nb[..., 1:] += offs
    assert torch.equal(coords_to_keys(nb.reshape(-1, 4)).view(-1, 27), coords_to_keys(c)[:, None] + key_deltas(offs))


def test_window_partition_lists_windows_in_key_order():
    g = torch.Generator().manual_seed(2)
    c = _edge_coords(g, 3000, 9).clamp(min=0)  # batch > 8: the old 20-bit SSA keys overflowed here
    perm, cu, max_w = window_partition(c, 8, 4)
    keys = window_keys(c, 8, 4)[perm.long()]
    assert (keys[1:] >= keys[:-1]).all() and int(cu[-1]) == c.shape[0]
    starts = torch.zeros(c.shape[0], dtype=torch.bool)
    starts[cu[:-1].long()] = True
    assert torch.equal(starts[1:], keys[1:] != keys[:-1]) and max_w == int((cu[1:] - cu[:-1]).max())


def test_sort_block_at_the_batch_bound():
    g = torch.Generator().manual_seed(3)
    c = _edge_coords(g, 3000, (1 << 18) - 1).clamp(min=0)
    got, order = sort_block(c, 8)
    blk, inb = c[:, 1:] // 8, c[:, 1:] % 8
    assert torch.equal(order, _lex_rank(torch.cat([c[:, :1], blk, inb], 1)))
    assert torch.equal(got, c[order])
