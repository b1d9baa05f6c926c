"""ComfyUI entry point of the Direct3D-S2 node pack.

ComfyUI imports this file as a package. Newer ComfyUI (with `comfy_api`) gets the V3 extension through
`comfy_entrypoint`; older ComfyUI gets the same nodes through `NODE_CLASS_MAPPINGS`. `nodes.__all__`
names exactly one of the two, because ComfyUI ignores `comfy_entrypoint` when mappings exist.
Importing it without ComfyUI installed (tests, the CLI) must not fail.
No import-time work: no downloads, no kernel probing, no GPU.
"""

if __package__:
    from .nodes import *  # noqa: F401,F403
    from .nodes import __all__  # noqa: F401
else:
    # Imported as a plain module, not as a package: pytest does this when it collects the repo root
    # (it holds this __init__.py) from a folder whose name is not a Python identifier. No nodes then.
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
