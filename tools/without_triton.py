"""Run Python as on a machine without Triton (Windows without triton-windows, CPU-only installs): every
`import triton` fails, so the node pack runs its PyTorch references.

    python tools/without_triton.py -m s2core picture.png --demo -o x.glb
    python tools/without_triton.py -m pytest -q tests
    python tools/without_triton.py bench/e2e.py --tiny

`block_triton()` installs the same import hook inside a process; call it before anything imports triton
(tests/test_no_triton.py and bench/no_triton.py use it). Subprocesses that the command starts are not blocked.
"""

from __future__ import annotations

import importlib.abc
import os
import runpy
import sys


class TritonBlocker(importlib.abc.MetaPathFinder):
    """First on sys.meta_path: `triton` and its submodules are not found, as if not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by tools/without_triton.py)", name=name)
        return None


# `importlib.util.find_spec("triton")` must answer None, as on a machine without Triton: torch's CUDA
# initialisation asks it that way and fails on an exception. A None in sys.modules gives exactly that, and
# makes `import triton` raise ModuleNotFoundError; the finder above still stops `triton.*` submodules.


def block_triton() -> None:
    """Make `import triton` fail in this process from now on (idempotent)."""
    if any(type(f).__name__ == "TritonBlocker" for f in sys.meta_path):
        return
    if "triton" in sys.modules:
        raise RuntimeError(
            "triton is already imported in this process; block it before importing anything that "
            "imports it (kernels, s2core, torch._inductor)"
        )
    sys.meta_path.insert(0, TritonBlocker())
    sys.modules["triton"] = None


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    block_triton()
    if argv[0] == "-m" and len(argv) > 1:  # like `python -m`: the current directory first on sys.path
        sys.argv = argv[1:]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:  # like `python script.py`: the script's folder first on sys.path
        sys.argv = argv
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
