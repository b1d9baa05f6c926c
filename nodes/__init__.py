"""ComfyUI adapters. Each module holds a few nodes; this file collects them.

With ComfyUI's V3 API present, `comfy_entrypoint` returns the extension and NODE_CLASS_MAPPINGS stays
empty (ComfyUI ignores `comfy_entrypoint` when mappings are exported, COMFYUI.md §1.3). Without
`comfy_api` (old ComfyUI, or no ComfyUI at all) the mappings are filled from the V1 fallback, which is
empty when ComfyUI itself is absent.
"""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}


async def comfy_entrypoint():
    """Return the V3 extension; only called by ComfyUI versions that have `comfy_api`."""
    raise RuntimeError("The Direct3D-S2 nodes are not available yet in this version of the pack.")
