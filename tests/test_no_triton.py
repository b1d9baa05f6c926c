"""Without Triton (Windows without triton-windows, CPU-only installs) the pack still imports and runs: every
kernel falls back to its PyTorch reference. Each test runs a fresh Python with `import triton` blocked by
tools/without_triton.py (this process may have imported triton already), so nothing here needs a GPU.
"""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kernels import _common

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "tools" / "without_triton.py"


def _env(tmp_path):
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"))


def _python(code: str, tmp_path) -> subprocess.CompletedProcess:
    prelude = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); from tools.without_triton import block_triton; "
        "block_triton()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        cwd=REPO,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_imports_and_dispatch_without_triton(tmp_path):
    r = _python(
        """
import importlib.util, torch
try:
    import triton
    raise SystemExit("triton imported")
except ImportError:
    pass
# what torch's CUDA initialisation asks (a blocker that raised here broke torch.cuda, not our code)
assert importlib.util.find_spec("triton") is None
import s2core, s2core.pipeline, s2core.ssa, s2core.refiner, s2core.sparse_dit, s2core.mesh.voxelize
spec = importlib.util.spec_from_file_location("stub_loader", "tests/stubs/pack.py")
stubs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stubs)
assert len(stubs.load_pack(v3=False).NODE_CLASS_MAPPINGS) == 11  # the pack as ComfyUI imports it
from kernels import _common, ssa_compressed, ssa_selection, ssa_window, group_norm, layer_norm, voxelize
assert not _common.HAS_TRITON
x = torch.randn(1, 8, 3, 3, 3)
w, b = torch.ones(8), torch.zeros(8)
assert torch.equal(group_norm.group_norm_silu(x, w, b, 4), group_norm.group_norm_silu_reference(x, w, b, 4))
try:
    group_norm.group_norm_silu(x.half(), w, b, 4, backend="triton")
    raise SystemExit("backend='triton' ran without Triton")
except RuntimeError as e:
    print("ERR", e)
try:
    group_norm._stats_kernel[(1,)](x, x, 1, 1, TILE=16)
    raise SystemExit("a kernel launched without Triton")
except RuntimeError as e:
    print("ERR", e)
print("OK")
""",
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    errors = [line for line in r.stdout.splitlines() if line.startswith("ERR")]
    assert len(errors) == 2 and all("pip install triton-windows" in e for e in errors), r.stdout
    assert r.stdout.strip().endswith("OK")


def test_cli_demo_without_triton(tmp_path):
    """The suite's one run of the whole CLI demo (512 refiner included; its 27 cubes are most of a demo's time),
    so --deterministic is on too: on a CPU it only reroutes the sparse convolution, and this run shows the whole
    demo works in that mode as well as without Triton."""
    from PIL import Image, ImageDraw

    im = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    ImageDraw.Draw(im).ellipse((16, 10, 64, 72), fill=(200, 60, 40, 255))
    im.save(tmp_path / "object.png")
    out = tmp_path / "x.glb"
    r = subprocess.run(
        [
            sys.executable,
            str(RUNNER),
            "-m",
            "s2core",
            str(tmp_path / "object.png"),
            "--demo",
            "--deterministic",
            "-q",
            "--steps",
            "2,2,2",
            "-o",
            str(out),
        ],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    data = out.read_bytes()
    assert data[:4] == b"glTF" and struct.unpack("<I", data[8:12])[0] == len(data)
    gltf = json.loads(data[20 : 20 + struct.unpack("<I", data[12:16])[0]])
    assert gltf["meshes"] and gltf["accessors"][0]["count"] > 0


def test_tiny_chain_and_nodes_without_triton(tmp_path):
    # the existing chain tests, unchanged, in a process where Triton cannot be imported
    tests = [
        "tests/test_pipeline.py::test_chain_512_to_file",
        "tests/test_pipeline.py::test_stage_1024_from_structure",
        "tests/test_nodes.py::test_chain_of_separate_nodes_saves_glb",
        "tests/test_nodes.py::test_v3_execute_all_in_one_and_save",
    ]
    r = subprocess.run(
        [sys.executable, str(RUNNER), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=REPO,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert f"{len(tests)} passed" in r.stdout


def test_cuda_fallback_logs_once(monkeypatch, caplog):
    # what a CUDA tensor meets without Triton: the reference, and one warning per process saying how to get it
    monkeypatch.setattr(_common, "HAS_TRITON", False)
    _common._warn_reference_on_cuda.cache_clear()
    x = SimpleNamespace(is_cuda=True, dtype=torch.float16)
    with caplog.at_level("WARNING"):
        assert not _common.use_triton("auto", x) and not _common.use_triton("auto", x)
    notes = [r.getMessage() for r in caplog.records if r.name == _common.__name__]
    assert len(notes) == 1 and "slower" in notes[0] and "pip install triton-windows" in notes[0]
    _common._warn_reference_on_cuda.cache_clear()
    with pytest.raises(RuntimeError, match="pip install triton"):
        _common.use_triton("triton", x)
    assert not _common.use_triton("reference", x)
