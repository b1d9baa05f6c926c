"""ComfyUI adapters. Each module holds a few nodes; this file collects them.

ComfyUI with `comfy_api` (Aug 2025 on) gets V3 classes through `comfy_entrypoint`; older ComfyUI gets
V1 classes through `NODE_CLASS_MAPPINGS`. ComfyUI registers a module's `NODE_CLASS_MAPPINGS` if it
exists and then ignores `comfy_entrypoint` (COMFYUI.md §1.3), so `__all__` names only one of the two
and the pack's root `__init__.py` star-imports it. Without ComfyUI at all (tests, the CLI) the V1
mappings are built: they are plain classes and import nothing from ComfyUI.
"""

from __future__ import annotations

from ._spec import Node
from .colour import ColourFromImage
from .dense import DecodeDense, SampleDense
from .encode import EncodeImage
from .image_to_mesh import ImageToMesh
from .mesh import MeshToStructure, PostprocessMesh, SaveMesh
from .model import LoadModel
from .sparse import DecodeSparse, SampleSparse

NODES: list[type[Node]] = [
    LoadModel,
    EncodeImage,
    SampleDense,
    DecodeDense,
    SampleSparse,
    DecodeSparse,
    MeshToStructure,
    PostprocessMesh,
    SaveMesh,
    ImageToMesh,
    ColourFromImage,
]


def has_v3() -> bool:
    try:
        from comfy_api.latest import io  # noqa: F401
    except ImportError:
        return False
    return True


async def comfy_entrypoint():
    """The V3 extension; ComfyUI calls it when this module exports no NODE_CLASS_MAPPINGS."""
    from ._v3 import make_extension

    return make_extension(NODES)


def _v1_mappings() -> tuple[dict, dict]:
    from ._v1 import make_v1

    return {n.node_id: make_v1(n) for n in NODES}, {n.node_id: n.display_name for n in NODES}


if has_v3():
    __all__ = ["comfy_entrypoint"]
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = _v1_mappings()
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
