"""A real headless ComfyUI loads the pack and runs example workflow (a) with tiny-random.

Runs only when COMFYUI_DIR points at a ComfyUI checkout (and COMFYUI_PYTHON, if needed, at an interpreter
with its requirements); see tools/comfyui_headless_check.py.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="set COMFYUI_DIR to a ComfyUI checkout to run it")
def test_headless_comfyui_runs_workflow_a():
    r = subprocess.run([sys.executable, str(REPO / "tools" / "comfyui_headless_check.py"), "--timeout", "900"],
                       capture_output=True, text=True, timeout=2000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "OK" in r.stdout.splitlines()[-1]
