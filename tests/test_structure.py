"""Index helpers of the coarse→fine glue: sort_block, extract_tokens_and_coords, occupancy, decode_occupancy."""

import pytest
import torch

from s2core.config import tiny_release
from s2core.dense_vae import DenseVAE
from s2core.structure import decode_occupancy, extract_tokens_and_coords, occupancy_coords, sort_block
from s2core.testing import deterministic_state_dict


def naive_sort_block(coords, bs):
    """Loop reference: Python's stable sort on the SPEC §9.1 keys (batch first, see sort_block's docstring)."""
    rows = coords.tolist()
    key = lambda r: (r[0], r[1] // bs, r[2] // bs, r[3] // bs, r[1] % bs, r[2] % bs, r[3] % bs)
    order = sorted(range(len(rows)), key=lambda i: key(rows[i]))
    return coords[order], torch.tensor(order, dtype=torch.int64)


def random_coords(n, res, batches, seed, dtype=torch.int32):
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, batches, (n, 1), generator=g)
    xyz = torch.randint(0, res, (n, 3), generator=g)
    return torch.cat([b, xyz], 1).to(dtype)


@pytest.mark.parametrize(
    "n,res,bs,batches",
    [(1, 8, 8, 1), (500, 64, 8, 1), (700, 128, 8, 3), (300, 37, 4, 2), (200, 20, 3, 1)],
    ids=["N1-R8-bs8", "N500-R64-bs8", "N700-R128-bs8-B3", "N300-R37-bs4-B2", "N200-R20-bs3"],
)
def test_sort_block_matches_loop_reference(n, res, bs, batches):
    coords = random_coords(n, res, batches, seed=n + res)  # duplicates included: checks stability
    out, order = sort_block(coords, bs)
    ref, ref_order = naive_sort_block(coords, bs)
    assert out.dtype == coords.dtype and torch.equal(out, ref) and torch.equal(order, ref_order)


def test_sort_block_groups_blocks_and_keeps_input():
    coords = random_coords(400, 32, 1, seed=3, dtype=torch.int64)
    before = coords.clone()
    out, _ = sort_block(coords, 8)
    assert torch.equal(coords, before)  # the original corrupts CPU inputs (SPEC §9.1); we must not
    block = (out[:, 1:] // 8) * torch.tensor([16, 4, 1])
    block_id = block.sum(1)
    assert (block_id[1:] >= block_id[:-1]).all()  # block-major, blocks x-major


def test_sort_block_empty_and_bad_shape():
    out, order = sort_block(torch.zeros(0, 4, dtype=torch.int32), 8)
    assert out.shape == (0, 4) and order.shape == (0,)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        sort_block(torch.zeros(5, 3, dtype=torch.int32), 8)


def naive_extract(z, mask, num_cls=1, num_reg=4):
    toks, coords = [], []
    P = mask.shape[-1]
    for b in range(z.shape[0]):
        for i in range(num_cls + num_reg):
            toks.append(z[b, i])
            coords.append([b, 0, 0, 1])
        for h in range(P):
            for w in range(P):
                if mask[b, h, w]:
                    toks.append(z[b, num_cls + num_reg + h * P + w])
                    coords.append([b, w, h, 0])
    return torch.stack(toks), torch.tensor(coords, dtype=torch.int32)


def test_extract_tokens_matches_loop_reference_with_an_empty_mask():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5 + 49, 6, generator=g)
    mask = torch.rand(3, 7, 7, generator=g) > 0.6
    mask[1] = False  # element 1 keeps only cls + registers
    tokens, coords = extract_tokens_and_coords(z, mask)
    ref_t, ref_c = naive_extract(z, mask)
    assert torch.equal(tokens, ref_t) and torch.equal(coords, ref_c) and coords.dtype == torch.int32


def test_occupancy_coords_threshold_and_layout():
    logits = torch.full((2, 1, 4, 4, 4), -10.0)
    logits[0, 0, 1, 2, 3] = 0.0  # p = 0.5
    logits[1, 0, 3, 0, 1] = -2.19  # p = 0.1006 >= 0.1
    logits[1, 0, 0, 0, 0] = -2.21  # p = 0.0988 < 0.1
    coords = occupancy_coords(logits, 0.1)
    assert coords.dtype == torch.int32
    assert coords.tolist() == [[0, 1, 2, 3], [1, 3, 0, 1]]


def _tiny_vae(bias):
    vae = DenseVAE(tiny_release().dense_vae)
    vae.load_state_dict(deterministic_state_dict(vae), strict=True)
    with torch.no_grad():
        vae.decoder.out_layer[2].bias.fill_(bias)
    return vae.eval()


def test_decode_occupancy_returns_sorted_in_range_index():
    vae = _tiny_vae(0.0)
    latent = torch.randn(2, 8, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    coords = decode_occupancy(vae, latent, block_size=8)
    assert coords.dtype == torch.int32 and coords.shape[1] == 4 and len(coords) > 0
    assert set(coords[:, 0].tolist()) == {0, 1}
    assert coords[:, 1:].min() >= 0 and coords[:, 1:].max() < 16
    assert torch.equal(coords, sort_block(coords, 8)[0])
    assert (coords[1:, 0] >= coords[:-1, 0]).all()  # batch elements contiguous


def test_decode_occupancy_rejects_empty_occupancy():
    vae = _tiny_vae(-100.0)
    with pytest.raises(ValueError, match="no occupied voxel"):
        decode_occupancy(vae, torch.zeros(1, 8, 4, 4, 4))
