"""The layers' import rules, read from the source with `ast` (nothing is imported for the static checks).

    nodes/   ComfyUI adapters: s2core only relatively (`from ..s2core import pipeline`), since ComfyUI has its
             own top-level `nodes` and the pack is imported as a package there.
    s2core/  framework-free: never ComfyUI (comfy, comfy_api, comfy_extras, folder_paths, server), never nodes;
             kernels only through `s2core/_kernels.py`; no importlib or `__import__` (every call is followable).
    kernels/ Triton + references: never s2core or nodes; its own modules relatively.

A relative import is resolved against the file's package; one that climbs above `s2core/` or `kernels/` lands in
the pack (the repository root), named here without a prefix (`from ..kernels import x` in s2core -> `kernels`).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("nodes", "s2core", "kernels")
COMFY = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "execution"}
KERNELS_DOOR = "s2core/_kernels.py"  # the one s2core module that imports the kernels package


def imports(relpath: str, source: str):
    """(target, line, relative) for every import of the file at `relpath` (e.g. "s2core/mesh/export.py");
    target is a dotted name from the repository root (`s2core.results`, `kernels.raster`, `torch`)."""
    package = relpath.split("/")[:-1]  # s2core/mesh/export.py -> [s2core, mesh]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, False) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                up = package[: len(package) - (node.level - 1)] if node.level - 1 <= len(package) else []
                base = ".".join(up + ([node.module] if node.module else []))
            # `from . import x` / `from .. import kernels`: the names are modules too
            names = [f"{base}.{a.name}" if base else a.name for a in node.names] if not node.module else [base]
            out += [(n, node.lineno, node.level > 0) for n in names]
    return out


def dynamic_imports(source: str):
    """Lines that import by string: `importlib` in any form, `__import__(...)`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "importlib" for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "importlib":
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__":
            lines.append(node.lineno)
    return lines


def violations(relpath: str, source: str) -> list[str]:
    layer = relpath.split("/")[0]
    bad = []
    for target, line, relative in imports(relpath, source):
        top = target.split(".")[0]
        where = f"{relpath}:{line} imports {target}"
        if layer == "kernels" and top in ("s2core", "nodes"):
            bad.append(f"{where}: kernels/ must not import s2core or nodes")
        if layer == "kernels" and top == "kernels" and not relative:
            bad.append(f"{where}: inside kernels/ import relatively (from ._common import ...)")
        if layer == "s2core" and (top in COMFY or top == "nodes"):
            bad.append(f"{where}: s2core/ must not import ComfyUI or nodes")
        if layer == "s2core" and top == "kernels" and relpath != KERNELS_DOOR:
            bad.append(f"{where}: s2core/ reaches kernels only through {KERNELS_DOOR} (from ._kernels import ...)")
        if layer == "nodes" and top in ("s2core", "kernels") and not relative:
            bad.append(f"{where}: nodes/ imports the pack relatively (from ..s2core import ...)")
    if layer == "s2core":
        bad += [
            f"{relpath}:{line}: s2core/ imports by string (importlib/__import__)" for line in dynamic_imports(source)
        ]
    return bad


def layer_files():
    return sorted(p for layer in LAYERS for p in (REPO / layer).rglob("*.py"))


def test_every_layer_keeps_its_import_rules():
    files = layer_files()
    assert len(files) > 40  # the walk found the tree
    bad = [v for p in files for v in violations(p.relative_to(REPO).as_posix(), p.read_text(encoding="utf-8"))]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "relpath,source",
    [
        ("kernels/raster.py", "from s2core.results import Mesh\n"),
        ("kernels/raster.py", "from ..s2core import results\n"),
        ("kernels/ssa_window.py", "from kernels._common import tl\n"),
        ("s2core/pipeline.py", "import folder_paths\n"),
        ("s2core/mesh/export.py", "from comfy_api.latest import io\n"),
        ("s2core/pipeline.py", "from ..nodes import _comfy\n"),
        ("s2core/ssa.py", "from ..kernels import ssa_window\n"),
        ("s2core/ssa.py", "import kernels.ssa_window\n"),
        ("s2core/pipeline.py", "import importlib\n"),
        ("s2core/pipeline.py", "def f():\n    from importlib import import_module\n"),
        ("s2core/pipeline.py", "x = __import__('s2core.refiner')\n"),
        ("nodes/dense.py", "from s2core import pipeline\n"),
        ("nodes/dense.py", "import kernels\n"),
    ],
    ids=lambda v: v.replace("/", "_").replace("\n", " ").strip()[:40],
)
def test_a_planted_violation_is_caught(relpath, source):
    assert violations(relpath, source)


def test_the_allowed_forms_pass():
    assert not violations("s2core/ssa.py", "from ._kernels import ssa_window as _win\n")
    assert not violations("s2core/colour/camera.py", "from .._kernels import raster\nfrom ..hooks import poll\n")
    assert not violations(
        KERNELS_DOOR, "try:\n    from ..kernels import raster\nexcept ImportError:\n    from kernels import raster\n"
    )
    assert not violations("nodes/dense.py", "from ..s2core import pipeline\nfrom . import _comfy\nimport comfy.utils\n")
    assert not violations("kernels/ssa_window.py", "from ._common import tl, triton\nimport torch\n")


PACKAGE_MODE = """
import importlib, importlib.util, pkgutil, sys
spec = importlib.util.spec_from_file_location("stub_loader", {pack!r})
loader = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loader)
pack = loader.load_pack(v3=False)
s2core = importlib.import_module(loader.NAME + ".s2core")
for m in pkgutil.walk_packages(s2core.__path__, s2core.__name__ + "."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
tops = sorted(k for k in sys.modules if k.split(".")[0] in ("kernels", "s2core", "nodes"))
assert not tops, tops  # a pip package named `kernels` (or anything else top-level) could have been picked up
assert loader.NAME + ".kernels.ssa_window" in sys.modules
print("ok")
"""


def test_inside_comfyui_the_pack_uses_its_own_kernels_package():
    """Loaded as ComfyUI loads it (a package from the repository root), every s2core module imports and the
    kernels come from `<pack>.kernels`, never a top-level `kernels` (HuggingFace ships a pip package of that name)."""
    code = PACKAGE_MODE.format(pack=str(REPO / "tests" / "stubs" / "pack.py"))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO / "tests" / "stubs", capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


MAX_LINES = 450  # a product module is read in one sitting (CONTRIBUTING.md)


def test_product_modules_stay_short():
    files = [p for layer in LAYERS for p in (REPO / layer).rglob("*.py")]
    assert len(files) > 40, "the layers' modules were not found"
    long = {str(p.relative_to(REPO)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"
