"""Import the node pack the way ComfyUI does (a package from the repo root), with the stubs on sys.path.

`load_pack(v3=False)` → the pack module (`d3ds2_pack`), with `NODE_CLASS_MAPPINGS` (V1 path);
`load_pack(v3=True)` → the same with the `comfy_api` stub, so it exports `comfy_entrypoint` only.
`unload()` removes the pack and the stubs from `sys.modules` and `sys.path`.
"""

import importlib.util
import sys
from pathlib import Path

STUBS = Path(__file__).resolve().parent
REPO = STUBS.parents[1]
NAME = "d3ds2_pack"
_STUB_MODULES = ("comfy", "comfy_api", "folder_paths")


def unload() -> None:
    for k in list(sys.modules):
        if k == NAME or k.startswith(NAME + ".") or k.split(".")[0] in _STUB_MODULES:
            del sys.modules[k]
    for p in (str(STUBS / "base"), str(STUBS / "v3")):
        while p in sys.path:
            sys.path.remove(p)


def load_pack(v3: bool = False):
    unload()
    sys.path.insert(0, str(STUBS / "base"))
    if v3:
        sys.path.insert(0, str(STUBS / "v3"))
    spec = importlib.util.spec_from_file_location(NAME, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    spec.loader.exec_module(module)
    return module


def run_node(pack, node_id: str, **kwargs):
    """Call a V1 node of the loaded pack as ComfyUI does: a new instance's FUNCTION with the inputs as keywords."""
    cls = pack.NODE_CLASS_MAPPINGS[node_id]
    return getattr(cls(), cls.FUNCTION)(**kwargs)
