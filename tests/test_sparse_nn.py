"""Sparse pointwise layers, per-element GroupNorm and SparseTensor arithmetic (s2core/sparse/nn.py, tensor.py).

GroupNorm vs torch's nn.GroupNorm run per batch element: both fp32, different reduction order -> 1e-5.
"""

import torch

from s2core.layers import LayerNorm32
from s2core.sparse import SparseGroupNorm32, SparseLinear, SparseTensor


def _tensor(g, lens, c, dtype=torch.float32):
    coords = torch.cat(
        [torch.cat([torch.full((n, 1), b), torch.randint(0, 9, (n, 3), generator=g)], 1) for b, n in enumerate(lens)]
    ).int()
    return SparseTensor((torch.randn(sum(lens), c, generator=g) * 3 + 1).to(dtype), coords)


def test_group_norm_is_per_batch_element():
    g = torch.Generator().manual_seed(0)
    x = _tensor(g, [7, 1, 20], 8)
    gn = SparseGroupNorm32(4, 8)
    with torch.no_grad():
        gn.weight.normal_(generator=g), gn.bias.normal_(generator=g)
    y = gn(x).feats
    ref_gn = torch.nn.GroupNorm(4, 8)
    ref_gn.load_state_dict(gn.state_dict())
    off = x.offsets.tolist()
    for b in range(3):
        slab = x.feats[off[b] : off[b + 1]].T[None]  # [1, C, N_b]
        torch.testing.assert_close(y[off[b] : off[b + 1]], ref_gn(slab)[0].T, atol=1e-5, rtol=1e-5)


def test_group_norm_fp16_computes_in_fp32():
    g = torch.Generator().manual_seed(1)
    x = _tensor(g, [30], 8, torch.float16)
    y = SparseGroupNorm32(2, 8)(x)
    ref = torch.nn.GroupNorm(2, 8)(x.feats.float().T[None])[0].T
    assert y.feats.dtype == torch.float16
    torch.testing.assert_close(y.feats.float(), ref, atol=2e-3, rtol=2e-3)  # one fp16 rounding


def test_linear_layernorm_and_per_batch_broadcast():
    g = torch.Generator().manual_seed(2)
    x = _tensor(g, [3, 4], 6)
    lin = SparseLinear(6, 2)
    y = lin(x)
    assert y.cache is x.cache and torch.equal(y.coords, x.coords)
    torch.testing.assert_close(y.feats, x.feats @ lin.weight.T + lin.bias)
    ln = LayerNorm32(6, elementwise_affine=False, eps=1e-6)
    torch.testing.assert_close(
        ln(x.feats.half()).float(),
        torch.nn.functional.layer_norm(x.feats.half().float(), (6,), eps=1e-6),
        atol=2e-3,
        rtol=2e-3,
    )
    per_batch = torch.tensor([[1.0] * 6, [10.0] * 6])  # [B, C] -> every row of element b
    z = (x + per_batch).feats - x.feats
    assert torch.allclose(z[:3], torch.ones(3, 6)) and torch.allclose(z[3:], torch.full((4, 6), 10.0))
    assert torch.equal((x * 2).feats, x.feats * 2) and torch.equal((x - x).feats, torch.zeros(7, 6))
    assert torch.equal((x + x.feats).feats, 2 * x.feats)  # [N, C] is row-wise
