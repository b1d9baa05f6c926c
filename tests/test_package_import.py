"""The pack's root __init__.py imports without ComfyUI, the way ComfyUI loads a custom node folder."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_root_init_imports_without_comfyui():
    assert importlib.util.find_spec("comfy") is None, "this test needs an environment without ComfyUI"
    name = "ComfyUI-Direct3D-S2-under-test"
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
        assert isinstance(mod.NODE_CLASS_MAPPINGS, dict)
        assert isinstance(mod.NODE_DISPLAY_NAME_MAPPINGS, dict)
    finally:
        for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[k]
