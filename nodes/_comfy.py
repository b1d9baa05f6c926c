"""The few ComfyUI services the nodes use, imported lazily (this package must import without ComfyUI).

Progress goes to `comfy.utils.ProgressBar`, Cancel is polled with
`comfy.model_management.throw_exception_if_processing_interrupted`, weights are placed with
ModelPatcher + `load_models_gpu` (so ComfyUI can evict them for other models), outputs move to
`intermediate_device()`, and our weights live in `models/direct3d_s2/` (COMFYUI.md §4-6).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from ..s2core import pipeline

FOLDER = "direct3d_s2"


def model_management():
    import comfy.model_management

    return comfy.model_management


def should_stop() -> bool:
    """Raises ComfyUI's InterruptProcessingException after the user pressed Cancel."""
    model_management().throw_exception_if_processing_interrupted()
    return False


def progress(total: int):
    """A `callback(step, total)` that drives this node's progress bar and polls Cancel."""
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)

    def callback(step: int, n: int) -> None:
        bar.update_absolute(step, n)
        should_stop()

    return callback


def intermediate_device() -> torch.device:
    return torch.device(model_management().intermediate_device())


def compute_device() -> torch.device:
    return torch.device(model_management().get_torch_device())


def models_dir() -> str:
    """`models/direct3d_s2` (registered once; extra_model_paths.yaml entries come first)."""
    import folder_paths

    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
    return folder_paths.get_folder_paths(FOLDER)[0]


def disable_metadata() -> bool:
    try:
        from comfy.cli_args import args
    except ImportError:
        return False
    return bool(getattr(args, "disable_metadata", False))


def output_path(prefix: str) -> tuple[str, str, int, str]:
    """(folder, file stem, first counter, subfolder) under ComfyUI's output folder, as SaveGLB does."""
    import folder_paths

    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, folder_paths.get_output_directory())
    return folder, name, counter, subfolder


class ComfyPlacement(pipeline.Placement):
    """Each model is a ModelPatcher; a stage asks `load_models_gpu` for its models and runs where they landed."""

    def __init__(self):
        mm = model_management()
        super().__init__(mm.get_torch_device())
        self._patchers: dict[int, object] = {}

    def patcher(self, module: torch.nn.Module):
        import comfy.model_patcher

        key = id(module)
        if key not in self._patchers:
            mm = model_management()
            self._patchers[key] = comfy.model_patcher.ModelPatcher(
                module, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device(),
                size=mm.module_size(module))
        return self._patchers[key]

    @contextlib.contextmanager
    def use(self, modules: list[torch.nn.Module], activations: int = 0) -> Iterator[torch.device]:
        patchers = [self.patcher(m) for m in modules]
        mm = model_management()
        # memory_required: the stage's activations beyond the weights, so ComfyUI evicts other models (an
        # image checkpoint of the same workflow) until they fit, as its own samplers ask
        mm.load_models_gpu(patchers, memory_required=activations)
        try:
            yield torch.device(patchers[0].load_device)
        finally:  # after each stage, also when cancelled or out of memory: give cached blocks back
            mm.soft_empty_cache()


class ComfyMesh:
    """ComfyUI's MESH layout (`vertices [B, N, 3]`, `faces [B, M, 3]`, zero-padded to a common N/M, with
    `vertex_counts`/`face_counts`), plus `info` (seed, resolution, variant) for provenance."""

    def __init__(self, vertices, faces, vertex_counts=None, face_counts=None, info=None):
        self.vertices = vertices
        self.faces = faces
        self.vertex_counts = vertex_counts
        self.face_counts = face_counts
        self.info = info or {}


def to_comfy_mesh(mesh: pipeline.Mesh):
    """Our packed Mesh -> ComfyUI MESH on the intermediate device (core SaveGLB / Preview accept it)."""
    mesh = mesh.to(intermediate_device())
    items = mesh.items()
    nv, nf = max(mesh.vertex_counts, default=0), max(mesh.face_counts, default=0)
    verts = torch.zeros(len(items), nv, 3, dtype=torch.float32)
    faces = torch.zeros(len(items), nf, 3, dtype=torch.int64)
    for b, (v, f) in enumerate(items):  # host loop over batch items: padding for ComfyUI's batched layout
        verts[b, :v.shape[0]] = v
        faces[b, :f.shape[0]] = f
    counts = (torch.tensor(mesh.vertex_counts), torch.tensor(mesh.face_counts))
    out = ComfyMesh(verts, faces, *counts, info=dict(mesh.info))
    if mesh.vertex_colors is not None:  # core MESH's optional per-vertex RGB, padded like the vertices
        out.vertex_colors = torch.zeros(len(items), nv, 3)
        for b in range(len(items)):
            out.vertex_colors[b, :mesh.vertex_counts[b]] = mesh.item_colors(b).float().cpu()
    return out


def from_comfy_mesh(mesh) -> pipeline.Mesh:
    """Any ComfyUI MESH (ours or core's: `.vertices [B, N, 3]`, `.faces [B, M, 3]`) -> our packed Mesh."""
    verts, faces = mesh.vertices, mesh.faces
    if verts.ndim == 2:
        verts, faces = verts[None], faces[None]
    b = verts.shape[0]
    vc = getattr(mesh, "vertex_counts", None)
    fc = getattr(mesh, "face_counts", None)
    vc = [int(x) for x in vc] if vc is not None else [verts.shape[1]] * b
    fc = [int(x) for x in fc] if fc is not None else [faces.shape[1]] * b
    items = [(verts[i, :vc[i]].float().cpu(), faces[i, :fc[i]].long().cpu()) for i in range(b)]
    colors = getattr(mesh, "vertex_colors", None)
    if colors is not None:
        colors = colors if colors.ndim == 3 else colors[None]
        colors = [colors[i, :vc[i], :3].float().cpu() for i in range(b)]
    return pipeline.Mesh.from_list(items, info=dict(getattr(mesh, "info", {}) or {}), colors=colors)


def download_progress_class():
    """A tqdm class for huggingface_hub downloads that also moves the node's progress bar (None without tqdm)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    import comfy.utils

    class _ProgressTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            super().__init__(*args, **kwargs)
            self._bar = comfy.utils.ProgressBar(max(1, int(self.total or 1)))

        def update(self, n=1):
            out = super().update(n)
            self._bar.update_absolute(int(self.n), int(self.total or 0) or None)
            return out

    return _ProgressTqdm
