"""End-to-end 1024³ timing of the ORIGINAL Direct3D-S2 pipeline, stage by stage, on the structure bench/e2e.py uses.

The original (DreamTechAI/Direct3D-S2, imported from --upstream at run time; nothing of it is in this repo) runs
with the released config (config.json next to its direct3d_s2 package, i.e. tests/data/upstream/config.json copied
into .scratch: fp16 networks, fp32 DINOv2 x2, every model resident on the device as the original keeps them), the official step counts and guidance (dense 50, 512: 30, 1024: 15,
CFG 7) and deterministic random weights: `s2core.testing.deterministic_tensor` under the original modules' own
parameter names with the seeds bench/e2e.py gives our networks (seed*100 + the part's index in
s2core.loading.PARTS), so both pipelines hold identical values. The 1024 sign refiner's conv_out is pinned to
"outside" exactly as bench/e2e.py pins ours (weight * 0.01, bias 1), so both mesh a surface of the same size.

What runs is the original's own code: `Direct3DS2Pipeline.prepare_image`, `inference()` (its encode, its DiT
sampling loop with CFG, its VAE decode_mesh, its refiner `run()` with scikit-image marching cubes on the CPU),
`sort_block`, `normalize_mesh` and `mesh2index`, called in the order of its `__call__`. Only the structures are
swapped, as bench/e2e.py does for ours (random-weight decodes are meaningless): the 512 stage gets the bumpy
icosphere's 512 index (s2core's voxelizer, the index our run uses, then the original's sort_block) instead of
the dense decode's, and the 1024 stage voxelizes the icosphere itself (the original's mesh2index) instead of
the 512 stage's mesh. Stage boundaries inside `inference()` are taken by thin wrappers around the pipeline's
encode_image, the VAEs' decode_mesh and the refiners' run (a synchronize and a clock read; nothing else).

Stand-ins (listed in the JSON with why; tools/golden/standins_gpu.py): torchsparse and flash_attn (adapters over
our sparse conv and SDPA), udf_ext (the CUDA voxelizer, re-stated in PyTorch), the original's own `sdpa`
attention backend for the dense side (ATTN_BACKEND=sdpa, flash-attn is not installed), and import-only
placeholders / a scheduler stand-in for packages the GPU machine lacks.

    python bench/e2e_original.py --upstream .scratch --json /tmp/orig.json [--warm]     # GPU
    TRITON_INTERPRET=1 python bench/e2e_original.py --cpu-smoke --upstream .scratch     # CPU smoke (see --help)

`python bench/e2e.py --original .scratch` runs this in a subprocess after our chain and writes the combined table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the original's progress bars would fill the log
if "--cpu-smoke" in sys.argv:  # before triton is imported: the original's SSA kernels on CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tools" / "golden", REPO / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from s2core.testing import deterministic_tensor  # noqa: E402

GiB = 2**30
CONFIG = REPO / "tests" / "data" / "upstream" / "config.json"  # the release's config, kept in the repository
STEPS = {"dense": 50, "sparse512": 30, "sparse1024": 15}
GUIDANCE = 7.0
SMOKE_TOKENS = 96  # --cpu-smoke: sparse structures cropped to this many rows (whole 8³ blocks first)
MC_THRESHOLD = 0.2  # the original __call__'s default; its dense stage uses 0.1
# bench/e2e.py seeds our networks with seed * 100 + index in s2core.loading.PARTS; same here, same names
PART_INDEX = {
    "dense_image_encoder": 0,
    "sparse_image_encoder": 0,
    "dense_vae": 1,
    "dense_dit": 2,
    "sparse_vae_512": 3,
    "sparse_dit_512": 4,
    "refiner": 5,
    "sparse_vae_1024": 6,
    "sparse_dit_1024": 7,
    "refiner_1024": 8,
}
NETWORKS = (
    "dense_vae",
    "dense_dit",
    "sparse_vae_512",
    "sparse_dit_512",
    "sparse_vae_1024",
    "sparse_dit_1024",
    "refiner",
    "refiner_1024",
    "dense_image_encoder",
    "sparse_image_encoder",
)


def release_config(upstream: Path, given: str | None) -> tuple[dict, Path]:
    """The released v1.1 config.json ({component: {target, params}}): --config, <upstream>/config.json (copy it
    into .scratch so it travels to the GPU machine), or the repository's tests/data/upstream/config.json."""
    candidates = [Path(given)] if given else [upstream / "config.json", CONFIG]
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text()), path
    sys.exit(
        f"The released config.json is not at {', '.join(map(str, candidates))}; copy "
        f"tests/data/upstream/config.json (the v1.1 release's config.yaml as JSON) to {upstream / 'config.json'}."
    )


def smoke_config(cfg: dict) -> dict:
    """The released config with every size from s2core's tiny config (CPU smoke); refiners stay full size
    (their run() hard-codes 512/1024 grids, so the smoke run does not call it)."""
    import dataclasses

    from s2core.config import tiny_release

    tiny = tiny_release()
    out = json.loads(json.dumps(cfg))
    for key, entry in out.items():
        t = getattr(tiny, key, None)
        if t is None or key.startswith("refiner") or "params" not in entry or not dataclasses.is_dataclass(t):
            continue
        for k in entry["params"]:
            if hasattr(t, k):
                v = getattr(t, k)
                entry["params"][k] = list(v) if isinstance(v, tuple) else v
        if "use_fp16" in entry["params"]:
            entry["params"]["use_fp16"] = True  # as released; SSA's Triton kernels need fp16
        if key.startswith("sparse_vae"):
            entry["params"]["model_channels_encoder"] = 512  # the unused encoder needs //16 % 32 == 0
    for key in ("dense_image_encoder", "sparse_image_encoder"):
        out[key]["tiny"] = dataclasses.asdict(tiny.dense_image_encoder)
    return out


class Laps:
    """Consecutive stages: lap(name) closes the stage that began at the previous lap/start (wall time after a
    synchronize, peak allocated/reserved since then), prints it at once and opens the next."""

    def __init__(self, device: torch.device, on_row=None):
        self.cuda = device.type == "cuda"
        self.rows: list[list] = []
        self.on_row = on_row
        self.start()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def start(self):
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.t = time.perf_counter()

    def lap(self, name: str, note: str = ""):
        self.sync()
        dt = time.perf_counter() - self.t
        alloc = torch.cuda.max_memory_allocated() / GiB if self.cuda else float("nan")
        res = torch.cuda.max_memory_reserved() / GiB if self.cuda else float("nan")
        self.rows.append([name, dt, alloc, res, note])
        print(f"{name:32s} {dt:8.2f} s  peak {alloc:6.2f} GiB alloc  {res:6.2f} GiB reserved  {note}", flush=True)
        if self.on_row:
            self.on_row(self.rows)
        self.start()


# ---------------------------------------------------------------------------------------------
# the original, its stand-ins and its networks


def install(upstream: Path, cpu: bool) -> tuple[list[str], type]:
    import standins_gpu

    os.environ.setdefault("XFORMERS_DISABLED", "1")  # DINOv2 hub source: plain PyTorch layers
    notes = []
    try:
        import flash_attn  # noqa: F401

        real_fa = True
    except Exception:
        real_fa = False
    used = standins_gpu.install_standins(upstream)
    if "flash_attn" in used and not cpu:
        standins_gpu.PREFER_TORCH_FLASH = True  # flash-attn 2's own kernel, as PyTorch ships it
        used["flash_attn (kernel)"] = standins_gpu.TORCH_FLASH_NOTE
    if not real_fa:
        os.environ["ATTN_BACKEND"] = "sdpa"  # dense side only: SPARSE_ATTN_BACKEND is set to flash_attn above
        notes.append(
            "dense attention (DINOv2 aside): ATTN_BACKEND=sdpa, the original's own torch SDPA backend "
            "(flash-attn not installed); the sparse side stays on the flash_attn stand-in"
        )
    more, sched = standins_gpu.install_pipeline_standins()
    used.update(more)
    notes = [f"{k}: {v}" for k, v in used.items()] + notes
    if cpu:
        notes += cpu_patches()
    return notes, sched


def cpu_patches() -> list[str]:
    """CPU-only run-time fixes of the original's CUDA literals (ORIGINAL_ON_CPU.md); the GPU run has none."""
    import importlib

    import harness

    ca = importlib.import_module(
        "direct3d_s2.modules.sparse.attention.spatial_sparse_attention.ops.compressed_attention"
    )
    ca.torch = harness._CudaLiteralsOnCpu("torch")
    su = importlib.import_module("direct3d_s2.utils.sparse")
    original = su.sort_block

    class CopyingCpu(torch.Tensor):
        def cpu(self, *a, **k):
            return torch.Tensor.clone(self).as_subclass(torch.Tensor)

    def sort_block(index, block_size):
        return original(index.as_subclass(CopyingCpu), block_size).as_subclass(torch.Tensor)

    for name in ("direct3d_s2.utils.sparse", "direct3d_s2.utils", "direct3d_s2.pipeline"):
        if hasattr(sys.modules.get(name), "sort_block"):
            sys.modules[name].sort_block = sort_block
    return [
        "CPU smoke only: compressed_attention's torch.zeros(device='cuda') built on the CPU and int histc as "
        "bincount (tools/golden/harness.py); sort_block given a copying .cpu() (CUDA semantics); refiners' "
        "run() not called (hard-coded 512/1024 grids); mesh2index's .cuda()/is_cuda bypassed"
    ]


def _import(target: str):
    import importlib

    module, name = target.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def deterministic_weights(module: torch.nn.Module, seed: int, device, workers: int) -> dict[str, torch.Tensor]:
    """s2core.testing.deterministic_state_dict(module, seed), drawn on `workers` CPU threads, moved to `device`."""
    specs = [(k, tuple(v.shape), v.dtype) for k, v in module.state_dict().items()]

    def one(spec):
        name, shape, dtype = spec
        return deterministic_tensor(name, shape, dtype, seed).to(device)

    with ThreadPoolExecutor(workers) as pool:
        return dict(zip([s[0] for s in specs], pool.map(one, specs)))


def build_dino(entry: dict, dinov2: Path | None):
    """The original's DinoEncoder, its torch.hub.load served from a local dinov2 checkout without weights."""
    real = torch.hub.load
    tiny = entry.get("tiny")

    def load(repo, version, *a, **k):
        if tiny is None:
            if dinov2 is None:
                raise RuntimeError(
                    "DINOv2 needs a facebookresearch/dinov2 checkout: pass --dinov2 (none was found "
                    "next to --upstream)."
                )
            return real(str(dinov2), version, source="local", pretrained=False)
        from functools import partial

        if dinov2 is not None and str(dinov2) not in sys.path:
            sys.path.insert(0, str(dinov2))
        from dinov2.layers import MemEffAttention, NestedTensorBlock
        from dinov2.models.vision_transformer import DinoVisionTransformer

        return DinoVisionTransformer(
            img_size=tiny["pretrain_img_size"],
            patch_size=tiny["patch_size"],
            embed_dim=tiny["embed_dim"],
            depth=tiny["depth"],
            num_heads=tiny["num_heads"],
            mlp_ratio=tiny["mlp_ratio"],
            block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention),
            num_register_tokens=tiny["num_register_tokens"],
            init_values=1.0,
            ffn_layer="mlp",
            block_chunks=0,
            interpolate_antialias=True,
            interpolate_offset=0.0,
        )

    torch.hub.load = load
    try:
        params = entry["params"] if tiny is None else {**entry["params"], "size": tiny["size"]}
        return _import(entry["target"])(**params)
    finally:
        torch.hub.load = real


def build_pipeline(cfg: dict, device, dinov2: Path | None, sched_cls, seed: int, workers: int):
    """The original Direct3DS2Pipeline, every network built on `device` with deterministic weights."""
    from direct3d_s2.pipeline import Direct3DS2Pipeline

    nets = {}
    for key in NETWORKS:
        entry = cfg[key]
        with torch.device(device):  # built where it runs: no CPU init of 2.7 B parameters
            if key.endswith("image_encoder"):
                m = build_dino(entry, dinov2)
                target = m.encoder  # the hub model's own keys, as bench/e2e.py draws ours
            else:
                m = target = _import(entry["target"])(**entry["params"])
        sd = deterministic_weights(target, seed * 100 + PART_INDEX[key], device, workers)
        if key == "refiner_1024":  # pinned to "outside", exactly as bench/e2e.py pins ours
            sd["conv_out.weight"].mul_(0.01)
            sd["conv_out.bias"].fill_(1.0)
        target.load_state_dict(sd, strict=True)
        del sd
        nets[key] = m.to(device).eval().requires_grad_(False)  # .to: any buffer a constructor made on the CPU
    scheds = {
        k: sched_cls(**cfg[k]["params"]) for k in ("dense_scheduler", "sparse_scheduler_512", "sparse_scheduler_1024")
    }
    pipe = Direct3DS2Pipeline(**nets, **scheds, dtype=torch.float16)
    pipe.device = torch.device(device)  # what pipe.to() sets; everything is already there
    return pipe


# ---------------------------------------------------------------------------------------------
# the chain


def test_image():
    """bench/e2e.py's picture (a shaded disk on white, 256²) as the RGBA PIL image the original takes."""
    import numpy as np
    from PIL import Image

    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 256), torch.linspace(-1, 1, 256), indexing="ij")
    disk = (xx**2 + yy**2 < 0.6).float()
    rgba = torch.stack([0.8 * disk, 0.3 + 0.2 * yy, 0.5 * disk, disk], -1)
    return Image.fromarray((rgba.clamp(0, 1).numpy() * 255).round().astype(np.uint8), "RGBA")


class Wrappers:
    """Stage boundaries inside the original's inference(): a clock read at the entry of encode_image, decode_mesh
    and refiner.run (after a synchronize); the wrapped calls run unchanged."""

    def __init__(self, pipe, laps: Laps, smoke: bool):
        import direct3d_s2.models.refiner.unet_refiner as ur

        self.laps, self.stage, self.sub = laps, None, {}
        self.steps = {k: 1 for k in STEPS} if smoke else STEPS
        real_encode = pipe.encode_image

        def encode_image(*a, **k):
            if self.stage == "dense":
                out = real_encode(*a, **k)
                self.laps.lap("image encode", "incl. the original's PIL preprocessing (prepare_image)")
                return out
            self.laps.sync()
            t = time.perf_counter()
            out = real_encode(*a, **k)
            self.laps.sync()
            self.sub["encode"] = time.perf_counter() - t
            return out

        pipe.encode_image = encode_image
        for vae, name in ((pipe.dense_vae, "dense"), (pipe.sparse_vae_512, "512"), (pipe.sparse_vae_1024, "1024")):
            self._wrap_decode(vae, name)
        for ref in (pipe.refiner, pipe.refiner_1024):
            self._wrap_run(ref, smoke)
        real_mc = ur.measure.marching_cubes

        def marching_cubes(volume, *a, **k):
            t = time.perf_counter()
            try:
                out = real_mc(volume, *a, **k)
            except ValueError as e:
                # A random refiner's field may never reach the level: scikit-image raises (it checks the range
                # first, so little work is lost). Our pipeline returns an empty mesh there; so does this run.
                if "level" not in str(e):
                    raise
                import numpy as np

                self.sub["mc_note"] = f"field never reaches the level {k.get('level')}: empty mesh (as ours)"
                print("  marching cubes:", self.sub["mc_note"], flush=True)
                out = (
                    np.zeros((0, 3), np.float32),
                    np.zeros((0, 3), np.int64),
                    np.zeros((0, 3), np.float32),
                    np.zeros((0,), np.float32),
                )
            self.sub["mc"] = self.sub.get("mc", 0.0) + time.perf_counter() - t
            return out

        ur.measure = types.SimpleNamespace(marching_cubes=marching_cubes)  # the refiners' `measure` only
        udf = sys.modules["udf_ext"]  # mesh2index calls udf_ext.compute_valid_udf through the module
        real_udf = udf.compute_valid_udf

        def compute_valid_udf(*a, **k):
            self.laps.sync()
            t = time.perf_counter()
            real_udf(*a, **k)
            self.laps.sync()
            self.sub["udf"] = time.perf_counter() - t

        udf.compute_valid_udf = compute_valid_udf

    def _wrap_decode(self, vae, name):
        real = vae.decode_mesh

        def decode_mesh(*a, **k):
            if name == "dense":
                self.laps.lap("dense sampling", f"{self.steps['dense']} steps x 2 forwards (CFG)")
            else:
                n = len(k["latents"].coords) if "latents" in k else len(a[0].coords)
                self.laps.lap(
                    f"sparse-{name} sampling",
                    f"{n} tokens; incl. the original's image re-encode ({self.sub.pop('encode', 0.0):.2f} s)",
                )
            self.sub["decode_start"] = time.perf_counter()
            return real(*a, **k)

        vae.decode_mesh = decode_mesh

    def _wrap_run(self, refiner, smoke: bool):
        real = refiner.run

        def run(reconst_x, feat=None, mc_threshold=0):
            self.laps.sync()
            self.sub["vae"] = time.perf_counter() - self.sub.pop("decode_start", time.perf_counter())
            self.sub["voxels"] = len(reconst_x.coords)
            if smoke:  # the hard-coded 512³/1024³ grids do not fit a CPU smoke run: check the inputs only
                assert reconst_x.feats.shape[1] == 1 and (feat is None or len(feat.feats) == len(reconst_x.feats))
                if hasattr(refiner, "downsample"):  # the sign refiner's first sparse op (on the stand-ins)
                    down = refiner.downsample(reconst_x)
                    assert 0 < len(down.coords) <= len(reconst_x.coords)
                import trimesh

                return [trimesh.creation.icosphere(subdivisions=1)]
            return real(reconst_x, feat, mc_threshold=mc_threshold)

        refiner.run = run

    def decode_note(self) -> str:
        s, self.sub = self.sub, {}
        return (
            f"VAE {s.get('vae', math.nan):.2f} s ({s.get('voxels', 0)} voxels), then refiner incl. marching "
            f"cubes {s.get('mc', math.nan):.2f} s (CPU)" + (f"; {s['mc_note']}" if "mc_note" in s else "")
        )


def run_chain(
    pipe, cfg: dict, v, f, idx512: torch.Tensor, device, laps: Laps, w: Wrappers, smoke: bool, seed: int
) -> dict:
    import trimesh
    from direct3d_s2.utils.mesh import mesh2index, normalize_mesh

    def sort_block(index, block_size):  # looked up at call time: the CPU smoke patches the module attribute
        return sys.modules["direct3d_s2.pipeline"].sort_block(index, block_size)

    steps = w.steps
    gen = torch.Generator(device=device).manual_seed(seed)
    info = {}
    image_in = test_image()
    bs512 = cfg["sparse_dit_512"]["params"]["selection_block_size"]
    bs1024 = cfg["sparse_dit_1024"]["params"]["selection_block_size"]
    res1024 = cfg["sparse_dit_1024"]["params"]["resolution"] * 8

    laps.start()
    w.stage = "dense"
    image = pipe.prepare_image(image_in)
    dense = pipe.inference(
        image,
        pipe.dense_vae,
        pipe.dense_dit,
        pipe.dense_image_encoder,
        pipe.dense_scheduler,
        generator=gen,
        mode="dense",
        mc_threshold=0.1,
        num_inference_steps=steps["dense"],
        guidance_scale=GUIDANCE,
    )[0]
    dense = sort_block(dense, bs512)
    info["dense_decode_cells"] = len(dense)
    laps.lap("dense decode", f"{len(dense)} cells (discarded: the 512 stage gets the mesh's index)")
    del dense
    torch.cuda.empty_cache()  # as __call__ does here

    w.stage = "sparse512"
    latent_index = sort_block(idx512.to(device), bs512)  # untimed, as bench/e2e.py's make_structure for ours
    if smoke:
        latent_index = latent_index[:SMOKE_TOKENS]  # a slab of blocks: SSA under the Triton interpreter is slow
    info["tokens_512"] = len(latent_index)
    laps.start()
    mesh = pipe.inference(
        image,
        pipe.sparse_vae_512,
        pipe.sparse_dit_512,
        pipe.sparse_image_encoder,
        pipe.sparse_scheduler_512,
        generator=gen,
        mode="sparse512",
        mc_threshold=MC_THRESHOLD,
        latent_index=latent_index,
        remove_interior=True,
        num_inference_steps=steps["sparse512"],
        guidance_scale=GUIDANCE,
    )[0]
    info["faces_512"] = int(len(mesh.faces))
    laps.lap("sparse-512 decode + refiner", w.decode_note() + f"; {info['faces_512']} faces")

    w.stage = "sparse1024"
    real = trimesh.Trimesh(v.double().numpy(), f.numpy(), process=False)  # the real shape, not the 512 mesh
    laps.start()
    del latent_index, mesh
    torch.cuda.empty_cache()  # as __call__ does here
    real = normalize_mesh(real)
    with _cuda_literals_on_cpu(device):
        latent_index = mesh2index(real, size=res1024, factor=8)
    latent_index = sort_block(latent_index, bs1024)
    if smoke:
        latent_index = latent_index[:SMOKE_TOKENS]
    info["tokens_1024"] = len(latent_index)
    laps.lap(
        "mesh -> 1024 structure",
        f"{len(latent_index)} tokens; of which udf_ext stand-in "
        f"{w.sub.pop('udf', math.nan):.2f} s (the CUDA extension: 0.2 s for the whole stage in PERF.md)",
    )
    mesh = pipe.inference(
        image,
        pipe.sparse_vae_1024,
        pipe.sparse_dit_1024,
        pipe.sparse_image_encoder,
        pipe.sparse_scheduler_1024,
        generator=gen,
        mode="sparse1024",
        mc_threshold=MC_THRESHOLD,
        latent_index=latent_index,
        remove_interior=True,
        num_inference_steps=steps["sparse1024"],
        guidance_scale=GUIDANCE,
    )[0]
    info["faces_1024"] = int(len(mesh.faces))
    laps.lap("sparse-1024 decode + refiner", w.decode_note() + f"; {info['faces_1024']} faces")
    return info


class _cuda_literals_on_cpu:
    """CPU smoke only: mesh2index's `.cuda()` and compute_valid_udf's is_cuda check see a CUDA device."""

    def __init__(self, device):
        self.active = torch.device(device).type == "cpu"

    def __enter__(self):
        if self.active:
            self.saved = torch.Tensor.cuda, torch.Tensor.is_cuda
            torch.Tensor.cuda = lambda self, *a, **k: self
            torch.Tensor.is_cuda = property(lambda self: True)

    def __exit__(self, *exc):
        if self.active:
            torch.Tensor.cuda, torch.Tensor.is_cuda = self.saved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--upstream",
        default=str(REPO / ".scratch"),
        help="folder holding the original's direct3d_s2 package (a checkout, or .scratch)",
    )
    ap.add_argument("--dinov2", default=None, help="facebookresearch/dinov2 checkout (default: <upstream>/dinov2)")
    ap.add_argument(
        "--config",
        default=None,
        help="the release's config.json (default: <upstream>/config.json, else tests/data/upstream/config.json)",
    )
    ap.add_argument("--json", type=Path, default=None, help="write rows, tokens, faces and stand-ins here")
    ap.add_argument("--warm", action="store_true", help="run the chain twice and report the second (warm) run")
    ap.add_argument("--subdivisions", type=int, default=None, help="icosphere subdivisions (default 8, smoke 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="CPU threads drawing weights")
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="CPU, tiny configs, 1 step per stage, small mesh, refiners' run() not called: a crash "
        "test of imports, stand-ins, shapes and the stage plumbing (times mean nothing)",
    )
    args = ap.parse_args(argv)

    upstream = Path(args.upstream).resolve()
    if not (upstream / "direct3d_s2").is_dir():
        sys.exit(f"No original Direct3D-S2 at {upstream} (expected a direct3d_s2/ folder there); pass --upstream.")
    dinov2 = (
        Path(args.dinov2).resolve()
        if args.dinov2
        else (upstream / "dinov2" if (upstream / "dinov2").is_dir() else None)
    )
    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    if not smoke and not torch.cuda.is_available():
        sys.exit("No CUDA device: the original pipeline is timed on a GPU (use --cpu-smoke for a CPU crash test).")
    cfg, cfg_path = release_config(upstream, args.config)
    if smoke:
        cfg = smoke_config(cfg)
    stand_ins, sched_cls = install(upstream, smoke)
    import triton
    from e2e import bumpy_sphere

    from s2core.mesh.voxelize import mesh_to_latent_index

    v, f = bumpy_sphere(args.subdivisions or (2 if smoke else 8))
    res512 = cfg["sparse_dit_512"]["params"]["resolution"] * 8
    idx512 = mesh_to_latent_index(v, f, resolution=res512, device=device).to(torch.int32).cpu()
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "upstream": str(upstream),
        "warm": args.warm,
        "smoke": smoke,
        "config": str(cfg_path),
        "mesh_faces": int(f.shape[0]),
        "stand_ins": stand_ins,
        "rows": [],
        "complete": False,
    }

    def save(rows=None):
        if rows is not None:
            result["rows"] = rows
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.json.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            tmp.replace(args.json)

    print(f"original at {upstream}; mesh {v.shape[0]} vertices, {f.shape[0]} faces; device {device}", flush=True)
    for s in stand_ins:
        print("stand-in:", s[:160], flush=True)
    t0 = time.perf_counter()
    pipe = build_pipeline(cfg, device, dinov2, sched_cls, args.seed, args.workers)
    if device.type == "cuda":
        torch.cuda.synchronize()
        result["resident_weights_gib"] = torch.cuda.memory_allocated() / GiB
    result["build_s"] = time.perf_counter() - t0
    print(f"original models built in {result['build_s']:.1f} s", flush=True)
    save()
    runs = 2 if args.warm else 1
    w = None  # the wrappers of the first run, reused by the warm one
    laps = None
    for r in range(runs):
        result["run"] = "warm (second)" if r == 1 else "first"
        if laps is not None:  # the first chain's rows stay in the JSON beside the warm ones (first-run cost)
            result["first_rows"] = laps.rows
        laps = Laps(device, on_row=save)
        w = Wrappers(pipe, laps, smoke) if w is None else w
        w.laps = laps
        with torch.no_grad():  # as the original's __call__
            info = run_chain(pipe, cfg, v, f, idx512, device, laps, w, smoke, args.seed)
        result.update(info)
    total = sum(r[1] for r in laps.rows)
    pa, pr = max(r[2] for r in laps.rows), max(r[3] for r in laps.rows)
    print(f"{'total':32s} {total:8.2f} s  peak {pa:6.2f} GiB alloc  {pr:6.2f} GiB reserved", flush=True)
    result["complete"] = True
    save(laps.rows)
    if args.json:
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
