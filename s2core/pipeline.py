"""Direct3D-S2 as plain stage functions over small typed results (SPEC.md §3).

```
image ─► encode_image ─► Conditioning ─► sample_dense ─► DenseLatent ─► decode_dense ─► Structure (64³ index)
Structure ─► sample_sparse(512) ─► SparseLatent ─► decode_sparse (+refiner) ─► Mesh (512³)
Mesh ─► mesh_to_structure(1024) ─► Structure (128³) ─► sample_sparse(1024) ─► decode_sparse ─► Mesh (1024³)
Mesh ─► postprocess ─► save
```

`image_to_mesh` chains them with the official defaults (dense 50 steps, sparse-512 30 steps, sparse-1024
15 steps, guidance 7, thresholds 0.1 / 0.2). The ComfyUI nodes and the CLI call these same functions.

Every loop polls `should_stop()` (return True, or raise your own exception, to cancel: ComfyUI's hook
raises its interruption) and reports `callback(step, total)` after each step. Out-of-memory inside a
stage becomes a RuntimeError naming what to lower. Seeds: batch item `i` of a stage run with `seed`
draws its noise from a CPU `torch.Generator` seeded `seed + i`, so a batch equals single runs with
seeds `seed, seed+1, ...`, and the noise is the same on every device.

Batches are packed (ragged) like pytorch3d's `Meshes`: rows of item b are contiguous, items in order.

| object        | packed rows               | per item                                 |
|---------------|---------------------------|------------------------------------------|
| `Structure`   | `coords [N, 4]`           | `counts[b]` rows, `cu_seqlens[b]:[b+1]`   |
| `SparseLatent`| `feats [N, C]` (= coords) | same rows as its `Structure`             |
| `Mesh`        | `vertices [V, 3]`, `faces [F, 3]` | `vertex_counts[b]`, `face_counts[b]`; faces index the item's own vertices |

Example, B=2 with 3 and 2 tokens: `coords` rows 0-2 are (0, x, y, z), rows 3-4 are (1, x, y, z),
`cu_seqlens = [0, 3, 5]`, `counts = (3, 2)`, `max_seqlen = 3`.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import checks
from .config import ReleaseConfig, official_v1_0, official_v1_1, tiny_release

log = logging.getLogger(__name__)

Callback = Callable[[int, int], None]
ShouldStop = Callable[[], bool]

# Official defaults (SPEC.md §3.1, §3.2, SPARSE.md §8).
DENSE_STEPS, SPARSE_512_STEPS, SPARSE_1024_STEPS = 50, 30, 15
GUIDANCE = 7.0
DENSE_THRESHOLD = 0.1  # occupancy probability of the dense decode
MC_THRESHOLD = 0.2  # sparse SDF iso-level; the 512 refiner meshes at 2x this (SPEC.md §11)
SIMPLIFY_RATIO = 0.95  # fraction of faces removed by `postprocess(simplify=True)`
VARIANTS = ("v1.1", "v1.0", "tiny-random")
TINY_REFINER_CHANNELS = (2,)  # refiner UNet widths of tiny-random: one level (official: 8, 32, 128, 512)
TINY_DENSE_OUT_BIAS = -3.5  # tiny dense decoder output bias (see tiny_state_dicts)
STAGES = ("dense", "sparse_512", "sparse_1024")

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
    "sparse 512 decoding": (2.2 * _GiB, 56 * _KiB),  # the refiner cube per sample, decoded voxels per token
    "sparse 1024 decoding": (4.3 * _GiB, 8 * _KiB),
}


def activation_bytes(stage: str, batch: int = 1, tokens: int = 0) -> int:
    """Estimated GPU memory `stage` needs beyond its weights (see ACTIVATION_BYTES), for `batch` samples and
    `tokens` sparse tokens in all. ComfyUI gets it as `load_models_gpu(memory_required=...)`, so it can make
    room (evict other models) before the stage runs."""
    per_sample, per_token = ACTIVATION_BYTES[stage]
    return int(1.25 * (per_sample * batch + per_token * tokens))


class Cancelled(RuntimeError):
    """Raised when `should_stop()` returned True; nothing was written."""


# ---------------------------------------------------------------------------------------------
# Stage results


@dataclass(frozen=True)
class Conditioning:
    """DINOv2 image tokens for B images (SPEC.md §5).

    | field        | shape / dtype                  | meaning                                               |
    |--------------|--------------------------------|-------------------------------------------------------|
    | `tokens`     | [B, T, C] float32              | `LN(x_prenorm)`: cls, 4 registers, 37x37 patches (T=1374, C=1024 official) |
    | `patch_mask` | [B, P, P] bool                 | patch cells touched by the object mask (P=37); used only by v1.0 sparse stages |

    The unconditional branch is `zeros_like(tokens)` (built by the samplers, not stored).
    """
    tokens: torch.Tensor
    patch_mask: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def to(self, device) -> "Conditioning":
        return Conditioning(self.tokens.to(device), self.patch_mask.to(device))

    def item(self, i: int) -> "Conditioning":
        return Conditioning(self.tokens[i:i + 1], self.patch_mask[i:i + 1])


@dataclass(frozen=True)
class DenseLatent:
    """Coarse-stage latent: `latents [B, 8, 16, 16, 16]` (model dtype) after `steps` Euler steps from `seed`."""
    latents: torch.Tensor
    seed: int

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    def to(self, device) -> "DenseLatent":
        return DenseLatent(self.latents.to(device), self.seed)


@dataclass(frozen=True)
class Structure:
    """The sparse token index a sparse DiT runs on: active latent cells of a `grid`³ grid.

    | field        | shape / dtype      | meaning                                                        |
    |--------------|--------------------|----------------------------------------------------------------|
    | `coords`     | [N, 4] int32       | (batch, x, y, z), x,y,z in [0, grid); items in batch order, each block-sorted (SPEC.md §9.1) |
    | `resolution` | int                | the stage: 512 or 1024 (official SDF resolution of its decode)   |
    | `grid`       | int                | latent grid edge: 64 / 128 official (16 / 32 for tiny-random); the SDF is 8x finer |
    | `block_size` | int                | SSA selection block edge (8)                                   |
    | `cu_seqlens` | [B+1] int32        | rows of item b are cu_seqlens[b]:cu_seqlens[b+1]                |
    | `counts`     | tuple[int] (B)     | tokens per item, Python ints (no host sync later)              |
    | `max_seqlen` | int                | max(counts)                                                    |
    | `num_blocks` | tuple[int] (B)     | occupied `block_size`³ blocks per item                         |
    | `block_cu`   | [K+1] int32        | token rows of the k-th occupied block (all items, in row order) are block_cu[k]:block_cu[k+1] |
    | `cache`      | dict               | memo shared by every SparseTensor made from it (kernel maps, windows, SSA block ranges): computed on the first step, reused by all later steps |
    """
    coords: torch.Tensor
    resolution: int
    grid: int
    block_size: int
    cu_seqlens: torch.Tensor
    counts: tuple[int, ...]
    max_seqlen: int
    num_blocks: tuple[int, ...]
    block_cu: torch.Tensor
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return len(self.counts)

    @property
    def num_tokens(self) -> int:
        return self.coords.shape[0]

    def to(self, device) -> "Structure":
        device = torch.device(device)
        if self.coords.device == device:
            return self
        return replace(self, coords=self.coords.to(device), cu_seqlens=self.cu_seqlens.to(device),
                       block_cu=self.block_cu.to(device), cache={})

    def sparse(self, feats: torch.Tensor):
        """A SparseTensor of `feats [N, C]` on these coords, sharing this structure's cache."""
        from .sparse.tensor import SparseTensor

        return SparseTensor(feats, self.coords, self.batch_size, self.cu_seqlens.to(torch.int64), self.cache)

    def item(self, i: int) -> "Structure":
        a, b = sum(self.counts[:i]), sum(self.counts[:i + 1])
        coords = self.coords[a:b].clone()
        coords[:, 0] = 0
        return make_structure(coords, self.resolution, self.grid, self.block_size, sort=False)


@dataclass(frozen=True)
class SparseLatent:
    """Sparse-stage latent: `feats [N, 16]` (model dtype), one row per `structure.coords` row."""
    feats: torch.Tensor
    structure: Structure
    seed: int

    @property
    def resolution(self) -> int:
        return self.structure.resolution

    def to(self, device) -> "SparseLatent":
        return SparseLatent(self.feats.to(device), self.structure.to(device), self.seed)


@dataclass(frozen=True)
class Mesh:
    """B triangle meshes, packed.

    | field           | shape / dtype   | meaning                                                         |
    |-----------------|-----------------|-----------------------------------------------------------------|
    | `vertices`      | [V, 3] float32  | positions, roughly in [-1, 1] (grid index / resolution * 2 - 1), axes as the original (+Y up in glTF viewers) |
    | `faces`         | [F, 3] int64    | vertex indices local to each item, counter-clockwise = outward   |
    | `vertex_counts` | tuple[int] (B)  | vertices per item                                                |
    | `face_counts`   | tuple[int] (B)  | faces per item                                                   |
    | `resolution`    | int             | stage it was decoded at (512, 1024; 0 = unknown)                 |
    | `info`          | dict            | provenance written into saved files: variant, seed, resolution   |
    | `vertex_colors` | [V, 3] float32 or None | RGB in [0, 1] per vertex (`s2core.colour`); saved as glTF COLOR_0 / PLY colours |
    """
    vertices: torch.Tensor
    faces: torch.Tensor
    vertex_counts: tuple[int, ...]
    face_counts: tuple[int, ...]
    resolution: int = 0
    info: dict = field(default_factory=dict, compare=False)
    vertex_colors: torch.Tensor | None = field(default=None, compare=False)

    @classmethod
    def from_list(cls, items: list[tuple[torch.Tensor, torch.Tensor]], resolution: int = 0,
                  info: dict | None = None, colors: list[torch.Tensor] | None = None) -> "Mesh":
        """Pack (vertices, faces) items; `colors` (one [V_i, 3] per item) become `vertex_colors`."""
        v = [torch.as_tensor(a).to(torch.float32).reshape(-1, 3) for a, _ in items]
        f = [torch.as_tensor(b).to(torch.int64).reshape(-1, 3) for _, b in items]
        c = None
        if colors is not None:
            c = [torch.as_tensor(x).to(torch.float32).reshape(-1, 3).to(a.device) for x, a in zip(colors, v)]
            if len(c) != len(v) or any(x.shape != a.shape for x, a in zip(c, v)):
                raise ValueError("vertex colours must give one RGB row per vertex of every mesh item.")
            c = torch.cat(c) if c else torch.zeros(0, 3)
        return cls(torch.cat(v) if v else torch.zeros(0, 3), torch.cat(f) if f else torch.zeros(0, 3, dtype=torch.int64),
                   tuple(x.shape[0] for x in v), tuple(x.shape[0] for x in f), resolution, dict(info or {}), c)

    @property
    def batch_size(self) -> int:
        return len(self.vertex_counts)

    def item(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(vertices [V_i, 3], faces [F_i, 3]) of item i."""
        va, fa = sum(self.vertex_counts[:i]), sum(self.face_counts[:i])
        return (self.vertices[va:va + self.vertex_counts[i]], self.faces[fa:fa + self.face_counts[i]])

    def items(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.item(i) for i in range(self.batch_size)]

    def item_colors(self, i: int) -> torch.Tensor | None:
        """vertex_colors [V_i, 3] of item i, or None."""
        if self.vertex_colors is None:
            return None
        va = sum(self.vertex_counts[:i])
        return self.vertex_colors[va:va + self.vertex_counts[i]]

    def to(self, device) -> "Mesh":
        c = self.vertex_colors.to(device) if self.vertex_colors is not None else None
        return replace(self, vertices=self.vertices.to(device), faces=self.faces.to(device), vertex_colors=c)


def make_structure(coords: torch.Tensor, resolution: int, grid: int, block_size: int = 8,
                   sort: bool = True) -> Structure:
    """Build a Structure for stage `resolution` (512|1024) from `coords [N, 4]` (batch, x, y, z) on a `grid`³ grid.

    With `sort`, rows are ordered by batch item, then block-sorted inside each item
    (`structure.sort_block`, SPEC.md §9.1) — SSA's top-k depends on this order. The token counts are
    read to the host here, once per structure, so the sampling loop never syncs.
    """
    if resolution not in (512, 1024):
        raise ValueError(f"Structure resolution must be 512 or 1024, got {resolution}.")
    coords = coords.to(torch.int32)
    if sort:
        coords = _function("structure", "sort_block")(coords, block_size)[0]
    bsz = int(coords[:, 0].max().item()) + 1 if coords.shape[0] else 1
    counts_t = torch.bincount(coords[:, 0].long(), minlength=bsz)
    cu = torch.zeros(bsz + 1, dtype=torch.int32, device=coords.device)
    cu[1:] = torch.cumsum(counts_t, 0)
    c = coords.to(torch.int64)
    key = torch.cat([c[:, :1], c[:, 1:] // block_size], 1)  # [N, 4] (b, block x, y, z); rows are block-contiguous
    starts = torch.ones(len(c), dtype=torch.bool, device=c.device)
    starts[1:] = (key[1:] != key[:-1]).any(1)
    first = torch.nonzero(starts).squeeze(1)
    block_cu = torch.cat([first, first.new_tensor([len(c)])]).to(torch.int32)
    nblk = torch.bincount(key[first, 0], minlength=bsz)
    counts = tuple(int(n) for n in counts_t.tolist())
    return Structure(coords.contiguous(), resolution, grid, block_size, cu, counts,
                     max(counts, default=0), tuple(int(n) for n in nblk.tolist()), block_cu)


# ---------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class _Part:
    module: str  # s2core submodule that defines the class
    cls: str
    config: str  # ReleaseConfig field
    stem: str | None  # release file (checkpoints.FILE_PARTS), None for DINOv2 (not in the release)
    part: str | None  # key inside the release file


PARTS: dict[str, _Part] = {
    "image_encoder": _Part("dinov2", "ImageConditioner", "dense_image_encoder", None, None),
    "dense_vae": _Part("dense_vae", "DenseVAE", "dense_vae", "model_dense", "vae"),
    "dense_dit": _Part("dense_dit", "DenseDiT", "dense_dit", "model_dense", "dit"),
    "sparse_vae_512": _Part("sparse_vae", "SparseSDFVAE", "sparse_vae_512", "model_sparse_512", "vae"),
    "sparse_dit_512": _Part("sparse_dit", "SparseDiT", "sparse_dit_512", "model_sparse_512", "dit"),
    "refiner_512": _Part("refiner", "build_refiner", "refiner", "model_refiner", "refiner"),
    "sparse_vae_1024": _Part("sparse_vae", "SparseSDFVAE", "sparse_vae_1024", "model_sparse_1024", "vae"),
    "sparse_dit_1024": _Part("sparse_dit", "SparseDiT", "sparse_dit_1024", "model_sparse_1024", "dit"),
    "refiner_1024": _Part("refiner", "build_refiner", "refiner_1024", "model_refiner_1024", "refiner"),
}
STAGE_PARTS: dict[str, tuple[str, ...]] = {
    "dense": ("image_encoder", "dense_vae", "dense_dit"),
    "sparse_512": ("image_encoder", "sparse_vae_512", "sparse_dit_512", "refiner_512"),
    "sparse_1024": ("image_encoder", "sparse_vae_1024", "sparse_dit_1024", "refiner_1024"),
}
_WHAT = {
    "dinov2": "The image encoder (DINOv2)", "dense_vae": "The dense VAE", "dense_dit": "The dense DiT",
    "sparse_vae": "The sparse SDF VAE", "sparse_dit": "The sparse DiT", "refiner": "The interior-removal refiner",
    "image": "Image preprocessing", "flow_sampler": "The flow-matching sampler",
    "structure": "The coarse-stage structure step", "mesh.marching_cubes": "Sparse marching cubes",
    "mesh.voxelize": "Mesh voxelization", "mesh.postprocess": "Mesh post-processing", "mesh.export": "Mesh export",
}


def _function(module: str, name: str):
    """`s2core.<module>.<name>`, or a RuntimeError saying plainly that this part of the pack is not there yet."""
    what = _WHAT.get(module, f"`s2core/{module.replace('.', '/')}.py`")
    try:
        mod = importlib.import_module(f"{__package__}.{module}")
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.endswith(module.rsplit(".", 1)[-1]):
            raise
        raise RuntimeError(f"{what} is not available yet in this version of the pack "
                           f"(s2core/{module.replace('.', '/')}.py is missing).") from None
    if not hasattr(mod, name):
        raise RuntimeError(f"{what} is not available yet in this version of the pack "
                           f"(s2core/{module.replace('.', '/')}.py has no `{name}`).")
    return getattr(mod, name)


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
    cls = _function(p.module, p.cls)
    cfg = getattr(config, p.config)
    kwargs = {}
    if name != "image_encoder":
        if hasattr(cfg, "use_fp16"):
            cfg = replace(cfg, use_fp16=dtype == torch.float16)
        if "dtype" in inspect.signature(cls).parameters:
            kwargs["dtype"] = dtype
    if name.startswith("refiner") and config.name == "tiny-random":
        kwargs["block_out_channels"] = TINY_REFINER_CHANNELS  # the UNet widths are not in RefinerConfig
    return cls(cfg, **kwargs).eval().requires_grad_(False)


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

    def __init__(self, device: torch.device | str = "cpu", offload: bool | None = None,
                 max_vram_gb: float | None = None):
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
        raise ValueError(f"The weights for `{name}` do not fit this network ({(lines[1] if len(lines) > 1 else lines[0])[:200]}); "
                         f"they are not the Direct3D-S2 weights of this variant — choose the matching files.") from None


def tiny_state_dicts(config: ReleaseConfig, parts: tuple[str, ...], seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Deterministic random weights for `tiny-random` (values depend only on seed, part, name and shape)."""
    from .testing import deterministic_state_dict

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
    from .tiny_weights import flat_sdf_head, pass_through_refiner
    for name in ("sparse_vae_512", "sparse_vae_1024"):
        if name in out:
            flat_sdf_head(out[name])
    for name, sign in (("refiner_512", False), ("refiner_1024", True)):
        if name in out:
            pass_through_refiner(out[name], TINY_REFINER_CHANNELS[0], sign, MC_THRESHOLD,
                                 MC_THRESHOLD if sign else 2 * MC_THRESHOLD)
    return out


def _release_state_dicts(variant: str, parts: tuple[str, ...], stages: tuple[str, ...], weights_dir, models_dir,
                         allow_download: bool, progress) -> dict[str, dict[str, torch.Tensor]]:
    from . import checkpoints

    paths = checkpoints.resolve_weights(variant, stages=stages, local_dir=weights_dir, models_dir=models_dir,
                                        allow_download=allow_download, with_dinov2="image_encoder" in parts,
                                        tqdm_class=progress)
    out = {}
    for name in parts:
        p = PARTS[name]
        if p.stem is None:
            out[name] = checkpoints.load_dinov2(paths["dinov2"])
        else:
            out[name] = checkpoints.load_part(paths[p.stem], p.part, checkpoints.manifest_key(p.stem, p.part, variant))
    return out


def required_files(variant: str, stages: tuple[str, ...] = STAGES) -> str:
    """The 'which files to put where' text for `variant` (names, approximate sizes, source)."""
    from . import checkpoints

    stems = list(dict.fromkeys(s for st in stages for s in checkpoints.STAGE_FILES[st])) + ["dinov2"]
    return checkpoints.missing_files_message(stems, variant, None, "they are needed")


def load_models(variant: str = "v1.1", stages: tuple[str, ...] = STAGES, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None, state_dicts: dict[str, dict[str, torch.Tensor]] | None = None,
                weights_dir: str | Path | None = None, models_dir: str | Path | None = None,
                allow_download: bool = True, progress=None, placement: Placement | None = None,
                seed: int = 0) -> Models:
    """Build our networks for `stages` and load their weights with strict=True.

    Weights come from `state_dicts` (`{part: state_dict}`), or for `tiny-random` from `seed` (no file; its
    meshes are meaningless), or via `checkpoints.resolve_weights` (`weights_dir`, ComfyUI's `models_dir`,
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
            state_dicts = _release_state_dicts(variant, parts, stages, weights_dir, models_dir, allow_download,
                                               progress)
    modules = {name: build_part(name, config, dtype) for name in parts}
    models = Models(config, variant, dtype, placement or Placement(device))
    for name, module in modules.items():
        if name not in state_dicts:
            raise ValueError(f"No weights were given for `{name}`, which the {', '.join(stages)} stage(s) need.")
        _load_weights(name, module, state_dicts[name])
        setattr(models, name, module)
    return models


# ---------------------------------------------------------------------------------------------
# Hooks: progress, cancellation, out-of-memory


def _poll(should_stop: ShouldStop | None) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled("The run was cancelled; nothing was written.")


def _step_hooks(callback: Callback | None, should_stop: ShouldStop | None):
    """(callback, check_cancel) in the form `flow_sampler.sample_flow` takes them."""
    return callback, (lambda: _poll(should_stop))


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


@contextlib.contextmanager
def stage_guard(stage: str, lower: str) -> Iterator[None]:
    """Run a stage without autograd; an out-of-memory error becomes one sentence naming what to lower."""
    try:
        with torch.inference_mode():
            yield
    except Exception as e:
        if not _is_oom(e):
            raise
        raise RuntimeError(f"Out of GPU memory during {stage}; {lower}, or close other programs using the GPU.") from None


def _noise(shapes: list[tuple[int, ...]], seed: int, device, dtype) -> torch.Tensor:
    """Item i's noise from a generator seeded `seed + i` on `device` (the original's draw for B = 1), stacked."""
    make_noise = _function("flow_sampler", "make_noise")
    seeded = _function("flow_sampler", "seeded_generator")
    gen_device = device if torch.device(device).type == "cuda" else "cpu"
    # host loop over batch items: once per stage, so a batch equals single runs with seeds seed, seed+1, ...
    return torch.cat([make_noise(s, seeded((seed + i) % 2**64, gen_device), dtype, device) for i, s in enumerate(shapes)])


def _check_sampling(steps: int, guidance: float) -> None:
    checks.count("steps", steps, 1)
    checks.number("guidance", guidance, 0, hint=" (7 matches the original)")


def check_chain_settings(resolution: int = 1024, dense_steps: int = DENSE_STEPS,
                         sparse_512_steps: int = SPARSE_512_STEPS, sparse_1024_steps: int = SPARSE_1024_STEPS,
                         guidance: float = GUIDANCE, mc_threshold: float = MC_THRESHOLD, max_tokens: int = 0,
                         simplify_ratio: float = SIMPLIFY_RATIO) -> None:
    """ValueError (one sentence) for any bad setting of `image_to_mesh`, before any model loads or runs."""
    if resolution not in (512, 1024):
        raise ValueError(f"resolution must be 512 or 1024, got {resolution!r}.")
    for name, steps in (("dense_steps", dense_steps), ("sparse_512_steps", sparse_512_steps)) + (
            (("sparse_1024_steps", sparse_1024_steps),) if resolution == 1024 else ()):
        checks.count(name, steps, 1)
    checks.number("guidance", guidance, 0, hint=" (7 matches the original)")
    checks.number("mc_threshold", mc_threshold, hint=" (0.2 matches the original)")
    checks.count("max_tokens", max_tokens, 0, hint=" (0: no limit)")
    checks.number("simplify_ratio", simplify_ratio, 0, 1, high_open=True)


# ---------------------------------------------------------------------------------------------
# Stages


def encode_image(models: Models, image: torch.Tensor, mask: torch.Tensor | None = None,
                 should_stop: ShouldStop | None = None) -> Conditioning:
    """IMAGE `[B, H, W, 3|4]` float in 0..1 (+ object MASK `[B, H, W]`, 1 = object) -> Conditioning.

    `s2core.image.preprocess_image` validates the inputs (one clear sentence for an empty mask, wrong
    shapes, NaNs...) before any network runs, then crops, centres and pads on white as the original.
    """
    preprocess = _function("image", "preprocess_image")
    encode = _function("structure", "encode_image")
    enc = models.part("image_encoder")
    pixels = preprocess(image, mask, size=enc.cfg.size)  # [B, 4, S, S]: RGB on white + mask
    _poll(should_stop)
    with stage_guard("image encoding", "use fewer images per batch"), \
            models.placement.use([enc], activation_bytes("image encoding", pixels.shape[0])):
        tokens, patch_mask = encode(enc, pixels)
    return Conditioning(tokens, patch_mask)


def sample_dense(models: Models, cond: Conditioning, seed: int = 0, steps: int = DENSE_STEPS,
                 guidance: float = GUIDANCE, callback: Callback | None = None,
                 should_stop: ShouldStop | None = None) -> DenseLatent:
    """Sample the coarse latent `[B, 8, 16, 16, 16]` (SPEC.md §3.3 dense mode)."""
    _check_sampling(steps, guidance)
    sample_flow = _function("flow_sampler", "sample_flow")
    dit = models.part("dense_dit")
    cfg = models.config.dense_dit
    shape = (1, cfg.in_channels, *[cfg.resolution] * 3)
    with stage_guard("dense sampling", "use fewer images per batch"), \
            models.placement.use([dit], activation_bytes("dense sampling", cond.batch_size)) as dev:
        noise = _noise([shape] * cond.batch_size, seed, dev, models.dtype)
        c = cond.tokens.to(dev)
        cb, check = _step_hooks(callback, should_stop)
        latents = sample_flow(dit, noise, c, torch.zeros_like(c), num_steps=steps, guidance=guidance,
                              shift=models.config.dense_scheduler.shift, callback=cb, check_cancel=check)
    return DenseLatent(latents, seed)


def decode_dense(models: Models, latent: DenseLatent, threshold: float = DENSE_THRESHOLD,
                 should_stop: ShouldStop | None = None) -> Structure:
    """Dense VAE decode -> cells of the 64³ grid with occupancy >= threshold -> the 512 Structure."""
    checks.number("The occupancy threshold", threshold, 0, 1, low_open=True, high_open=True)
    decode = _function("structure", "decode_dense")
    vae = models.part("dense_vae")
    bs = models.config.sparse_dit_512.selection_block_size
    _poll(should_stop)
    with stage_guard("dense decoding", "use fewer images per batch"), \
            models.placement.use([vae], activation_bytes("dense decoding", latent.batch_size)) as dev:
        coords = decode(vae, latent.latents.to(dev), threshold=threshold, block_size=bs)  # [N, 4], block-sorted
    return make_structure(coords.cpu(), 512, models.config.sparse_dit_512.resolution, bs, sort=False)


def sample_sparse(models: Models, cond: Conditioning, structure: Structure, seed: int = 0,
                  steps: int | None = None, guidance: float = GUIDANCE, max_tokens: int = 0,
                  callback: Callback | None = None, should_stop: ShouldStop | None = None) -> SparseLatent:
    """Sample the `[N, 16]` latent on `structure` with the 512 or 1024 sparse DiT (SPEC.md §3.3).

    `steps=None` uses the original's count (30 at 512, 15 at 1024). `max_tokens > 0` refuses a structure
    with more tokens per item before anything runs (a memory budget).
    """
    res = structure.resolution
    steps = (SPARSE_512_STEPS if res == 512 else SPARSE_1024_STEPS) if steps is None else steps
    _check_sampling(steps, guidance)
    checks.count("max_tokens", max_tokens, 0, hint=" (0: no limit)")
    if max_tokens and structure.max_seqlen > max_tokens:
        raise ValueError(f"This shape has {structure.max_seqlen} sparse tokens at {res}, more than the token "
                         f"budget of {max_tokens}; raise the budget if the GPU has the memory, or stop at 512.")
    if cond.batch_size != structure.batch_size:
        raise ValueError(f"The conditioning holds {cond.batch_size} image(s) but the structure {structure.batch_size} "
                         f"shape(s); use the same batch for both.")
    sample_flow = _function("flow_sampler", "sample_flow")
    key = "512" if res == 512 else "1024"
    dit = models.part(f"sparse_dit_{key}")
    cfg = getattr(models.config, f"sparse_dit_{key}")
    sched = getattr(models.config, f"sparse_scheduler_{key}")
    hint = "stop at 512, or lower the max token budget so large shapes are refused early"
    need = activation_bytes("sparse sampling", tokens=structure.num_tokens)
    with stage_guard(f"sparse {res} sampling", hint), models.placement.use([dit], need) as dev:
        st = structure.to(dev)
        noise = _noise([(n, cfg.in_channels) for n in st.counts], seed, dev, models.dtype)
        c, u = cond.tokens.to(dev), None
        if cfg.sparse_conditions:  # v1.0: only the tokens of patches under the mask, as a SparseTensor (SPEC.md §9.2)
            from .sparse.tensor import SparseTensor

            tokens, tcoords = _function("structure", "extract_tokens_and_coords")(c, cond.patch_mask.to(dev))
            c = SparseTensor(tokens, tcoords, cond.batch_size)
            u = c.replace(torch.zeros_like(tokens))
        if hasattr(dit, "plan"):
            dit.plan(st.sparse(noise))  # SSA block plan once, before the loop; memoised in the structure's cache

        def velocity(x, t, context):  # every step's SparseTensor shares the structure's cache
            out = dit(st.sparse(x), t.expand(st.batch_size), context)  # the sparse DiT takes t [B]
            return out.feats if hasattr(out, "feats") else out

        cb, check = _step_hooks(callback, should_stop)
        feats = sample_flow(velocity, noise, c, torch.zeros_like(c) if u is None else u, num_steps=steps,
                            guidance=guidance, shift=sched.shift, callback=cb, check_cancel=check)
    return SparseLatent(feats, st, seed)


def decode_sparse(models: Models, latent: SparseLatent, refine: bool = True, threshold: float = MC_THRESHOLD,
                  callback: Callback | None = None, should_stop: ShouldStop | None = None) -> Mesh:
    """Sparse SDF VAE decode, then the refiner (interior removal) or plain sparse marching cubes.

    Iso-levels follow the original: the 512 refiner meshes at 2 x threshold, the 1024 one at threshold.
    """
    checks.number("threshold", threshold, hint=" (0.2 matches the original)")
    res = latent.resolution
    key = "512" if res == 512 else "1024"
    vae = models.part(f"sparse_vae_{key}")
    hint = "turn the refiner off or stop at 512"
    _poll(should_stop)
    need = activation_bytes(f"sparse {key} decoding", latent.structure.batch_size, latent.structure.num_tokens)
    with stage_guard(f"sparse {res} decoding", hint), models.placement.use([vae], need) as dev:
        x = latent.structure.to(dev).sparse(latent.feats.to(dev, torch.float16 if vae.cfg.use_fp16 else torch.float32))
        out = vae.decode(x, return_feat=refine, check_cancel=lambda: _poll(should_stop))
    sdf, feat = out if isinstance(out, tuple) else (out, None)
    del out, x  # the refiner below consumes (empties) sdf and feat: no other reference may keep them alive
    _poll(should_stop)
    sdf_res = latent.structure.grid * 8  # 512 / 1024 official
    if refine:
        refiner = models.part(f"refiner_{key}")
        remove_interior = _function("refiner", "remove_interior")
        iso = 2 * threshold if res == 512 else threshold

        def progress(i, n):
            _poll(should_stop)
            if callback is not None:
                callback(i, n)

        with stage_guard(f"{res} refinement", hint), models.placement.use([refiner], need) as dev:
            sdf, feat = sdf.to(dev), None if feat is None else feat.to(dev)
            field_ = remove_interior(refiner, sdf, feat, iso, progress=progress, grid=_cube_grid(res, sdf_res),
                                     consume=True)
            items = _function("refiner", "mesh_refined_field")(field_, check_cancel=lambda: _poll(should_stop))
    else:
        to_mesh = _function("mesh.marching_cubes", "meshes_from_sparse_sdf")
        with stage_guard(f"{res} surface extraction", hint):
            items = to_mesh(sdf, sdf_res, threshold, check_cancel=lambda: _poll(should_stop))
    items = list(items)
    level = (2 * threshold if res == 512 else threshold) if refine else threshold
    fix = ("turn refine off, " if refine else "") + "try another seed or threshold"
    _check_surfaces(items, f"the {res} stage's {'refined ' if refine else ''}field has no surface at level {level:g}",
                    fix)
    info = {"variant": models.variant, "seed": latent.seed, "resolution": res, "refined": bool(refine)}
    return Mesh.from_list(items, res, info)


def _check_surfaces(items: list[tuple[torch.Tensor, torch.Tensor]], why: str, fix: str) -> None:
    """Stop where an empty mesh appears, in one sentence (downstream it only surfaces as an obscure error,
    e.g. core SaveGLB's "zero-size array to reduction operation")."""
    empty = [b for b, (_, f) in enumerate(items) if f.shape[0] == 0]
    if empty:
        which = f"Mesh {empty[0]}" if len(items) > 1 else "The mesh"
        raise ValueError(f"{which} is empty because {why}; {fix}.")


def _cube_grid(res: int, sdf_res: int):
    """The refiner's cube tiling, scaled down when the SDF grid is smaller than the official one (tiny-random)."""
    refiner = importlib.import_module(f"{__package__}.refiner")
    g = refiner.GRID_512 if res == 512 else refiner.GRID_1024_SIGN
    official = 512 if res == 512 else 1024
    if sdf_res == official:
        return g
    return refiner.CubeGrid(g.resolution * sdf_res // official, g.patch * sdf_res // official,
                            g.stride * sdf_res // official)


def mesh_to_structure(models: Models, mesh: Mesh, should_stop: ShouldStop | None = None) -> Structure:
    """Normalise each mesh (longest side to [-0.95, 0.95]) and voxelize it into the 1024 stage's latent index
    (SPEC.md §10.1-2: cells within 8/1024 of the surface, on the 128³ grid)."""
    to_index = _function("mesh.voxelize", "mesh_to_latent_index")
    cfg = models.config.sparse_dit_1024
    parts = []
    for b, (v, f) in enumerate(mesh.items()):  # host loop over batch items: one voxelization call each
        if f.shape[0] == 0:
            raise ValueError(f"Mesh {b} has no faces, so there is nothing to refine at 1024; check the 512 "
                             f"stage's output (another seed or threshold).")
        idx = to_index(v, f, resolution=cfg.resolution * 8, normalize=True, device=models.placement.device,
                       check_cancel=lambda: _poll(should_stop))
        idx = idx.to(torch.int32).cpu()  # [N_b, 4] (0, x, y, z) on the latent grid
        idx[:, 0] = b
        parts.append(idx)
    return make_structure(torch.cat(parts), 1024, cfg.resolution, cfg.selection_block_size)


def postprocess(mesh: Mesh, simplify: bool = True, simplify_ratio: float = SIMPLIFY_RATIO,
                fill_holes: bool = False, remove_debris: bool = False,
                should_stop: ShouldStop | None = None) -> Mesh:
    """Debris removal, hole filling and simplification per item (`simplify_ratio` = fraction of faces
    removed; the original's `remesh=True` is simplify with 0.95 and nothing else, SPEC.md §10.4)."""
    if not 0.0 <= simplify_ratio < 1.0:
        raise ValueError(f"simplify_ratio is the fraction of faces to remove and must be in [0, 1), got {simplify_ratio}.")
    post = _function("mesh.postprocess", "postprocess_mesh")
    if mesh.vertex_colors is not None:
        log.warning("Post-processing drops the vertex colours (the vertices change); colour the mesh afterwards.")
    items = []
    _check_surfaces(mesh.items(), "the mesh given to post-processing has no faces",
                    "connect a mesh with triangles")
    for v, f in mesh.items():  # host loop over batch items: mesh ops run per mesh
        _poll(should_stop)
        v, f, _ = post(v, f, remove_debris=remove_debris, close_holes=fill_holes,
                       simplify_ratio=simplify_ratio if simplify else None,
                       check_cancel=lambda: _poll(should_stop))
        items.append((v, f))
    _check_surfaces(items, "post-processing removed every face", "lower simplify_ratio or turn remove_debris off")
    return Mesh.from_list(items, mesh.resolution, mesh.info)


def save(mesh: Mesh, path: str | Path, metadata: dict | None = None, overwrite: bool = False) -> list[Path]:
    """Write each item atomically (complete temp file, then an exclusive link, or a rename over the old
    file with overwrite=True: the old file is never lost); the suffix picks the format (.glb .obj .ply .stl).

    B = 1 writes `path`; B > 1 writes `<stem>_0<suffix>`, `<stem>_1<suffix>`, ... GLB files carry
    `mesh.info` (variant, seed, resolution) and `metadata` in asset.extras.
    """
    save_mesh = _function("mesh.export", "save_mesh")
    _check_surfaces(mesh.items(), "it has no faces, so there is nothing to save", "check the stage that made it")
    path = Path(path)
    extras = {**mesh.info, **(metadata or {})}
    out = []
    for i, (v, f) in enumerate(mesh.items()):
        p = path if mesh.batch_size == 1 else path.with_name(f"{path.stem}_{i}{path.suffix}")
        out.append(Path(save_mesh(v, f, p, extras=extras, overwrite=overwrite, colors=mesh.item_colors(i))))
    return out


def image_to_mesh(models: Models, image: torch.Tensor, mask: torch.Tensor | None = None, seed: int = 0,
                  resolution: int = 1024, dense_steps: int = DENSE_STEPS, sparse_512_steps: int = SPARSE_512_STEPS,
                  sparse_1024_steps: int = SPARSE_1024_STEPS, guidance: float = GUIDANCE,
                  mc_threshold: float = MC_THRESHOLD, remove_interior: bool = True, remesh: bool = False,
                  simplify_ratio: float = SIMPLIFY_RATIO, max_tokens: int = 0, refine_512: bool = True,
                  callback: Callback | None = None, should_stop: ShouldStop | None = None) -> Mesh:
    """The official chain (SPEC.md §3.2). `callback(step, total)` counts the sampling steps of all stages.

    `refine_512=False` skips the 512 refiner (the original always runs it): much faster on a CPU, but the
    512 mesh keeps its inner shell, which the 1024 structure then also covers.
    """
    check_chain_settings(resolution, dense_steps, sparse_512_steps, sparse_1024_steps, guidance, mc_threshold,
                         max_tokens, simplify_ratio)
    total = dense_steps + sparse_512_steps + (sparse_1024_steps if resolution == 1024 else 0)

    def offset(k: int) -> Callback:
        return lambda i, n: callback(k + i, total) if callback is not None else None

    cond = encode_image(models, image, mask, should_stop)
    dense = sample_dense(models, cond, seed, dense_steps, guidance, offset(0), should_stop)
    structure = decode_dense(models, dense, DENSE_THRESHOLD, should_stop)
    latent = sample_sparse(models, cond, structure, seed, sparse_512_steps, guidance, 0, offset(dense_steps),
                           should_stop)
    mesh = decode_sparse(models, latent, refine_512, mc_threshold, None, should_stop)
    if resolution == 1024:
        structure = mesh_to_structure(models, mesh, should_stop)
        latent = sample_sparse(models, cond, structure, seed, sparse_1024_steps, guidance, max_tokens,
                               offset(dense_steps + sparse_512_steps), should_stop)
        mesh = decode_sparse(models, latent, remove_interior, mc_threshold, None, should_stop)
    if remesh:
        mesh = postprocess(mesh, True, simplify_ratio, should_stop=should_stop)
    return mesh
