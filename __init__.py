"""ComfyUI entry point of the Direct3D-S2 node pack.

ComfyUI imports this file as a package. Newer ComfyUI (with `comfy_api`) gets the V3 extension through
`comfy_entrypoint`; older ComfyUI gets the same classes through `NODE_CLASS_MAPPINGS`. Importing it
without ComfyUI installed (tests, the CLI) must not fail: then the mappings are simply empty.
No import-time work: no downloads, no kernel probing, no GPU.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, comfy_entrypoint  # noqa: F401

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "comfy_entrypoint"]
