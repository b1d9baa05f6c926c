"""Benchmark the coarse stage: ours vs. the original Direct3D-S2, same deterministic weights, same inputs.

Times and peak GPU memory of (1) DINOv2 encode of one 518² image, (2) dense sampling (50 Euler steps, CFG 7,
two DiT forwards per step as the original), (3) dense decode → block-sorted 64³ index; and the same three
for the original code imported from `--upstream` (a DreamTechAI/Direct3D-S2 checkout) with DINOv2 built from
`--dinov2` (a facebookresearch/dinov2 checkout; no download). Both sides use fp16 DiT/VAE and fp32 DINOv2, as
released; noise comes from the same seeded generator, so the two indices should agree (their IoU is printed).

    python bench/bench_coarse.py --upstream ../upstream/Direct3D-S2 --dinov2 ../upstream/dinov2   # GPU
    python bench/bench_coarse.py --tiny --steps 2                                                # CPU smoke run

Writes `bench/results/<date>-<device>-coarse.md` (or `--out`). Stand-ins used for the original, only where a
package is missing, are listed in the results: `torchvision` (tools/golden/harness.py shim; at 518² its
transforms are identities + Normalize), import-only placeholders (torchsparse, udf_ext, utils3d, pymeshfix,
igraph, pyvista, skimage, omegaconf, transformers, trimesh, huggingface_hub; never called on the dense
path), `tqdm` (pass-through),
`diffusers` (FlowMatchEulerDiscreteScheduler re-stated from s2core.flow_sampler, bit-exact per the tests).
The original's dense attention uses flash-attn when installed (its default), else its own `sdpa` backend.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.machinery
import os
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from s2core.config import ReleaseConfig, official_v1_1, tiny_release  # noqa: E402
from s2core.dense_dit import DenseDiT  # noqa: E402
from s2core.dense_vae import DenseVAE  # noqa: E402
from s2core.dinov2 import ImageConditioner  # noqa: E402
from s2core.flow_sampler import flow_schedule, make_noise, sample_flow, seeded_generator  # noqa: E402
from s2core.image import preprocess_image  # noqa: E402
from s2core.structure import decode_occupancy, encode_pixels  # noqa: E402
from s2core.testing import deterministic_state_dict  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, repeats=1):
    """(result, best seconds, peak bytes above the memory in use before the call)."""
    best, peak, out = float("inf"), 0, None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated(device) - base)
    return out, best, peak


def test_image(size=640):
    """A deterministic RGBA-like input: a shaded ellipsoid on a transparent background ([1, H, W, 3] + mask)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    r2 = (x / 0.6) ** 2 + (y / 0.8) ** 2
    mask = (r2 < 1).float()
    shade = (1 - r2).clamp(min=0).sqrt()
    rgb = torch.stack([0.2 + 0.7 * shade, 0.3 + 0.4 * shade, 0.6 * shade], -1) * mask[..., None] + (1 - mask[..., None])
    return rgb[None], mask[None]


# ---------------------------------------------------------------------------------------------
# ours


def build_ours(cfg: ReleaseConfig, device, seed=0):
    enc = ImageConditioner(cfg.dense_image_encoder)
    with torch.device("meta"):
        dit = DenseDiT(cfg.dense_dit)
        vae = DenseVAE(cfg.dense_vae)
    enc.load_backbone(deterministic_state_dict(enc.model, seed))
    dit.load_state_dict(deterministic_state_dict(dit, seed), strict=True, assign=True)
    vae.load_state_dict(deterministic_state_dict(vae, seed), strict=True, assign=True)
    return enc.eval().to(device), dit.eval().to(device), vae.eval().to(device)


def sample_dense(dit, cond, shift, steps, guidance, seed, device, latent_dtype, batch_cfg=False):
    """The dense sampler as `pipeline.sample_dense` runs it for one image (noise from a generator seeded `seed`
    on the device), with the sampler's batched-CFG option exposed to time it."""
    noise = make_noise(
        (cond.shape[0], dit.cfg.in_channels, *[dit.cfg.resolution] * 3),
        seeded_generator(seed, device),
        latent_dtype,
        device,
    )
    with torch.no_grad():
        return sample_flow(
            dit,
            noise,
            cond,
            torch.zeros_like(cond),
            num_steps=steps,
            shift=shift,
            guidance=guidance,
            batch_cfg=batch_cfg,
        )


def run_ours(cfg, enc, dit, vae, pixels, steps, guidance, seed, device, repeats, latent_dtype):
    rows = {}
    (cond, _), rows["encode"], m1 = measure(lambda: encode_pixels(enc, pixels), device, repeats)
    shift = cfg.dense_scheduler.shift
    latent, rows["sample"], m2 = measure(
        lambda: sample_dense(dit, cond, shift, steps, guidance, seed, device, latent_dtype), device, repeats
    )
    rows["latent"] = latent
    coords, rows["decode"], m3 = measure(lambda: decode_occupancy(vae, latent), device, repeats)
    latent_b, rows["sample_batched"], m4 = measure(
        lambda: sample_dense(dit, cond, shift, steps, guidance, seed, device, latent_dtype, batch_cfg=True),
        device,
        repeats,
    )
    rows["batched_max_diff"] = (latent_b.float() - latent.float()).abs().max().item()
    return coords, rows, {"encode": m1, "sample": m2, "decode": m3, "sample_batched": m4}


# ---------------------------------------------------------------------------------------------
# the original


def _stub(name, **attrs):
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


class _Placeholder(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def _raise(*a, **k):
            raise RuntimeError(f"{self.__name__}.{attr} is an import-only placeholder in bench_coarse.py")

        return _raise


class _CopyingCpu(torch.Tensor):
    def cpu(self, *a, **k):
        return torch.Tensor.clone(self).as_subclass(torch.Tensor)


class _EulerStandIn:
    """diffusers FlowMatchEulerDiscreteScheduler's inference surface, from s2core's bit-exact schedule."""

    def __init__(self, num_train_timesteps=1000, shift=1.0):
        self.n, self.shift = num_train_timesteps, shift

    def set_timesteps(self, steps, device=None):
        s = flow_schedule(steps, self.shift, self.n).to(device or "cpu")
        self.timesteps, self.sigmas, self._i = s.timesteps, s.sigmas, 0

    def step(self, model_output, timestep, sample, **_):
        dt = self.sigmas[self._i + 1] - self.sigmas[self._i]
        self._i += 1
        return types.SimpleNamespace(prev_sample=(sample.float() + dt * model_output).to(model_output.dtype))


def install_original(upstream: Path, dinov2: Path | None, stand_ins: list[str]):
    """Import what the original's dense path needs, with stand-ins only for packages that are missing."""
    try:
        import flash_attn  # noqa: F401

        os.environ.setdefault("ATTN_BACKEND", "flash_attn")
    except Exception:
        os.environ["ATTN_BACKEND"] = "sdpa"
        stand_ins.append("ATTN_BACKEND=sdpa (flash_attn not installed; the original's own SDPA backend)")
    sys.path.insert(0, str(upstream))
    if dinov2 is not None:
        sys.path.insert(0, str(dinov2))
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        sys.path.insert(0, str(REPO / "tools" / "golden"))
        import harness

        sys.modules.update(harness._make_torchvision())
        stand_ins.append("torchvision: tools/golden/harness.py shim (518² → Resize/CenterCrop identities + Normalize)")
    for name in (
        "torchsparse",
        "udf_ext",
        "utils3d",
        "pymeshfix",
        "igraph",
        "pyvista",
        "skimage",
        "omegaconf",
        "transformers",
        "trimesh",
        "huggingface_hub",
    ):
        try:
            importlib.import_module(name)
        except Exception:
            sys.modules[name] = _Placeholder(name)
            sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
            if name == "torchsparse":
                sys.modules["torchsparse.utils"] = _stub("torchsparse.utils", make_ntuple=lambda *a, **k: None)
            if name == "skimage":
                sys.modules["skimage.measure"] = _Placeholder("skimage.measure")
            stand_ins.append(f"{name}: import-only placeholder")
    try:
        import tqdm  # noqa: F401
    except Exception:
        sys.modules["tqdm"] = _stub("tqdm", tqdm=lambda it, **k: it)
        stand_ins.append("tqdm: pass-through")
    try:
        from diffusers import FlowMatchEulerDiscreteScheduler as Sched
    except Exception:
        Sched = _EulerStandIn
        stand_ins.append("diffusers: FlowMatchEulerDiscreteScheduler stand-in from s2core.flow_sampler (bit-exact)")
    return Sched


def _dino_builder(cfg, dinov2: Path | None, tiny: bool, real_hub_load):
    def build(*a, **k):
        if not tiny:  # the real torch.hub.load: this builder replaces it while DinoEncoder is built
            return real_hub_load(str(dinov2), "dinov2_vitl14_reg", source="local", pretrained=False)
        from functools import partial

        from dinov2.layers import MemEffAttention
        from dinov2.layers import NestedTensorBlock as Block
        from dinov2.models.vision_transformer import DinoVisionTransformer

        e = cfg.dense_image_encoder
        return DinoVisionTransformer(
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

    return build


def run_original(cfg, args, pixels, device, stand_ins):
    Sched = install_original(Path(args.upstream), Path(args.dinov2) if args.dinov2 else None, stand_ins)
    from direct3d_s2.models.autoencoders.dense_vae import DenseShapeVAE
    from direct3d_s2.models.conditioner import DinoEncoder
    from direct3d_s2.models.transformers.dense_dit import DenseDiT as OrigDiT
    from direct3d_s2.pipeline import Direct3DS2Pipeline
    from direct3d_s2.utils.sparse import sort_block as _orig_sort_block

    def orig_sort_block(index, block_size):
        if index.device.type != "cpu":
            return _orig_sort_block(index, block_size)
        # On CPU `.cpu()` aliases and the original overwrites its input (SPEC.md §9.1); give it CUDA's copy.
        return _orig_sort_block(index.as_subclass(_CopyingCpu), block_size).as_subclass(torch.Tensor)

    if device.type == "cpu":
        stand_ins.append("sort_block on CPU called with a copying .cpu() (CUDA semantics)")

    def params(c):  # our config fields are the original constructor's arguments
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(c).items()}

    real_hub = torch.hub.load
    torch.hub.load = _dino_builder(cfg, Path(args.dinov2) if args.dinov2 else None, args.tiny, real_hub)
    try:
        e = cfg.dense_image_encoder
        enc = DinoEncoder(model=e.model, version=e.version, size=e.size)
    finally:
        torch.hub.load = real_hub
    enc.encoder.load_state_dict(deterministic_state_dict(enc.encoder, args.seed), strict=True)
    dit = OrigDiT(**params(cfg.dense_dit))
    dit.load_state_dict(deterministic_state_dict(dit, args.seed), strict=True)
    vae = DenseShapeVAE(**params(cfg.dense_vae))
    vae.load_state_dict(deterministic_state_dict(vae, args.seed), strict=True)
    enc, dit, vae = enc.eval().to(device), dit.eval().to(device), vae.eval().to(device)
    sched = Sched(num_train_timesteps=cfg.dense_scheduler.num_train_timesteps, shift=cfg.dense_scheduler.shift)
    pipe = Direct3DS2Pipeline(vae, dit, None, None, None, None, None, None, enc, None, sched, None, None)
    pipe.device = device
    image = pixels.to(device)
    rows, mem = {}, {}
    with torch.no_grad():
        _, rows["encode"], mem["encode"] = measure(lambda: pipe.encode_image(image, enc, True), device, args.repeats)

        def stage():
            idx = pipe.inference(
                image,
                vae,
                dit,
                enc,
                sched,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                generator=seeded_generator(args.seed, device),
                mode="dense",
                mc_threshold=0.1,
            )[0]
            return orig_sort_block(idx, cfg.sparse_dit_512.selection_block_size)

        seen = {}
        hook = vae.decoder.register_forward_pre_hook(lambda m, a: seen.update(latent=a[0]))
        index, total, mem["sample"] = measure(stage, device, args.repeats)
        hook.remove()
        rows["latent"] = seen["latent"]
        latent = torch.randn(1, *cfg.dense_dit.latent_shape, dtype=torch.float16, device=device)
        _, rows["decode"], mem["decode"] = measure(
            lambda: orig_sort_block(vae.decode_mesh(latent, mc_threshold=0.1, return_index=True)[0], 8),
            device,
            args.repeats,
        )
    rows["sample"] = total - rows["encode"] - rows["decode"]  # inference() = encode + sampling + decode
    return index, rows, mem


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random config on CPU (crash test)")
    ap.add_argument("--upstream", help="DreamTechAI/Direct3D-S2 checkout: also time the original")
    ap.add_argument("--dinov2", help="facebookresearch/dinov2 checkout (the original's DINOv2, no download)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="keep the best of N runs of each stage (the first warms up)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="results file (default bench/results/<date>-<device>-coarse.md)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cfg = tiny_release() if args.tiny else official_v1_1()
    if args.tiny:
        cfg = replace(
            cfg, dense_dit=replace(cfg.dense_dit, use_fp16=True), dense_vae=replace(cfg.dense_vae, use_fp16=True)
        )
    rgb, mask = test_image()
    pixels = preprocess_image(rgb, mask, size=cfg.dense_image_encoder.size)

    enc, dit, vae = build_ours(cfg, device, args.seed)
    weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    coords, ours, ours_mem = run_ours(
        cfg, enc, dit, vae, pixels, args.steps, args.guidance, args.seed, device, args.repeats, torch.float16
    )
    del enc, dit, vae
    if device.type == "cuda":
        torch.cuda.empty_cache()

    orig = orig_mem = None
    stand_ins: list[str] = []
    iou = latent_diff = None
    if args.upstream:
        index, orig, orig_mem = run_original(cfg, args, pixels, device, stand_ins)
        a = {tuple(r) for r in coords.tolist()}
        b = {tuple(r) for r in index.int().tolist()}
        iou = len(a & b) / max(1, len(a | b))
        la, lb = ours["latent"].float(), orig["latent"].float()
        latent_diff = ((la - lb).norm() / lb.norm()).item()

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        f"# Coarse stage benchmark ({'tiny config' if args.tiny else 'official v1.1 config'})",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- device: {dev_name}; torch {torch.__version__}",
        f"- command: `python bench/bench_coarse.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- {args.steps} steps, CFG {args.guidance}, seed {args.seed}; DiT/VAE fp16, DINOv2 fp32; best of {args.repeats}",
        f"- our weights resident on the device: {weights / 2**20:.0f} MiB",
        "",
        "| stage | ours (s) | ours peak above weights (MiB) | original (s) | original peak above weights (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, label in (
        ("encode", "DINOv2 encode"),
        ("sample", f"dense sampling ({args.steps} steps, CFG)"),
        ("decode", "dense decode → sorted index"),
    ):
        o = f"{orig[k]:.3f}" if orig else "—"
        om = f"{orig_mem[k] / 2**20:.0f}" if orig_mem else "—"
        lines.append(f"| {label} | {ours[k]:.3f} | {ours_mem[k] / 2**20:.0f} | {o} | {om} |")
    lines.append(
        f"| dense sampling, cond+uncond batched (ours only) | {ours['sample_batched']:.3f} | "
        f"{ours_mem['sample_batched'] / 2**20:.0f} | — | — |"
    )
    lines += ["", f"- batched CFG latent vs two-forward latent: max |diff| {ours['batched_max_diff']:.2e}"]
    lines += [
        f"- our index: {len(coords)} voxels"
        + (f"; IoU with the original's index: {iou:.4f}" if iou is not None else "")
    ]
    if orig:
        lines.append(
            f"- sampled latent, ours vs original: relative RMS difference {latent_diff:.2e} "
            "(same noise; differences are attention/GEMM kernel rounding amplified over the steps)"
        )
        lines.append("- original 'sampling' = inference(mode='dense') total − encode − decode (it runs all three)")
    if stand_ins:
        lines += ["- stand-ins for the original: " + "; ".join(stand_ins)]
    text = "\n".join(lines) + "\n"
    print(text)
    out = (
        Path(args.out)
        if args.out
        else REPO
        / "bench"
        / "results"
        / (f"{datetime.date.today()}-{dev_name.replace(' ', '_')}-coarse{'-tiny' if args.tiny else ''}.md")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return text


if __name__ == "__main__":
    main()
