"""`python -m s2core`: the demo writes a valid GLB, missing weights print which files to put where,
Ctrl-C and errors leave no file behind."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from s2core import cli

REPO = Path(__file__).resolve().parents[1]
# The shortest demo chain (512 without its refiner, 2 steps a stage) for tests of what happens around it.
FAST = ["--resolution", "512", "--no-refine-512", "--steps", "2,2,2"]


@pytest.fixture
def png(tmp_path):
    from PIL import Image, ImageDraw

    im = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    ImageDraw.Draw(im).ellipse((16, 10, 64, 72), fill=(200, 60, 40, 255))
    p = tmp_path / "object.png"
    im.save(p)
    return p


def _env(tmp_path, **extra):
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"), **extra)


def test_demo_writes_valid_glb(png, tmp_path):
    """The demo at its default steps, without the 512 refiner (its 27 cubes are most of the demo's time); the
    whole demo, refiner included, runs in tests/test_no_triton.py::test_cli_demo_without_triton."""
    out = tmp_path / "out.glb"
    r = subprocess.run(
        [sys.executable, "-m", "s2core", str(png), "--demo", "--no-refine-512", "-o", str(out)],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "meaningless" in r.stderr and "50/80 steps" not in r.stdout  # progress goes to stderr, not stdout
    data = out.read_bytes()
    assert data[:4] == b"glTF" and struct.unpack("<I", data[8:12])[0] == len(data)
    n = struct.unpack("<I", data[12:16])[0]
    gltf = json.loads(data[20 : 20 + n])
    assert gltf["asset"]["extras"]["variant"] == "tiny-random" and gltf["meshes"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".glb") == ["out.glb"]


def test_offline_without_weights_says_which_files(png, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "s2core",
            str(png),
            "-o",
            str(tmp_path / "m.glb"),
            "--weights",
            str(weights),
            "--resolution",
            "512",
        ],
        cwd=tmp_path,
        env=_env(tmp_path, HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == cli.EXIT_MISSING_WEIGHTS
    for name in ("model_dense.ckpt", "model_sparse_512.ckpt", "model_refiner.ckpt", "dinov2_vitl14_reg4_pretrain.pth"):
        assert name in r.stderr
    assert "GB" in r.stderr and "model_sparse_1024.ckpt" not in r.stderr  # only what a 512 run needs
    assert not (tmp_path / "m.glb").exists()


def test_ctrl_c_while_writing_leaves_no_file(png, tmp_path, monkeypatch):
    from s2core.mesh import export

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(export.os, "fsync", interrupted)  # Ctrl-C arrives mid-write
    out = tmp_path / "o" / "x.glb"
    rc = cli.main([str(png), "--demo", "-q", "-o", str(out), *FAST])
    assert rc == cli.EXIT_INTERRUPTED
    assert not out.exists() and not any(p.is_file() for p in tmp_path.joinpath("o").rglob("*"))


def test_refuses_to_overwrite_and_bad_arguments(png, tmp_path, capsys):
    out = tmp_path / "exists.glb"
    out.write_bytes(b"keep")
    assert cli.main([str(png), "--demo", "-o", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep"
    assert cli.main([str(png), "--demo", "-o", str(tmp_path / "x.fbx")]) == 1
    assert cli.main([str(png), "--demo", "-o", str(tmp_path / "y.glb"), "--steps", "5,5"]) == 1
    assert "--steps takes three whole numbers" in capsys.readouterr().err
    assert cli.main([str(tmp_path / "nope.png"), "--demo", "-o", str(tmp_path / "z.glb")]) != 0


def test_deterministic_flag_turns_on_deterministic_algorithms(png, tmp_path, monkeypatch):
    """--deterministic switches PyTorch to deterministic algorithms (and cuBLAS's workspace setting)
    before any work; the demo chain still writes its mesh (the whole demo in that mode, refiner included:
    tests/test_no_triton.py::test_cli_demo_without_triton)."""
    import torch

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = {}
    real = cli.pipeline.image_to_mesh

    def spy(*a, **k):
        seen["deterministic"] = torch.are_deterministic_algorithms_enabled()
        seen["cublas"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        return real(*a, **k)

    monkeypatch.setattr(cli.pipeline, "image_to_mesh", spy)
    out = tmp_path / "out.glb"
    try:
        assert cli.main([str(png), "--demo", "--deterministic", "-q", *FAST, "-o", str(out)]) == 0
    finally:
        torch.use_deterministic_algorithms(False)
    assert seen == {"deterministic": True, "cublas": ":4096:8"}
    assert out.is_file() and out.stat().st_size > 0
