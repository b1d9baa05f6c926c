"""Coarse stage end to end on the tiny config: image + mask in, a block-sorted sparse index out, through the
pipeline's stage functions (`encode_image` -> `sample_dense` -> `decode_dense`)."""

import pytest
import torch
from conftest import GENERATORS
from tolerances import rel_rms, reorder_rel_rms

from s2core import pipeline
from s2core.config import tiny_release
from s2core.dense_dit import DenseDiT
from s2core.dense_vae import DenseVAE
from s2core.dinov2 import ImageConditioner
from s2core.loading import Models, Placement
from s2core.results import Conditioning
from s2core.structure import decode_occupancy, encode_pixels, sort_block
from s2core.testing import deterministic_state_dict


def coarse_models(cfg, enc, dit, vae, dtype):
    """The three coarse networks as `Models` (CPU placement), computing latents in `dtype`."""
    return Models(cfg, "tiny-random", dtype, Placement("cpu"), image_encoder=enc, dense_vae=vae, dense_dit=dit)


@pytest.fixture(scope="module")
def models():
    cfg = tiny_release()
    enc = ImageConditioner(cfg.dense_image_encoder)
    enc.load_backbone(deterministic_state_dict(enc.model))
    dit = DenseDiT(cfg.dense_dit)
    dit.load_state_dict(deterministic_state_dict(dit), strict=True)
    vae = DenseVAE(cfg.dense_vae)
    vae.load_state_dict(deterministic_state_dict(vae), strict=True)
    with torch.no_grad():  # make the synthetic decoder's occupancy depend on the latent (not all-full)
        vae.decoder.out_layer[2].bias.fill_(-3.0)
    return cfg, enc.eval(), dit.eval(), vae.eval()


def comfy_inputs():
    image = torch.ones(1, 48, 64, 3)
    image[0, 10:40, 20:50] = torch.tensor([0.7, 0.3, 0.2])
    mask = torch.zeros(1, 48, 64)
    mask[0, 10:40, 20:50] = 1.0
    return image, mask


def run_coarse(m, image, mask, steps, seed, callback=None):
    cond = pipeline.encode_image(m, image, mask)
    latent = pipeline.sample_dense(m, cond, seed, steps, 7.0, callback)
    return cond, latent, pipeline.decode_dense(m, latent)


def test_coarse_stage_gives_sorted_in_range_deterministic_index(models):
    cfg, enc, dit, vae = models
    m = coarse_models(cfg, enc, dit, vae, torch.float32)
    image, mask = comfy_inputs()
    steps = []
    cond, latent, structure = run_coarse(m, image, mask, 4, 123, lambda i, n: steps.append((i, n)))
    R = cfg.dense_dit.resolution * 4
    assert R == cfg.sparse_dit_512.resolution == structure.grid  # the index lands on the 512 stage's latent grid
    c = structure.coords
    assert c.dtype == torch.int32 and c.ndim == 2 and c.shape[1] == 4 and 0 < len(c) < R**3
    assert (c[:, 0] == 0).all() and c[:, 1:].min() >= 0 and c[:, 1:].max() < R
    assert torch.equal(c, sort_block(c, cfg.sparse_dit_512.selection_block_size)[0])
    assert len(torch.unique(c, dim=0)) == len(c)
    assert steps == [(i, 4) for i in range(1, 5)]
    T = 1 + 4 + (cfg.dense_image_encoder.size // 14) ** 2
    assert cond.tokens.shape == (1, T, cfg.dense_image_encoder.embed_dim) and cond.patch_mask.any()
    assert latent.latents.shape == (1, *cfg.dense_dit.latent_shape)
    _, again, again_structure = run_coarse(m, image, mask, 4, 123)
    _, other, _ = run_coarse(m, image, mask, 4, 124)
    assert torch.equal(again_structure.coords, c) and torch.equal(again.latents, latent.latents)
    assert not torch.equal(other.latents, latent.latents)


def test_fp16_latents_run_on_cpu(models):
    """The release's fp16 latent path (fp32 tiny weights, fp16 noise/latents like the original pipeline)."""
    cfg, enc, dit, vae = models
    image, mask = comfy_inputs()
    _, latent, structure = run_coarse(coarse_models(cfg, enc, dit, vae, torch.float16), image, mask, 2, 0)
    assert latent.latents.dtype == torch.float16 and structure.num_tokens > 0


def test_bad_input_fails_before_any_model_runs(models):
    cfg, enc, dit, vae = models
    image, _ = comfy_inputs()
    calls = []
    hooks = [n.register_forward_hook(lambda *a: calls.append(1)) for n in (enc, dit)]
    try:
        with pytest.raises(ValueError, match="mask is empty"):
            run_coarse(coarse_models(cfg, enc, dit, vae, torch.float32), image, torch.zeros(1, 48, 64), 2, 0)
    finally:
        for h in hooks:
            h.remove()
    assert not calls


def test_bench_coarse_tiny_runs_on_cpu(tmp_path):
    """bench/bench_coarse.py is run by hand on the GPU; here its --tiny path is checked for crashes."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_coarse.py"
    spec = importlib.util.spec_from_file_location("bench_coarse", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "coarse.md"
    text = bench.main(["--tiny", "--steps", "2", "--repeats", "1", "--device", "cpu", "--out", str(out)])
    assert out.read_text() == text
    assert "| dense sampling (2 steps, CFG) |" in text and "our index:" in text


def test_matches_the_original_pipeline_on_the_tiny_config():
    """The original `Direct3DS2Pipeline.inference(mode="dense")` + sort_block, recorded by
    tools/golden/make_coarse_stage_golden.py (tiny config in fp16, seed-0 weights, 3 steps, CFG 7, noise seed 7)."""
    import importlib.util
    from pathlib import Path

    from safetensors.torch import load_file

    data = Path(__file__).parent / "data"
    spec = importlib.util.spec_from_file_location(
        "make_coarse_stage_golden", GENERATORS / "make_coarse_stage_golden.py"
    )
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    ref = load_file(str(data / "coarse_stage_tiny_original.safetensors"))
    cfg = gen.tiny_fp16_config()
    enc = ImageConditioner(cfg.dense_image_encoder)
    enc.load_backbone(deterministic_state_dict(enc.model))
    dit = DenseDiT(cfg.dense_dit)
    dit.load_state_dict(deterministic_state_dict(dit), strict=True)
    vae = DenseVAE(cfg.dense_vae)
    vae.load_state_dict(deterministic_state_dict(vae), strict=True)
    with torch.no_grad():
        vae.decoder.out_layer[2].bias.fill_(gen.DECODER_BIAS)
    cond, _ = encode_pixels(enc.eval(), gen.pixels())  # 518² input resized to the tiny 56² as torchvision does
    # fp32 DINOv2 with the same op sequence (the antialiased resize included): only summation order and
    # vectorised libm differ between CPUs; widest dot product 256 (MLP), ~9 layers.
    assert rel_rms(cond, ref["out.cond"]) < reorder_rel_rms(k=256, depth=9)
    # the pipeline's dense stage: item 0 draws its noise from a CPU generator seeded NOISE_SEED, as the recording
    m = coarse_models(cfg, enc.eval(), dit.eval(), vae, torch.float16)
    cond_in = Conditioning(
        ref["out.cond"], torch.ones(1, 1, 1, dtype=torch.bool)
    )  # patch_mask: read by v1.0 sparse only
    latent = pipeline.sample_dense(m, cond_in, gen.NOISE_SEED, gen.STEPS, gen.GUIDANCE).latents
    # Same fp16 noise draw, fp16-rounded timesteps, CFG order and Euler step as the original (each pinned exactly
    # in test_parity_coarse.py): bitwise equal on the recording CPU. Elsewhere the fp16 DiT's GEMMs (fp32
    # accumulation in another order) move outputs by an fp16 ulp per layer (~22 layers, widest 256 inputs), and
    # CFG v_u + 7 (v_c - v_u) scales independent errors of the two passes by sqrt(6² + 7²) ≈ 9.2.
    assert latent.dtype == torch.float16
    assert rel_rms(latent, ref["out.latent"]) < 9.2 * reorder_rel_rms(k=256, depth=22, store=torch.float16)
    # The index from the original's latent: occupancy is sigmoid(logit) >= 0.1 in fp16, as the original
    # (s2core.structure.occupancy_coords), a discrete decision that fp16 rounding can flip for a voxel whose
    # logit is within noise of logit(0.1); every other voxel must agree, and the order is exact (sort_block).
    vae = vae.eval()
    with torch.no_grad():
        logits = vae.decode(ref["out.latent"])[0, 0].float()  # [16, 16, 16]
    coords = decode_occupancy(vae, ref["out.latent"], block_size=8)
    assert torch.equal(coords, sort_block(coords, 8)[0])
    ours, theirs = torch.zeros(16, 16, 16, dtype=torch.bool), torch.zeros(16, 16, 16, dtype=torch.bool)
    ours[tuple(coords[:, 1:].long().T)] = True
    theirs[tuple(ref["out.index"][:, 1:].T)] = True
    tol = reorder_rel_rms(k=32 * 27, depth=12, store=torch.float16)  # tiny decoder: 32 channels x 27 taps, 12 layers
    sure = (logits - torch.logit(torch.tensor(0.1))).abs() > 4 * tol * logits.pow(2).mean().sqrt()
    assert sure.float().mean() > 0.9 and 0 < int(theirs.sum()) < 16**3
    assert torch.equal(ours[sure], theirs[sure]), f"{int((ours != theirs)[sure].sum())} voxels differ"
