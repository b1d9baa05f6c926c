"""Golden fixtures of the coarse (dense) stage, recorded from the original code through harness.py.

Each entry of `COMPONENTS` is `<component>__<config>` -> a callable returning `(tensors, meta)`. What each
fixture pins, its config and a tolerance hint are listed in tests/golden/README.md.
"""

from __future__ import annotations

import contextlib
import json
from functools import partial

import harness
import torch

CONFIG = json.loads((harness.REPO / "tests" / "data" / "upstream" / "config.json").read_text())
VAE_TARGET = "direct3d_s2.models.autoencoders.dense_vae.DenseShapeVAE"
DIT_TARGET = "direct3d_s2.models.transformers.dense_dit.DenseDiT"
SCHED_TARGET = "diffusers.schedulers.FlowMatchEulerDiscreteScheduler"
ENCODER_TARGET = "direct3d_s2.models.conditioner.DinoEncoder"


def _meta(**kw) -> dict:
    kw.setdefault("seed", None)
    kw.setdefault("specs", None)
    kw.setdefault("input_seed", None)
    return harness.module_meta(kw.pop("target"), kw.pop("params"), kw.pop("seed"), kw.pop("specs"), **kw)


# ---------------------------------------------------------------------------------------------
# a. flow-matching scheduler + CFG, as Direct3DS2Pipeline.inference drives them

SCHEDULES = [(6.0, 50, "dense"), (6.0, 30, "sparse512"), (8.0, 15, "sparse1024")]
TOY_SHAPE = (1, 8, 4, 4, 4)
GUIDANCE = 7.0


def _toy_model(x, t_in, c, cond: bool):
    """A stand-in for the DiT so a whole sampling loop fits in a fixture; computed in x.dtype."""
    tt = t_in.view(-1, *[1] * (x.dim() - 1)) / 1000
    return (0.5 * x + c * tt) if cond else (-0.3 * x + 0.2 * tt)


def scheduler_official():
    from diffusers import FlowMatchEulerDiscreteScheduler

    tensors, desc = {}, {}
    c = harness.seeded(TOY_SHAPE, 11, torch.float16)
    tensors["in.toy_c"] = c
    desc["in.toy_c"] = f"{list(TOY_SHAPE)} fp16, the toy model's per-element constant (see notes)"
    for shift, steps, stage in SCHEDULES:
        tag = f"s{shift:g}_n{steps}"
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        sched.set_timesteps(steps, device="cpu")
        tensors[f"out.timesteps_{tag}"] = sched.timesteps.clone()
        tensors[f"out.sigmas_{tag}"] = sched.sigmas.clone()
        tensors[f"out.model_t_{tag}"] = torch.stack(
            [torch.tensor([t], dtype=torch.float16) for t in sched.timesteps]
        ).view(-1)
        desc[f"out.timesteps_{tag}"] = f"[{steps}] fp32 scheduler.timesteps after set_timesteps({steps}) ({stage})"
        desc[f"out.sigmas_{tag}"] = f"[{steps + 1}] fp32 scheduler.sigmas (terminal 0 appended)"
        desc[f"out.model_t_{tag}"] = (
            f"[{steps}] fp16, torch.tensor([t], dtype=latents.dtype) as the pipeline "
            "feeds the DiT (fp16 latents -> fp16 timestep)"
        )
        for dt in (torch.float16, torch.float32):
            dname = "fp16" if dt == torch.float16 else "fp32"
            if dt == torch.float32 and stage != "dense":
                continue
            x = harness.seeded(TOY_SHAPE, 12, dt)
            tensors[f"in.latents_{tag}_{dname}"] = x
            desc[f"in.latents_{tag}_{dname}"] = f"{list(TOY_SHAPE)} {dname} initial noise"
            sched.set_timesteps(steps, device="cpu")
            for i, t in enumerate(sched.timesteps):
                t_in = torch.tensor([t], dtype=x.dtype)
                pc = _toy_model(x, t_in, c.to(dt), True)
                pu = _toy_model(x, t_in, c.to(dt), False)
                pred = pu + GUIDANCE * (pc - pu)
                x = sched.step(pred, t, x, generator=None).prev_sample
                if i == 0:
                    tensors[f"mid.step0_pred_{tag}_{dname}"] = pred
                    tensors[f"mid.step0_{tag}_{dname}"] = x
                    desc[f"mid.step0_pred_{tag}_{dname}"] = "CFG-combined velocity of step 0"
                    desc[f"mid.step0_{tag}_{dname}"] = "latents after one Euler step"
            tensors[f"out.final_{tag}_{dname}"] = x
            desc[f"out.final_{tag}_{dname}"] = f"latents after all {steps} steps ({dname} throughout)"
    notes = (
        "FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=S); set_timesteps(N, device) as "
        "Direct3DS2Pipeline.inference calls it (no sigmas/mu). Loop per step t: t_in = torch.tensor([t], "
        "dtype=latents.dtype); pred_cond = 0.5*x + c*(t_in/1000); pred_uncond = -0.3*x + 0.2*(t_in/1000) "
        "(toy model standing in for the DiT, computed in x.dtype, c = in.toy_c cast to x.dtype); "
        f"pred = pred_uncond + {GUIDANCE}*(pred_cond - pred_uncond) (pipeline CFG, guidance_scale 7.0, in x.dtype); "
        "x = scheduler.step(pred, t, x).prev_sample (diffusers: sample.float() + (sigma_next - sigma) * pred, "
        "then cast to pred.dtype; note dt*pred with a 0-dim fp32 dt and fp16 pred is computed in fp16 by torch "
        "type promotion). Stages: s6_n50 dense, s6_n30 sparse512, s8_n15 sparse1024. Tolerance: timesteps/sigmas "
        "exact or 1 ulp fp32; model_t exact; final latents fp32 ~1e-6, fp16 a few ulp."
    )
    return tensors, _meta(
        target=SCHED_TARGET,
        params={
            "num_train_timesteps": 1000,
            "shift": [s for s, _, _ in SCHEDULES],
            "num_inference_steps": [n for _, n, _ in SCHEDULES],
            "guidance_scale": GUIDANCE,
        },
        input_seed=12,
        dtype="float16+float32",
        tensors=desc,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------
# b. sort_block and extract_tokens_and_coords (direct3d_s2/utils/sparse.py)


def sort_block_r64():
    from direct3d_s2.utils import sort_block

    g = torch.Generator().manual_seed(21)
    flat = torch.randperm(64**3, generator=g)[:1500].sort().values  # unique voxels, nonzero() order
    xyz = torch.stack([flat // 4096, (flat // 64) % 64, flat % 64], dim=1)
    index = torch.cat([torch.zeros(len(flat), 1, dtype=torch.int64), xyz], dim=1)
    tensors = {
        "in.latent_index": index.clone(),
        "out.latent_index_b8": sort_block(index.clone(), 8),
        "out.latent_index_b4": sort_block(index.clone(), 4),
    }
    desc = {
        "in.latent_index": "[1500, 4] int64 (batch=0, x, y, z) unique voxels of 64^3 in row-major order "
        "(as decode_mesh's nonzero() yields them)",
        "out.latent_index_b8": "sort_block(index, 8): rows reordered block-major (block x,y,z then in-block x,y,z)",
        "out.latent_index_b4": "sort_block(index, 4)",
    }
    notes = (
        "sort_block is np.lexsort on (block x, block y, block z, in-block x, y, z) with x the primary key; "
        "the batch column is not a key (single-batch index). Exact match required."
    )
    return tensors, _meta(
        target="direct3d_s2.utils.sparse.sort_block",
        params={"block_size": [8, 4]},
        input_seed=21,
        dtype="int64",
        tensors=desc,
        notes=notes,
        stand_ins=["sort_block_cpu_copy"],
    )


def extract_tokens_b2():
    from direct3d_s2.utils import extract_tokens_and_coords

    C = 8
    cond = harness.seeded((2, 5 + 37 * 37, C), 31)
    mask = torch.zeros(2, 37, 37, dtype=torch.bool)
    mask[0, 10:20, 5:30] = True
    mask[0, 3, 3] = True
    mask[1, 30:37, 0:4] = True
    tokens, coords = extract_tokens_and_coords(cond, mask)
    tensors = {"in.cond": cond, "in.mask": mask, "out.tokens": tokens, "out.coords": coords}
    desc = {
        "in.cond": "[2, 1374, 8] fp32 conditioner tokens (cls, 4 registers, 37x37 patches; width reduced "
        "from 1024 to 8)",
        "in.mask": "[2, 37, 37] bool patch mask (max_pool2d(mask, 14, 14) > 0 in DinoEncoder)",
        "out.tokens": "[N, 8] selected tokens: per batch item cls, registers, then masked patches row-major",
        "out.coords": "[N, 4] coords (batch, x=w, y=h, 0) for patches, (batch, 0, 0, 1) for cls/registers; "
        "float32 because the original concatenates int64 with a float zeros column",
    }
    notes = "Only used when a DiT has sparse_conditions=True (false in the official v1.1 config). Exact match required."
    return tensors, _meta(
        target="direct3d_s2.utils.sparse.extract_tokens_and_coords",
        params={"num_cls": 1, "num_reg": 4},
        input_seed=31,
        dtype="float32",
        tensors=desc,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------
# c. dense VAE: decode (real config), encode, and the dense -> sparse glue of the pipeline


def _vae_params(**over):
    p = dict(CONFIG["dense_vae"]["params"])
    p.update(over)
    return p


def dense_vae_decode_official():
    params = _vae_params()
    vae, specs = harness.build_original(VAE_TARGET, params, seed=0)
    z = harness.seeded((1, 8, 16, 16, 16), 41, torch.float16)
    with torch.no_grad():
        logits = vae.decoder(z)
    tensors = {"in.latents": z, "out.logits": logits}
    desc = {
        "in.latents": "[1, 8, 16, 16, 16] fp16 dense latent (the pipeline's latents dtype)",
        "out.logits": "[1, 1, 64, 64, 64] fp16 vae.decoder(latents), occupancy logits",
    }
    notes = (
        "Official v1.1 dense VAE config (use_fp16=True: decoder convs and the input/output layers are fp16, "
        "ChannelLayerNorm32 normalises in fp32). Weights: deterministic seed 0 = manifest model_dense.vae. "
        "Tolerance hint: fp16 through 20 3D convs -> compare relative RMS < 1e-2, max abs ~ 5e-2."
    )
    return tensors, _meta(
        target=VAE_TARGET, params=params, seed=0, specs=specs, input_seed=41, dtype="float16", tensors=desc, notes=notes
    )


def dense_vae_decode_fp32_r8():
    params = _vae_params(use_fp16=False)
    vae, specs = harness.build_original(VAE_TARGET, params, seed=0)
    z = harness.seeded((1, 8, 8, 8, 8), 42)
    with torch.no_grad():
        logits = vae.decoder(z)
    tensors = {"in.latents": z, "out.logits": logits}
    desc = {
        "in.latents": "[1, 8, 8, 8, 8] fp32 latent (spatially reduced, channels/blocks official)",
        "out.logits": "[1, 1, 32, 32, 32] fp32 vae.decoder(latents)",
    }
    notes = (
        "Official dense VAE architecture in fp32 (use_fp16=False) on an 8^3 latent (the decoder is fully "
        "convolutional; weights are the same names/shapes as the manifest, so the same values). "
        "Tolerance hint: fp32 ~1e-4 relative."
    )
    return tensors, _meta(
        target=VAE_TARGET, params=params, seed=0, specs=specs, input_seed=42, dtype="float32", tensors=desc, notes=notes
    )


def dense_vae_encode_fp32_r32():
    params = _vae_params(use_fp16=False)
    vae, specs = harness.build_original(VAE_TARGET, params, seed=0)
    g = torch.Generator().manual_seed(43)
    occ = (torch.rand(1, 1, 32, 32, 32, generator=g) < 0.3).float()
    with torch.no_grad():
        z, post = vae.encode({"dense_index": occ}, sample_posterior=False)
    tensors = {"in.occupancy": occ, "out.mean": post.mean, "out.logvar": post.logvar}
    desc = {
        "in.occupancy": "[1, 1, 32, 32, 32] fp32 0/1 occupancy (batch['dense_index'])",
        "out.mean": "[1, 8, 8, 8, 8] posterior mean = encode(sample_posterior=False)[0]",
        "out.logvar": "[1, 8, 8, 8, 8] posterior logvar (clamped to [-30, 20])",
    }
    notes = (
        "Encoder in fp32 (use_fp16=False): with use_fp16=True the original encoder feeds fp32 activations "
        "into fp16 blocks and fails outside autocast, so inference never uses it. Input is mapped "
        "x*2-1 inside encode. Tolerance hint: fp32 ~1e-4 relative."
    )
    return tensors, _meta(
        target=VAE_TARGET, params=params, seed=0, specs=specs, input_seed=43, dtype="float32", tensors=desc, notes=notes
    )


class _FixedLogits(torch.nn.Module):
    """Stand-in decoder that returns a given logit volume, so decode_mesh's glue runs on a shaped field."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, latents):
        return self.logits


def dense_glue_r64():
    from direct3d_s2.utils import sort_block

    params = _vae_params()
    vae = harness.import_target(VAE_TARGET)(**params).eval()
    ax = torch.arange(64, dtype=torch.float32)
    X, Y, Z = torch.meshgrid(ax - 30.5, ax - 33.0, ax - 31.7, indexing="ij")
    r = torch.sqrt(X**2 + (1.3 * Y) ** 2 + Z**2)
    logits = ((9.0 - r) * 0.6 + 0.4 * harness.seeded((64, 64, 64), 51)).to(torch.float16)[None, None]
    vae.decoder = _FixedLogits(logits)
    with torch.no_grad():
        index = vae.decode_mesh(logits, mc_threshold=0.1, return_index=True)[0]
    sorted_index = sort_block(index, CONFIG["sparse_dit_512"]["params"]["selection_block_size"])
    tensors = {"in.logits": logits, "mid.latent_index": index, "out.latent_index": sorted_index}
    desc = {
        "in.logits": "[1, 1, 64, 64, 64] fp16 decoder output (an ellipsoid-with-noise field, not a "
        "network output, so the index is a shaped, non-trivial set)",
        "mid.latent_index": "[N, 4] int64 decode_mesh(..., mc_threshold=0.1, return_index=True)[0]: "
        "nonzero() of (sigmoid(logits) >= 0.1) with a leading 0 column",
        "out.latent_index": "[N, 4] int64 sort_block(mid.latent_index, 8): what the pipeline feeds the 512 stage",
    }
    notes = (
        "The coarse-to-fine glue of Direct3DS2Pipeline.__call__: dense inference decodes with "
        "mc_threshold=0.1 and return_index=True; the comparison sigmoid(x) >= 0.1 happens in fp16 (the "
        "logits dtype), i.e. against fp16(0.1) = 0.0999756; then sort_block(latent_index, "
        "sparse_dit_512.selection_block_size=8). The VAE decoder is replaced by a module returning "
        "in.logits (real decoder outputs with synthetic weights occupy ~100% of the grid, which pins "
        "nothing). Batch column is always 0 (only item 0 is used). Exact match required."
    )
    return tensors, _meta(
        target=VAE_TARGET + ".decode_mesh",
        params={"mc_threshold": 0.1, "return_index": True, "block_size": 8},
        input_seed=51,
        dtype="float16",
        tensors=desc,
        notes=notes,
        stand_ins=["sort_block_cpu_copy"],
    )


# ---------------------------------------------------------------------------------------------
# d. dense DiT, one forward


def _dit_params(**over):
    p = dict(CONFIG["dense_dit"]["params"])
    p.update(over)
    return p


def _dit_forward(params, input_seed, n_cond, t_value, dtype_in, setup=None):
    dit, specs = harness.build_original(DIT_TARGET, params, seed=0)
    if setup is not None:
        setup(dit)  # e.g. forward hooks that record intermediates
    R = params["resolution"]
    x = harness.seeded((1, params["in_channels"], R, R, R), input_seed, dtype_in)
    cond = harness.seeded((1, n_cond, params["cond_channels"]), input_seed + 1, dtype_in)
    t = torch.tensor([t_value], dtype=dtype_in)
    with torch.no_grad():
        out = dit(x=x, t=t, cond=cond)
    return dit, specs, x, cond, t, out


def dense_dit_t_embedder_fp32():
    target = "direct3d_s2.models.transformers.dense_dit.TimestepEmbedder"
    params = {"hidden_size": 1024, "frequency_embedding_size": 256}
    emb, specs = harness.build_original(target, params, seed=0)
    t = torch.tensor([0.0, 1.5, 20.0, 500.25, 987.5, 999.0])
    with torch.no_grad():
        out = emb(t)
    tensors = {"in.t": t, "out.t_emb": out}
    desc = {"in.t": "[6] fp32 timesteps", "out.t_emb": "[6, 1024] fp32 TimestepEmbedder(t)"}
    notes = (
        "The dense DiT's TimestepEmbedder alone, fp32, built standalone, so its weight names are "
        "'mlp.0.weight' etc. (NOT 't_embedder.mlp.0.weight'; values differ from the DiT fixtures'). "
        "sinusoid: freqs = exp(-ln(10000) * arange(128) / 128), emb = cat(cos(t*f), sin(t*f)); then "
        "Linear(256,1024) -> SiLU -> Linear(1024,1024). Small enough that tests/test_parity_harness.py "
        "reproduces it in a few lines. Tolerance hint: fp32 ~1e-5 relative."
    )
    return tensors, _meta(
        target=target, params=params, seed=0, specs=specs, input_seed=None, dtype="float32", tensors=desc, notes=notes
    )


def dense_dit_b2_fp16():
    params = _dit_params(num_blocks=2, use_checkpoint=False)
    dit, specs, x, cond, t, out = _dit_forward(params, 61, 24, 987.5, torch.float16)
    tensors = {"in.x": x, "in.t": t, "in.cond": cond, "out.v": out}
    desc = {
        "in.x": "[1, 8, 16, 16, 16] fp16 noisy latent",
        "in.t": "[1] fp16 timestep (pipeline feeds latents.dtype)",
        "in.cond": "[1, 24, 1024] fp16 condition tokens (24 instead of 1374)",
        "out.v": "[1, 8, 16, 16, 16] fp16 predicted velocity",
    }
    notes = (
        "Official dense DiT width/heads/resolution (1024, 16 heads, 16^3 tokens, qk_rms_norm, ape, "
        "use_fp16=True: all Linear weights fp16, LayerNorm32 in fp32, pos_emb buffer fp32) with 2 blocks "
        "instead of 24; use_checkpoint off (no effect in eval). pos_emb is a state-dict buffer, so it holds "
        "deterministic values, not the sinusoidal table. Dense attention via ATTN_BACKEND=sdpa. "
        "Tolerance hint: fp16, relative RMS < 1e-2."
    )
    return tensors, _meta(
        target=DIT_TARGET, params=params, seed=0, specs=specs, input_seed=61, dtype="float16", tensors=desc, notes=notes
    )


DIT_TOKEN_SUBSET = list(range(0, 4096, 64))


def dense_dit_b2_fp32():
    params = _dit_params(num_blocks=2, use_checkpoint=False, use_fp16=False)
    seen = {}

    def record(dit):
        dit.t_embedder.register_forward_hook(lambda m, i, o: seen.update(t_emb=o))
        dit.blocks[0].register_forward_pre_hook(lambda m, i: seen.update(h_in=i[0]))
        dit.blocks[0].register_forward_hook(lambda m, i, o: seen.update(block0=o))

    dit, specs, x, cond, t, out = _dit_forward(params, 62, 24, 741.25, torch.float32, setup=record)
    sel = torch.as_tensor(DIT_TOKEN_SUBSET)
    tensors = {
        "in.x": x,
        "in.t": t,
        "in.cond": cond,
        "out.v": out,
        "mid.t_emb": seen["t_emb"],
        "mid.token_subset": sel,
        "mid.h_in_subset": seen["h_in"][:, sel].contiguous(),
        "mid.block0_subset": seen["block0"][:, sel].contiguous(),
    }
    desc = {
        "in.x": "[1, 8, 16, 16, 16] fp32 noisy latent",
        "in.t": "[1] fp32 timestep",
        "in.cond": "[1, 24, 1024] fp32 condition tokens",
        "out.v": "[1, 8, 16, 16, 16] fp32 velocity",
        "mid.t_emb": "[1, 1024] t_embedder(t) (the modulation input of every block)",
        "mid.token_subset": "[64] token indices (x*256 + y*16 + z order of patchify) kept in *_subset",
        "mid.h_in_subset": "[1, 64, 1024] input_layer(patchified x) + pos_emb, before block 0",
        "mid.block0_subset": "[1, 64, 1024] output of block 0",
    }
    notes = (
        "As dense_dit__b2_fp16 but use_fp16=False (everything fp32): pins the math without fp16 rounding. "
        "Tolerance hint: fp32, relative RMS < 1e-4."
    )
    return tensors, _meta(
        target=DIT_TARGET, params=params, seed=0, specs=specs, input_seed=62, dtype="float32", tensors=desc, notes=notes
    )


# ---------------------------------------------------------------------------------------------
# e. DINOv2 ViT-L/14-reg4 and the DinoEncoder conditioner


@contextlib.contextmanager
def _local_hub(model_builder):
    """DinoEncoder.__init__ calls torch.hub.load(..., pretrained=True) (network); build locally instead."""
    real = torch.hub.load
    torch.hub.load = lambda *a, **k: model_builder()
    try:
        yield
    finally:
        torch.hub.load = real


def _dinov2_dir() -> str:
    d = getattr(getattr(harness, "ARGS", None), "dinov2", None)
    assert d, "the DINOv2 fixtures need --dinov2 (a facebookresearch/dinov2 checkout)"
    return d


_REAL_HUB_LOAD = torch.hub.load


def _hub_vitl14_reg():
    return _REAL_HUB_LOAD(_dinov2_dir(), "dinov2_vitl14_reg", source="local", pretrained=False)


def _vitl14_reg_depth(depth):
    from dinov2.layers import MemEffAttention
    from dinov2.layers import NestedTensorBlock as Block
    from dinov2.models.vision_transformer import DinoVisionTransformer

    # Same arguments as hub dinov2_vitl14_reg -> vit_large, only depth changed.
    return DinoVisionTransformer(
        img_size=518,
        patch_size=14,
        embed_dim=1024,
        depth=depth,
        num_heads=16,
        mlp_ratio=4,
        block_fn=partial(Block, attn_class=MemEffAttention),
        num_register_tokens=4,
        init_values=1.0,
        ffn_layer="mlp",
        block_chunks=0,
        interpolate_antialias=True,
        interpolate_offset=0.0,
    )


HUB_STAND_IN = (
    "torch_hub_local",
    "DinoEncoder's torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14_reg', "
    "pretrained=True) redirected to the local facebookresearch/dinov2 source with pretrained=False; "
    "weights then loaded deterministically (same architecture, no download)",
)


def _dino_fixture(builder, depth_note, input_seed, token_subset, with_mask):
    harness.register_stand_in(*HUB_STAND_IN)
    with _local_hub(builder):
        enc = harness.import_target(ENCODER_TARGET)(**CONFIG["dense_image_encoder"]["params"]).eval()
    specs = harness.load_deterministic(enc.encoder, seed=0)
    g = torch.Generator().manual_seed(input_seed)
    image_u8 = torch.randint(0, 256, (1, 3, 518, 518), generator=g, dtype=torch.uint8)
    image = image_u8.float() / 255.0
    mask = torch.zeros(1, 1, 518, 518, dtype=torch.bool)
    mask[..., 100:400, 150:380] = True
    seen = {}
    hook = enc.encoder.register_forward_hook(lambda m, args, out: seen.update(pixels=args[0], feats=out))
    with torch.no_grad():
        res = enc(image, mask.float()) if with_mask else enc(image)
    hook.remove()
    z = res[0] if with_mask else res
    sel = torch.as_tensor(token_subset, dtype=torch.int64)
    tensors = {
        "in.image_u8": image_u8,
        "mid.token_subset": sel,
        "mid.pixels_rows0_13": seen["pixels"][:, :, :14].contiguous(),
        "mid.x_prenorm_subset": seen["feats"]["x_prenorm"][:, sel].contiguous(),
        "out.cond_subset": z[:, sel].contiguous(),
    }
    desc = {
        "in.image_u8": "[1, 3, 518, 518] uint8; the conditioner input is image_u8.float() / 255 (RGB in [0,1])",
        "mid.token_subset": f"[{len(sel)}] int64 token indices kept: cls, 4 registers, every 23rd patch token",
        "mid.pixels_rows0_13": "[1, 3, 14, 518] fp32 first patch row of DinoEncoder.transform(image): "
        "Resize(518)/CenterCrop(518) (identities here) + ImageNet Normalize",
        "mid.x_prenorm_subset": "[1, K, 1024] fp32 encoder(pixels, is_training=True)['x_prenorm'] at "
        "mid.token_subset (of 1374 tokens)",
        "out.cond_subset": "[1, K, 1024] fp32 DinoEncoder output F.layer_norm(x_prenorm, (1024,)) (no "
        "affine, eps 1e-5) at mid.token_subset",
    }
    if with_mask:
        tensors["in.mask"] = mask
        tensors["out.patch_mask"] = res[1]
        desc["in.mask"] = "[1, 1, 518, 518] bool mask; passed to DinoEncoder as mask.float() (image_mask)"
        desc["out.patch_mask"] = "[1, 37, 37] bool max_pool2d(image_mask, 14, 14).squeeze(1) > 0"
    notes = (
        f"{depth_note} Token order: cls, 4 registers, 37x37 patches row-major; only a token subset is "
        "stored to keep the fixture small (every token depends on every patch through attention, so a "
        "subset still pins the whole computation). XFORMERS_DISABLED=1 (plain attention). Weights: "
        "deterministic seed 0 on the hub model's own names (manifest dinov2_vitl14_reg4, no 'encoder.' "
        "prefix). Tolerance hint: fp32, relative RMS < 1e-4 (x_prenorm), < 1e-4 (cond)."
    )
    return tensors, _meta(
        target=ENCODER_TARGET,
        params=CONFIG["dense_image_encoder"]["params"],
        seed=0,
        specs=specs,
        input_seed=input_seed,
        dtype="float32",
        tensors=desc,
        notes=notes,
        stand_ins=["torchvision", HUB_STAND_IN[0]],
    )


def preprocess_image_rgba():
    from direct3d_s2.utils import preprocess_image
    from PIL import Image

    g = torch.Generator().manual_seed(81)
    H, W = 150, 230
    rgb = torch.randint(0, 256, (H, W, 3), generator=g, dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    alpha = torch.zeros(H, W, dtype=torch.uint8)
    inside = ((yy - 80.0) / 45) ** 2 + ((xx - 100.0) / 70) ** 2 <= 1  # object off-centre, transparent border
    alpha[inside] = 255
    edge = inside & (((yy - 80.0) / 45) ** 2 + ((xx - 100.0) / 70) ** 2 > 0.7)
    alpha[edge] = torch.randint(1, 255, (int(edge.sum()),), generator=g, dtype=torch.uint8)
    rgba = torch.cat([rgb, alpha[..., None]], dim=-1)
    out = preprocess_image(Image.fromarray(rgba.numpy(), mode="RGBA"))
    out_u8 = (out * 255).round().to(torch.uint8)
    assert torch.equal(out_u8.float() / 255, out), "preprocess_image output is not k/255"
    tensors = {"in.rgba": rgba, "out.image_u8": out_u8}
    desc = {
        "in.rgba": f"[{H}, {W}, 4] uint8 RGBA image (object with soft alpha edge, transparent border); "
        "passed as PIL.Image.fromarray(rgba, 'RGBA')",
        "out.image_u8": "[4, 518, 518] uint8 = preprocess_image(...) * 255 exactly (the output is "
        "to_tensor(...) = k / 255 in fp32): RGB composited on white, then mask",
    }
    notes = (
        "direct3d_s2.utils.image.preprocess_image on an RGBA PIL image (the pipeline's path when the input "
        "has alpha): crop to alpha > 0 bounding box, composite on white (float64, truncating astype(uint8)), "
        "pad to square (rgb fill 255, mask fill 0), PIL bilinear resize to 518, pad 16 more, PIL bilinear "
        "resize to 518 again (mask: nearest), to_tensor. Compare out.image_u8.float() / 255. Tolerance: "
        "exact is achievable only by reproducing PIL's resampling; otherwise state the bound (1-2/255)."
    )
    return tensors, _meta(
        target="direct3d_s2.utils.image.preprocess_image",
        params={"img_size": 518, "extra_pad": 16},
        input_seed=81,
        dtype="uint8",
        tensors=desc,
        notes=notes,
        stand_ins=["torchvision"],
    )


TOKEN_SUBSET = list(range(0, 5)) + list(range(5, 1374, 23))


def dinov2_depth2():
    return _dino_fixture(
        partial(_vitl14_reg_depth, 2),
        "DINOv2 ViT-L/14-reg4 with 2 blocks instead of 24 "
        "(DinoVisionTransformer with the hub's dinov2_vitl14_reg arguments, depth=2).",
        71,
        TOKEN_SUBSET,
        with_mask=True,
    )


def dinov2_official():
    return _dino_fixture(
        _hub_vitl14_reg,
        "Full DINOv2 ViT-L/14-reg4 (hub dinov2_vitl14_reg, 24 blocks).",
        72,
        TOKEN_SUBSET,
        with_mask=False,
    )


COMPONENTS = {
    "flow_scheduler__official": scheduler_official,
    "sort_block__r64": sort_block_r64,
    "extract_tokens__b2": extract_tokens_b2,
    "dense_glue__r64": dense_glue_r64,
    "dense_vae_decode__fp32_r8": dense_vae_decode_fp32_r8,
    "dense_vae_encode__fp32_r32": dense_vae_encode_fp32_r32,
    "dense_vae_decode__official": dense_vae_decode_official,
    "dense_dit_t_embedder__fp32": dense_dit_t_embedder_fp32,
    "dense_dit__b2_fp32": dense_dit_b2_fp32,
    "dense_dit__b2_fp16": dense_dit_b2_fp16,
    "preprocess_image__rgba": preprocess_image_rgba,
    "dinov2__depth2": dinov2_depth2,
    "dinov2__official": dinov2_official,
}
