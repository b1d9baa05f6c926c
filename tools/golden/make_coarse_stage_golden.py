"""Record the original pipeline's whole coarse stage on the tiny config (for tests/test_coarse_stage.py).

`Direct3DS2Pipeline.inference(mode="dense")` of DreamTechAI/Direct3D-S2 — DINOv2 conditioning, fp16 noise from a
seeded generator, 3 Euler steps with CFG 7 (diffusers scheduler), VAE decode at threshold 0.1 — then
`sort_block(·, 8)`, on `tiny_release()`'s dense components switched to fp16 like the release, deterministic
weights (seed 0), and the decoder's output bias set to -3 so the occupancy is partial. The input is
tests/data/preprocess_original.png (the original's own 518² preprocessing output), which the tiny 56² DINOv2
resizes. Run with the upstream environment:

    UPSTREAM_VENV/bin/python tools/golden/make_coarse_stage_golden.py --upstream UPSTREAM/Direct3D-S2 \
        --dinov2 UPSTREAM/dinov2

Writes tests/data/coarse_stage_tiny_original.safetensors: out.cond [1, T, C] fp32, out.latent [1, 8, 4, 4, 4]
fp16 (the decoder's input), out.index [N, 4] int64 (block-sorted).
"""

import argparse
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
STEPS, GUIDANCE, NOISE_SEED, DECODER_BIAS = 3, 7.0, 7, -3.0


def tiny_fp16_config():
    sys.path.insert(0, str(REPO))
    from s2core.config import tiny_release

    cfg = tiny_release()
    return replace(
        cfg, dense_dit=replace(cfg.dense_dit, use_fp16=True), dense_vae=replace(cfg.dense_vae, use_fp16=True)
    )


def pixels() -> torch.Tensor:
    from PIL import Image

    arr = np.array(Image.open(DATA / "preprocess_original.png"))
    return torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255  # [1, 4, 518, 518]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--dinov2", required=True)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "tools" / "golden"))
    import harness

    harness.install_stand_ins(args.upstream, args.dinov2)
    from diffusers import FlowMatchEulerDiscreteScheduler
    from dinov2.layers import MemEffAttention
    from dinov2.layers import NestedTensorBlock as Block
    from dinov2.models.vision_transformer import DinoVisionTransformer
    from direct3d_s2.models.autoencoders.dense_vae import DenseShapeVAE
    from direct3d_s2.models.conditioner import DinoEncoder
    from direct3d_s2.models.transformers.dense_dit import DenseDiT
    from direct3d_s2.pipeline import Direct3DS2Pipeline
    from direct3d_s2.utils import sort_block
    from safetensors.torch import save_file

    cfg = tiny_fp16_config()
    e = cfg.dense_image_encoder
    real_hub = torch.hub.load
    torch.hub.load = lambda *a, **k: DinoVisionTransformer(  # the hub's dinov2_vitl14_reg arguments, tiny sizes
        img_size=e.pretrain_img_size,
        patch_size=e.patch_size,
        embed_dim=e.embed_dim,
        depth=e.depth,
        num_heads=e.num_heads,
        mlp_ratio=e.mlp_ratio,
        block_fn=partial(Block, attn_class=MemEffAttention),
        num_register_tokens=e.num_register_tokens,
        init_values=1.0,
        ffn_layer="mlp",
        block_chunks=0,
        interpolate_antialias=True,
        interpolate_offset=0.0,
    )
    enc = DinoEncoder(model=e.model, version=e.version, size=e.size).eval()
    torch.hub.load = real_hub
    harness.load_deterministic(enc.encoder, 0)
    params = lambda c: {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(c).items()}  # noqa: E731
    dit, _ = harness.build_original("direct3d_s2.models.transformers.dense_dit.DenseDiT", params(cfg.dense_dit), 0)
    vae, _ = harness.build_original("direct3d_s2.models.autoencoders.dense_vae.DenseShapeVAE", params(cfg.dense_vae), 0)
    assert isinstance(dit, DenseDiT) and isinstance(vae, DenseShapeVAE)
    with torch.no_grad():
        vae.decoder.out_layer[2].bias.fill_(DECODER_BIAS)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.dense_scheduler.shift)
    pipe = Direct3DS2Pipeline(vae, dit, None, None, None, None, None, None, enc, None, sched, None, None)
    pipe.device = torch.device("cpu")
    image = pixels()
    seen = {}
    vae.decoder.register_forward_pre_hook(lambda m, a: seen.update(latent=a[0].clone()))
    with torch.no_grad():
        cond, _ = pipe.encode_image(image, enc, True)
        index = pipe.inference(
            image,
            vae,
            dit,
            enc,
            sched,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=torch.Generator().manual_seed(NOISE_SEED),
            mode="dense",
            mc_threshold=0.1,
        )[0]
    index = sort_block(index, cfg.sparse_dit_512.selection_block_size)
    assert 0 < len(index) < 16**3, len(index)
    save_file(
        {"out.cond": cond.contiguous(), "out.latent": seen["latent"].contiguous(), "out.index": index.contiguous()},
        str(DATA / "coarse_stage_tiny_original.safetensors"),
        metadata={"command": " ".join(sys.argv), "upstream_commit": harness.upstream_commit(args.upstream)},
    )
    print(len(index), "voxels")
