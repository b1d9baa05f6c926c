"""Dense DiT: strict loading of the official layout, precision policy, embeddings, shapes."""

import math

import pytest
import torch

from s2core.config import DenseDiTConfig, tiny_release
from s2core.dense_dit import DenseDiT, absolute_position_table, patchify, timestep_frequencies, unpatchify
from s2core.manifest import manifest
from s2core.testing import deterministic_state_dict, deterministic_tensor


def test_state_dict_layout_equals_manifest():
    with torch.device("meta"):
        dit = DenseDiT(DenseDiTConfig())
    ours = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in dit.state_dict().items()]
    ref = [(s.name, s.shape, s.dtype) for s in manifest("model_dense.dit")]
    assert ours == ref  # names, shapes, dtypes (fp16 Linears, fp32 norms/gammas/pos_emb) and order


@pytest.mark.slow
def test_strict_load_of_official_layout():
    # every checkpoint tensor as a shape-only meta tensor (560M random values would be most of the time and
    # cannot matter to a strict load), one with real values to show it lands under its own name
    sd = {
        s.name: torch.empty(s.shape, dtype=getattr(torch, s.dtype), device="meta") for s in manifest("model_dense.dit")
    }
    name = "blocks.23.adaLN_modulation.1.weight"
    sd[name] = deterministic_tensor(name, tuple(sd[name].shape), sd[name].dtype, 0)
    with torch.device("meta"):
        dit = DenseDiT(DenseDiTConfig())
    dit.load_state_dict(sd, strict=True, assign=True)
    assert torch.equal(dit.blocks[23].adaLN_modulation[1].weight, sd[name])
    del sd["blocks.3.cross_attn.to_kv.bias"]
    with torch.device("meta"):
        fresh = DenseDiT(DenseDiTConfig())
    with pytest.raises(RuntimeError, match="blocks.3.cross_attn.to_kv.bias"):
        fresh.load_state_dict(sd, strict=True, assign=True)


def test_position_table_formula():
    """SPEC §8.2 written as a loop: sin/cos of i, j, k with ω_f = 10000^(-f/F), F = C//6, zero padded."""
    R, C = 3, 20
    F_ = C // 6
    table = absolute_position_table(R, C)
    assert table.shape == (R**3, C) and table.dtype == torch.float32
    for r in range(R**3):
        i, j, k = r // (R * R), (r // R) % R, r % R
        row = []
        for p in (i, j, k):
            w = [10000 ** (-f / F_) for f in range(F_)]
            row += [math.sin(p * x) for x in w] + [math.cos(p * x) for x in w]
        row += [0.0] * (C - len(row))
        assert torch.allclose(table[r], torch.tensor(row), atol=1e-6), r


def test_timestep_frequencies_cos_first():
    t = torch.tensor([0.0, 500.0])
    e = timestep_frequencies(t, 8)
    assert e.shape == (2, 8)
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    assert torch.allclose(e[1], torch.cat([torch.cos(500 * freqs), torch.sin(500 * freqs)]), atol=1e-5)


def test_patchify_roundtrip_and_channel_order():
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (1, 16, 2, 2, 2)
    # channel c·p³ + a·p² + b·p + e of patch (d, h, w) = x[c, 2d + a, 2h + b, 2w + e]
    assert p[0, 1 * 8 + 1 * 4 + 0 * 2 + 1, 1, 0, 1] == x[0, 1, 3, 0, 3]
    assert torch.equal(unpatchify(p, 2), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_tiny_forward_shapes_and_precision(dtype):
    cfg = tiny_release().dense_dit
    dit = DenseDiT(cfg, dtype=dtype)
    dit.load_state_dict(deterministic_state_dict(dit), strict=True)
    assert dit.input_layer.weight.dtype == dtype and dit.blocks[0].norm2.weight.dtype == torch.float32
    assert dit.blocks[0].self_attn.q_rms_norm.gamma.dtype == torch.float32 and dit.pos_emb.dtype == torch.float32
    R = cfg.resolution
    x = torch.randn(2, 8, R, R, R).to(dtype)
    cond = torch.randn(2, 5, cfg.cond_channels)
    with torch.no_grad():
        v = dit.eval()(x, torch.tensor([500.0], dtype=dtype), cond)
        v_other = dit(x, torch.tensor([500.0], dtype=dtype), torch.zeros_like(cond))
    assert v.shape == x.shape and v.dtype == dtype and torch.isfinite(v.float()).all()
    assert not torch.equal(v, v_other)  # the condition reaches the output
    # batch items are independent: item 1 alone gives the same velocity
    with torch.no_grad():
        v1 = dit(x[1:], torch.tensor([500.0], dtype=dtype), cond[1:])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (v1.float() - v[1:].float()).abs().max() < tol


def test_set_dtype_restores_the_precision_policy_after_assign_load():
    cfg = tiny_release().dense_dit
    with torch.device("meta"):
        dit = DenseDiT(cfg, dtype=torch.float16)
    dit.load_state_dict(deterministic_state_dict(dit, dtype=torch.float32), strict=True, assign=True)  # fp32 file
    assert dit.input_layer.weight.dtype == torch.float32
    dit.set_dtype(torch.float16)
    assert dit.input_layer.weight.dtype == torch.float16 and dit.blocks[1].mlp.mlp[2].weight.dtype == torch.float16
    assert dit.blocks[1].norm2.weight.dtype == torch.float32 and dit.pos_emb.dtype == torch.float32
