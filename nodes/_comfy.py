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

from ..s2core import loading, results
from . import _mesh

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


class ComfyPlacement(loading.Placement):
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
                module,
                load_device=mm.get_torch_device(),
                offload_device=mm.unet_offload_device(),
                size=mm.module_size(module),
            )
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


def to_comfy_mesh(mesh: results.Mesh, **fields):
    """Our packed Mesh -> ComfyUI MESH (`nodes/_mesh.py`, `fields`: uvs, texture) on the intermediate device."""
    return _mesh.to_comfy_mesh(mesh.to(intermediate_device()), **fields)


from_comfy_mesh = _mesh.from_comfy_mesh  # any ComfyUI MESH -> our packed Mesh
item_uvs = _mesh.item_uvs  # its per-item UVs, or None


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
            should_stop()  # Cancel stops a multi-GB download (find_weights._from_hub lets it through)
            return out

    return _ProgressTqdm
