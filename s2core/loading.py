"""Which networks each stage needs, how they are built and loaded, and where their weights sit while a stage runs.

`load_models` builds our networks for the chosen stages and loads their weights (strict), giving `Models`;
every stage of `s2core.pipeline` runs inside `models.placement.use([...])`, which moves its networks to the
device (and back, with offload). ComfyUI swaps `Placement` for its own (nodes/_comfy.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import checkpoints, checks, find_weights, release
from .config import (
    MC_THRESHOLD,
    SPARSE_512_STEPS,
    SPARSE_1024_STEPS,
    ReleaseConfig,
    SchedulerConfig,
    official_v1_0,
    official_v1_1,
    tiny_release,
)
from .dense_dit import DenseDiT
from .dense_vae import DenseVAE
from .dinov2 import ImageConditioner
from .refiner import build_refiner
from .sparse_dit import SparseDiT
from .sparse_vae import SparseSDFVAE
from .testing import deterministic_state_dict
from .tiny_weights import flat_sdf_head, pass_through_refiner

VARIANTS = ("v1.1", "v1.0", "tiny-random")
TINY_REFINER_CHANNELS = (2,)  # refiner UNet widths of tiny-random: one level (official: 8, 32, 128, 512)
TINY_DENSE_OUT_BIAS = -3.5  # tiny dense decoder output bias (see tiny_state_dicts)


@dataclass(frozen=True)
class Part:
    """One network of a release: how to build it and where its weights are."""

    build: Callable[..., torch.nn.Module]  # called as build(config, **kwargs)
    config: Callable[[ReleaseConfig], object]  # its config inside the release's
    stem: str | None  # release file (release.FILE_PARTS), None for DINOv2 (not in the release)
    key: str | None  # key inside the release file
    takes_dtype: bool = False  # the class computes in a `dtype=` argument (else in its config's use_fp16)


PARTS: dict[str, Part] = {  # the names are the `Models` attributes
    "image_encoder": Part(ImageConditioner, lambda c: c.dense_image_encoder, None, None),
    "dense_vae": Part(DenseVAE, lambda c: c.dense_vae, "model_dense", "vae", takes_dtype=True),
    "dense_dit": Part(DenseDiT, lambda c: c.dense_dit, "model_dense", "dit", takes_dtype=True),
    "sparse_vae_512": Part(SparseSDFVAE, lambda c: c.sparse_vae_512, "model_sparse_512", "vae"),
    "sparse_dit_512": Part(SparseDiT, lambda c: c.sparse_dit_512, "model_sparse_512", "dit", takes_dtype=True),
    "refiner_512": Part(build_refiner, lambda c: c.refiner, "model_refiner", "refiner"),
    "sparse_vae_1024": Part(SparseSDFVAE, lambda c: c.sparse_vae_1024, "model_sparse_1024", "vae"),
    "sparse_dit_1024": Part(SparseDiT, lambda c: c.sparse_dit_1024, "model_sparse_1024", "dit", takes_dtype=True),
    "refiner_1024": Part(build_refiner, lambda c: c.refiner_1024, "model_refiner_1024", "refiner"),
}


@dataclass(frozen=True)
class SparseStage:
    """What differs between the 512 and the 1024 stage (SPEC.md §3.2); `sparse_stage(resolution)` picks one."""

    name: str  # as `load_models(stages=...)` takes it
    resolution: int  # official SDF resolution of its decode
    dit: str  # its networks (keys of PARTS)
    vae: str
    refiner: str
    scheduler: Callable[[ReleaseConfig], SchedulerConfig]
    steps: int  # the original's sampling steps
    refine_level: float  # the refiner meshes at this multiple of the threshold (SPEC.md §11)
    decoding: str  # its decode in messages and in ACTIVATION_BYTES


SPARSE_512 = SparseStage(
    name="sparse_512",
    resolution=512,
    dit="sparse_dit_512",
    vae="sparse_vae_512",
    refiner="refiner_512",
    scheduler=lambda c: c.sparse_scheduler_512,
    steps=SPARSE_512_STEPS,
    refine_level=2.0,
    decoding="sparse 512 decoding",
)
SPARSE_1024 = SparseStage(
    name="sparse_1024",
    resolution=1024,
    dit="sparse_dit_1024",
    vae="sparse_vae_1024",
    refiner="refiner_1024",
    scheduler=lambda c: c.sparse_scheduler_1024,
    steps=SPARSE_1024_STEPS,
    refine_level=1.0,
    decoding="sparse 1024 decoding",
)
STAGE_PARTS: dict[str, tuple[str, ...]] = {
    "dense": ("image_encoder", "dense_vae", "dense_dit"),
    **{s.name: ("image_encoder", s.vae, s.dit, s.refiner) for s in (SPARSE_512, SPARSE_1024)},
}
STAGES = tuple(STAGE_PARTS)


def sparse_stage(resolution: int) -> SparseStage:
    """The sparse stage of a Structure/SparseLatent resolution (512 or 1024)."""
    if resolution not in (512, 1024):
        raise ValueError(f"A sparse stage runs at 512 or 1024, got {resolution}.")
    return SPARSE_512 if resolution == 512 else SPARSE_1024


# What a stage needs on the GPU beyond its weights, in bytes: peaks measured on an H100 at the official sizes
# (bench/results/e2e.md: fp16, the default placement) minus the stage's weights, plus 25% headroom. The
# sparse DiTs need ~23 KiB a token at both resolutions; a refiner holds one UNet cube (192³ / 256³) per sample;
# the decoded voxels add what the decode emits per token (512 decodes unchunked, with 32 feature channels).
_GiB, _KiB = 2**30, 2**10
ACTIVATION_BYTES = {  # stage: (bytes per sample, bytes per sparse token)
    "image encoding": (0.1 * _GiB, 0),
    "dense sampling": (0.25 * _GiB, 0),
    "dense decoding": (0.5 * _GiB, 0),
    "sparse sampling": (0, 24 * _KiB),
    SPARSE_512.decoding: (2.2 * _GiB, 56 * _KiB),  # the refiner cube per sample, decoded voxels per token
    SPARSE_1024.decoding: (2.9 * _GiB, 8 * _KiB),  # 4.3 before the refiner's depth slabs (e2e.md, 2026-12-07)
}


def activation_bytes(stage: str, batch: int = 1, tokens: int = 0) -> int:
    """Estimated GPU memory `stage` needs beyond its weights (see ACTIVATION_BYTES), for `batch` samples and
    `tokens` sparse tokens in all. ComfyUI gets it as `load_models_gpu(memory_required=...)`, so it can make
    room (evict other models) before the stage runs."""
    per_sample, per_token = ACTIVATION_BYTES[stage]
    return int(1.25 * (per_sample * batch + per_token * tokens))


def config_for(variant: str) -> ReleaseConfig:
    if variant == "v1.1":
        return official_v1_1()
    if variant == "v1.0":
        return official_v1_0()
    if variant == "tiny-random":
        return tiny_release()
    raise ValueError(f"Unknown Direct3D-S2 variant {variant!r}; choose one of {', '.join(VARIANTS)}.")


def build_part(name: str, config: ReleaseConfig, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Construct one network (random init, on CPU, eval, no grad) from its config, computing in `dtype`.

    DINOv2 always runs in fp32, as the original. The others get `dtype` (fp16 = the release's `use_fp16`).
    """
    p = PARTS[name]
    cfg = p.config(config)
    kwargs = {}
    if name != "image_encoder":
        if hasattr(cfg, "use_fp16"):
            cfg = replace(cfg, use_fp16=dtype == torch.float16)
        if p.takes_dtype:
            kwargs["dtype"] = dtype
    if p.build is build_refiner and config.name == "tiny-random":
        kwargs["block_out_channels"] = TINY_REFINER_CHANNELS  # the UNet widths are not in RefinerConfig
    return p.build(cfg, **kwargs).eval().requires_grad_(False)


class Placement:
    """Default weight placement outside ComfyUI: a stage's networks move to `device` while it runs.

    offload (default: on for any device but the CPU) moves them back to the CPU when the stage ends, so
    only one stage's weights are on the GPU at a time (DESIGN.md); the largest stage (the 1024 DiT) is
    then what the weights cost, not all 6.4 GB of them. `offload=False` keeps every network resident
    once used (faster when the GPU has room; the CLI's --keep-weights-on-gpu).

    max_vram_gb (overrides `offload`): the GiB that networks' weights may hold on the device. Networks
    stay resident while they fit; before a stage runs, the least recently used networks of other stages
    go back to the CPU until its own fit (a stage larger than the budget alone still runs). Activations
    are not counted: leave room for them. ComfyUI replaces this class with ModelPatcher +
    load_models_gpu (nodes/_comfy.py).
    """

    def __init__(
        self, device: torch.device | str = "cpu", offload: bool | None = None, max_vram_gb: float | None = None
    ):
        self.device = checks.device(device, present=False)  # load_models checks the device exists
        on_cpu = self.device.type == "cpu"
        if max_vram_gb is not None:
            checks.number("max_vram_gb", max_vram_gb, 0, low_open=True, hint=" (GiB)")
        self.budget = None if max_vram_gb is None or on_cpu else int(max_vram_gb * 2**30)
        self.offload = (not on_cpu) if offload is None else (offload and not on_cpu)
        if self.budget is not None:
            self.offload = False  # the budget decides what goes back
        self._resident: dict[int, tuple[torch.nn.Module, int]] = {}  # id -> (module, bytes), LRU first

    @staticmethod
    def weight_bytes(module: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in module.state_dict().values())

    def _make_room(self, modules: list[torch.nn.Module]) -> None:
        keep = {id(m) for m in modules}
        need = sum(self.weight_bytes(m) for m in modules if id(m) not in self._resident)
        held = sum(b for _, b in self._resident.values())
        for key in list(self._resident):  # least recently used first
            if held + need <= self.budget:
                break
            if key in keep:
                continue
            module, nbytes = self._resident.pop(key)
            module.to("cpu")
            held -= nbytes

    @contextlib.contextmanager
    def use(self, modules: list[torch.nn.Module], activations: int = 0) -> Iterator[torch.device]:
        """Run a stage of `modules`; `activations` (bytes, `activation_bytes`) is what it needs beyond their
        weights: the max_vram_gb budget counts weights only, ComfyPlacement passes it to ComfyUI."""
        if self.budget is not None:
            self._make_room(modules)
        for m in modules:
            m.to(self.device)
            if self.budget is not None:
                entry = self._resident.pop(id(m), None)
                self._resident[id(m)] = entry or (m, self.weight_bytes(m))  # most recently used last
        try:
            yield self.device
        finally:  # also when the stage is cancelled or runs out of memory
            if self.offload:
                for m in modules:
                    m.to("cpu")
                if self.device.type == "cuda":  # hand the stage's cached activation blocks back to the driver
                    torch.cuda.empty_cache()


@dataclass
class Models:
    """The loaded networks of one release; a part is None when its stage was not loaded.

    `dtype` is the compute dtype of the DiTs and VAEs (fp16 = the release; fp32 for the tiny model and CPU).
    `placement.use([modules])` is entered around every stage and yields the device to run on.
    """

    config: ReleaseConfig
    variant: str
    dtype: torch.dtype
    placement: Placement
    image_encoder: torch.nn.Module | None = None
    dense_vae: torch.nn.Module | None = None
    dense_dit: torch.nn.Module | None = None
    sparse_vae_512: torch.nn.Module | None = None
    sparse_dit_512: torch.nn.Module | None = None
    refiner_512: torch.nn.Module | None = None
    sparse_vae_1024: torch.nn.Module | None = None
    sparse_dit_1024: torch.nn.Module | None = None
    refiner_1024: torch.nn.Module | None = None

    def part(self, name: str) -> torch.nn.Module:
        """The loaded network `name` (a key of PARTS), or a ValueError naming the stage to load."""
        m = getattr(self, name)
        if m is None:
            stage = next(s for s, ps in STAGE_PARTS.items() if name in ps)
            raise ValueError(f"The `{name}` network is not loaded; load the model with the `{stage}` stage on.")
        return m

    def loaded_parts(self) -> dict[str, torch.nn.Module]:
        return {n: getattr(self, n) for n in PARTS if getattr(self, n) is not None}

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(s for s, ps in STAGE_PARTS.items() if all(getattr(self, p) is not None for p in ps))


def _load_weights(name: str, module: torch.nn.Module, state_dict: dict) -> None:
    """strict=True load; DINOv2 goes through its layout converter (hub or Hugging Face keys)."""
    try:
        if name == "image_encoder":
            module.load_backbone(state_dict)
        else:
            module.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ValueError(
            f"The weights for `{name}` do not fit this network ({(lines[1] if len(lines) > 1 else lines[0])[:200]}); "
            f"they are not the Direct3D-S2 weights of this variant — choose the matching files."
        ) from None


def tiny_state_dicts(
    config: ReleaseConfig, parts: tuple[str, ...], seed: int = 0
) -> dict[str, dict[str, torch.Tensor]]:
    """Deterministic random weights for `tiny-random` (values depend only on seed, part, name and shape)."""
    out = {}
    for i, name in enumerate(PARTS):
        if name in parts:
            module = build_part(name, config)
            module = module.model if name == "image_encoder" else module  # the backbone's own (hub) keys
            out[name] = deterministic_state_dict(module, seed=seed * 100 + i)
    if "dense_vae" in out:
        # Random decoders call ~every cell occupied at the official 0.1 threshold; this one bias keeps
        # about 1 % of the 16³ cells so the sparse stages run on ~50 tokens and the chain takes seconds.
        out["dense_vae"]["decoder.out_layer.2.bias"].fill_(TINY_DENSE_OUT_BIAS)
    # random SDF heads give noise meshes, random refiners never reach the iso-level: see tiny_weights
    for name in ("sparse_vae_512", "sparse_vae_1024"):
        if name in out:
            flat_sdf_head(out[name])
    for name, sign in (("refiner_512", False), ("refiner_1024", True)):
        if name in out:
            pass_through_refiner(
                out[name], TINY_REFINER_CHANNELS[0], sign, MC_THRESHOLD, MC_THRESHOLD if sign else 2 * MC_THRESHOLD
            )
    return out


def _release_state_dicts(
    variant: str,
    parts: tuple[str, ...],
    stages: tuple[str, ...],
    weights_dir,
    models_dir,
    allow_download: bool,
    progress,
) -> dict[str, dict[str, torch.Tensor]]:
    paths = find_weights.resolve_weights(
        variant,
        stages=stages,
        local_dir=weights_dir,
        models_dir=models_dir,
        allow_download=allow_download,
        with_dinov2="image_encoder" in parts,
        tqdm_class=progress,
    )
    out = {}
    for name in parts:
        p = PARTS[name]
        if p.stem is None:
            out[name] = checkpoints.load_dinov2(paths["dinov2"])
        else:
            out[name] = checkpoints.load_part(paths[p.stem], p.key, release.manifest_key(p.stem, p.key, variant))
    return out


def load_models(
    variant: str = "v1.1",
    stages: tuple[str, ...] = STAGES,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    state_dicts: dict[str, dict[str, torch.Tensor]] | None = None,
    weights_dir: str | Path | None = None,
    models_dir: str | Path | None = None,
    allow_download: bool = True,
    progress=None,
    placement: Placement | None = None,
    seed: int = 0,
) -> Models:
    """Build our networks for `stages` and load their weights with strict=True.

    Weights come from `state_dicts` (`{part: state_dict}`), or for `tiny-random` from `seed` (no file; its
    meshes are meaningless), or via `find_weights.resolve_weights` (`weights_dir`, ComfyUI's `models_dir`,
    the Hugging Face cache or a download). `dtype` defaults to fp16 on CUDA for the official variants and
    fp32 otherwise. Networks are built on CPU; `placement` (default: move to `device`) places them per stage.
    """
    config = config_for(variant)
    stages = tuple(stages)
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f"Unknown or empty stage list {list(stages)}; choose from {', '.join(STAGES)}.")
    device = checks.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" and variant != "tiny-random" else torch.float32
    parts = tuple(dict.fromkeys(p for s in STAGES if s in stages for p in STAGE_PARTS[s]))
    if state_dicts is None:
        if variant == "tiny-random":
            state_dicts = tiny_state_dicts(config, parts, seed)
        else:
            # files first: missing, corrupt or wrong-variant files are reported in seconds, before ~10 GB of
            # networks exist (.ckpt files are memory-mapped, so holding their state dicts costs little)
            state_dicts = _release_state_dicts(
                variant, parts, stages, weights_dir, models_dir, allow_download, progress
            )
    modules = {name: build_part(name, config, dtype) for name in parts}
    models = Models(config, variant, dtype, placement or Placement(device))
    for name, module in modules.items():
        if name not in state_dicts:
            raise ValueError(f"No weights were given for `{name}`, which the {', '.join(stages)} stage(s) need.")
        _load_weights(name, module, state_dicts[name])
        setattr(models, name, module)
    return models
