"""Dense VAE: strict loading of the official layout, precision policy, pixel shuffle, shapes."""

import pytest
import torch

from s2core.config import DenseVAEConfig, tiny_release
from s2core.dense_vae import DenseVAE, pixel_shuffle_3d
from s2core.manifest import manifest
from s2core.testing import deterministic_state_dict


def test_strict_load_of_official_layout():
    with torch.device("meta"):
        vae = DenseVAE(DenseVAEConfig())
    ours = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in vae.state_dict().items()]
    assert ours == [(s.name, s.shape, s.dtype) for s in manifest("model_dense.vae")]
    sd = deterministic_state_dict("model_dense.vae")
    vae.load_state_dict(sd, strict=True, assign=True)
    # decoder: every conv fp16, norms fp32; encoder: torso fp16, input/out layers fp32 (SPEC §7.2-7.3)
    assert (
        vae.decoder.input_layer.weight.dtype == torch.float16 and vae.decoder.out_layer[2].weight.dtype == torch.float16
    )
    assert vae.decoder.out_layer[0].weight.dtype == torch.float32
    assert (
        vae.encoder.input_layer.weight.dtype == torch.float32
        and vae.encoder.blocks[0].conv1.weight.dtype == torch.float16
    )
    assert torch.equal(vae.decoder.blocks[9].conv.weight, sd["decoder.blocks.9.conv.weight"])
    sd["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        vae.load_state_dict(sd, strict=True, assign=True)


def test_pixel_shuffle_channel_order():
    """SPEC §7.1: channel c·8 + a·4 + b·2 + e of voxel (d, h, w) → output voxel (2d + a, 2h + b, 2w + e)."""
    x = torch.randn(1, 16, 2, 3, 2)
    y = pixel_shuffle_3d(x, 2)
    assert y.shape == (1, 2, 4, 6, 4)
    for c in range(2):
        for a in range(2):
            for b in range(2):
                for e in range(2):
                    for d, h, w in [(0, 0, 0), (1, 2, 1), (0, 1, 1)]:
                        assert y[0, c, 2 * d + a, 2 * h + b, 2 * w + e] == x[0, c * 8 + a * 4 + b * 2 + e, d, h, w]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_tiny_decode_encode_shapes(dtype):
    vae = DenseVAE(tiny_release().dense_vae, dtype=dtype)
    vae.load_state_dict(deterministic_state_dict(vae), strict=True)
    vae.eval()
    z = torch.randn(2, 8, 4, 4, 4)
    with torch.no_grad():
        logits = vae.decode(z)
        occ = (logits > 0).float()
        mean = vae.encode(occ)
        sample = vae.encode(occ, generator=torch.Generator().manual_seed(0), sample_posterior=True)
    assert logits.shape == (2, 1, 16, 16, 16) and logits.dtype == dtype
    assert mean.shape == (2, 8, 4, 4, 4) and mean.dtype == torch.float32
    assert sample.shape == mean.shape and not torch.equal(sample, mean)


def test_set_dtype_restores_the_precision_policy_after_assign_load():
    with torch.device("meta"):
        vae = DenseVAE(tiny_release().dense_vae, dtype=torch.float16)
    vae.load_state_dict(deterministic_state_dict(vae, dtype=torch.float32), strict=True, assign=True)
    vae.set_dtype(torch.float16)
    assert (
        vae.decoder.input_layer.weight.dtype == torch.float16 and vae.decoder.out_layer[0].weight.dtype == torch.float32
    )
    assert (
        vae.encoder.input_layer.weight.dtype == torch.float32
        and vae.encoder.blocks[0].conv2.weight.dtype == torch.float16
    )
    assert vae.encoder.out_layer[2].weight.dtype == torch.float32
