"""DINOv2-reg: torch-hub and Hugging Face checkpoint layouts, position table, conditioner outputs."""

from dataclasses import replace

import pytest
import torch
from conftest import MANIFESTS

from s2core.config import ImageEncoderConfig, tiny_release
from s2core.dinov2 import HF_TO_HUB, DinoV2, ImageConditioner, hub_state_dict
from s2core.manifest import read_manifest_tsv
from s2core.testing import deterministic_state_dict

HUB_TSV = MANIFESTS / "dinov2_vitl14_reg4.tsv"

# Key names of transformers' Dinov2WithRegistersModel (modeling_dinov2_with_registers.py): embeddings.*,
# encoder.layer.N.{norm1, attention.attention.{query,key,value}, attention.output.dense, layer_scale1.lambda1,
# norm2, mlp.fc1, mlp.fc2, layer_scale2.lambda1}, layernorm.
HF_EMBEDDINGS = {
    "embeddings.cls_token",
    "embeddings.mask_token",
    "embeddings.register_tokens",
    "embeddings.position_embeddings",
    "embeddings.patch_embeddings.projection.weight",
    "embeddings.patch_embeddings.projection.bias",
}
HF_LAYER0 = {
    f"encoder.layer.0.{n}"
    for n in (
        "norm1.weight",
        "norm1.bias",
        "attention.attention.query.weight",
        "attention.attention.query.bias",
        "attention.attention.key.weight",
        "attention.attention.key.bias",
        "attention.attention.value.weight",
        "attention.attention.value.bias",
        "attention.output.dense.weight",
        "attention.output.dense.bias",
        "layer_scale1.lambda1",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
        "layer_scale2.lambda1",
    )
}


def hf_state_dict(hub: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A hub-layout state dict in the Hugging Face layout: `HF_TO_HUB` read backwards (the loader's
    `hub_state_dict` reads it forwards), so the tests can feed the loader HF files without transformers."""
    depth = 1 + max(int(k.split(".")[1]) for k in hub if k.startswith("blocks."))
    out = {}
    for hf, hub_key in HF_TO_HUB:
        for i in range(depth) if "{i}" in hub_key else [None]:
            t = hub[hub_key.format(i=i)]
            if isinstance(hf, str):
                out[hf.format(i=i)] = t
            else:  # query, key, value: the row blocks of the hub's packed qkv
                for name, part in zip(hf, t.chunk(len(hf), dim=0)):
                    out[name.format(i=i)] = part.clone()
    return out


def meta_hub_state_dict():
    return {
        s.name: torch.empty(s.shape, dtype=getattr(torch, s.dtype), device="meta") for s in read_manifest_tsv(HUB_TSV)
    }


def test_hub_layout_equals_manifest():
    with torch.device("meta"):
        model = DinoV2(ImageEncoderConfig())
    ours = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert ours == [(s.name, s.shape, s.dtype) for s in read_manifest_tsv(HUB_TSV)]


@pytest.mark.slow
def test_strict_load_hub_checkpoint():
    sd = deterministic_state_dict("dinov2_vitl14_reg4")
    enc = ImageConditioner()
    enc.load_backbone(sd)
    assert torch.equal(enc.model.blocks[11].attn.qkv.weight, sd["blocks.11.attn.qkv.weight"])


def test_hf_layout_names_and_strict_load_full_size():
    hf = hf_state_dict(meta_hub_state_dict())
    assert HF_EMBEDDINGS | HF_LAYER0 | {"layernorm.weight", "layernorm.bias"} <= set(hf)
    assert len(hf) == 6 + 24 * 18 + 2
    assert hf["encoder.layer.5.attention.attention.key.weight"].shape == (1024, 1024)
    assert hf["embeddings.position_embeddings"].shape == (1, 1370, 1024)
    with torch.device("meta"):
        model = DinoV2(ImageEncoderConfig())
    model.load_state_dict(hub_state_dict(hf), strict=True, assign=True)


def _tiny():
    cfg = tiny_release().dense_image_encoder
    enc = ImageConditioner(cfg)
    hub = deterministic_state_dict(enc.model, seed=3)
    return cfg, enc, hub


def test_hf_and_hub_layouts_give_identical_models():
    cfg, enc, hub = _tiny()
    hf = hf_state_dict(hub)
    assert set(hf) >= {k.replace("layer.0", "layer.1") for k in HF_LAYER0}
    back = hub_state_dict(hf)
    assert back.keys() == hub.keys() and all(torch.equal(back[k], hub[k]) for k in hub)
    # query/key/value are the three row blocks of the hub's packed qkv
    C = cfg.embed_dim
    assert torch.equal(hf["encoder.layer.1.attention.attention.key.weight"], hub["blocks.1.attn.qkv.weight"][C : 2 * C])
    enc_hf = ImageConditioner(cfg)
    enc.load_backbone(hub)
    enc_hf.load_backbone(
        {"dinov2_with_registers." + k: v for k, v in hf.items()} | {"classifier.weight": torch.zeros(3)}
    )
    x = torch.rand(1, 3, cfg.size, cfg.size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(enc.eval()(x)[0], enc_hf.eval()(x)[0])


def test_hf_layout_errors_are_readable():
    cfg, enc, hub = _tiny()
    hf = hf_state_dict(hub)
    broken = dict(hf)
    del broken["encoder.layer.1.attention.attention.value.bias"]
    with pytest.raises(ValueError, match="value.bias"):
        enc.load_backbone(broken)
    extra = dict(hf, **{"encoder.layer.0.mlp.weights_in.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected weight"):
        enc.load_backbone(extra)


def test_position_table_interpolation():
    cfg = replace(tiny_release().dense_image_encoder, size=56, pretrain_img_size=56)  # 4x4 stored grid
    model = DinoV2(cfg)
    with torch.no_grad():
        model.pos_embed.normal_()
        assert model.position_table(4, 4) is model.pos_embed  # stored grid: used as is
        model.pos_embed[:, 1:] = 0.25
        table = model.position_table(6, 6)
    assert table.shape == (1, 37, cfg.embed_dim)
    assert torch.equal(table[:, 0], model.pos_embed[:, 0])  # cls entry untouched
    assert torch.allclose(table[:, 1:], torch.full_like(table[:, 1:], 0.25), atol=1e-6)  # bicubic keeps constants
    x = torch.rand(2, 3, 84, 84)
    with torch.no_grad():
        assert model(x).shape == (2, 1 + cfg.num_register_tokens + 36, cfg.embed_dim)


def test_conditioner_outputs_and_patch_mask():
    cfg, enc, hub = _tiny()
    enc.load_backbone(hub)
    enc.eval()
    S, p = cfg.size, cfg.patch_size
    rgb = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 1, S, S)
    mask[0, 0, 15, 30] = 1.0  # one pixel → patch (15 // 14, 30 // 14) = (1, 2)
    with torch.no_grad():
        z, pm = enc(rgb, mask)
        z_nomask, none = enc(rgb)
        z_big, _ = enc(torch.nn.functional.interpolate(rgb, scale_factor=2, mode="nearest"))
    T = 1 + cfg.num_register_tokens + (S // p) ** 2
    assert z.shape == (2, T, cfg.embed_dim) and z.dtype == torch.float32 and none is None
    assert torch.equal(z, z_nomask)
    # parameter-free LayerNorm: zero mean, variance σ²/(σ² + 1e-5) ≈ 1 per token (small-σ tokens sit lower)
    assert torch.allclose(z.mean(-1), torch.zeros(2, T), atol=1e-5)
    assert torch.allclose(z.var(-1, unbiased=False), torch.ones(2, T), atol=5e-3)
    assert pm.dtype == torch.bool and pm.shape == (2, S // p, S // p)
    assert pm.sum() == 1 and pm[0, 1, 2]
    assert z_big.shape == z.shape  # other sizes are resized to S first


def test_half_precision_conditioner_tracks_fp32():
    cfg, enc, hub = _tiny()
    enc.load_backbone(hub)
    enc16 = ImageConditioner(cfg, dtype=torch.float16)
    enc16.load_backbone(hub)
    assert enc16.model.blocks[0].attn.qkv.weight.dtype == torch.float16
    x = torch.rand(1, 3, cfg.size, cfg.size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z32, _ = enc.eval()(x)
        z16, _ = enc16.eval()(x)
    assert z16.dtype == torch.float32  # the tokens leave the conditioner in fp32 either way
    rel = ((z16 - z32).norm() / z32.norm()).item()
    assert rel < 1e-2  # fp16 weights/activations through 2 tiny blocks: ~1e-3 expected
