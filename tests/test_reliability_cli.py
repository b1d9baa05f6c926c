"""The CLI probes of issue 19 (items 2-4): every failure is one line on stderr (no traceback), with the right exit
status, no temp file, no lost file and no accepted non-finite value. The chain itself is replaced by a
tetrahedron (`fast` fixture) so each probe takes well under a second; the real chain is covered by test_cli.py."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from s2core import cli, files, loading, pipeline, results

REPO = Path(__file__).resolve().parents[1]
TETRA = ([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])


@pytest.fixture
def fast(monkeypatch):
    """load_models / image_to_mesh replaced: records the image, mask and settings the CLI passed."""
    seen = {}

    def load_models(*a, **k):
        seen["loaded"] = True

    def image_to_mesh(models, image, mask, *a, **k):
        seen.update(image=image, mask=mask, args=a)
        return results.Mesh.from_list([(torch.tensor(TETRA[0]), torch.tensor(TETRA[1]))], 512)

    monkeypatch.setattr(loading, "load_models", load_models)
    monkeypatch.setattr(pipeline, "image_to_mesh", image_to_mesh)
    return seen


@pytest.fixture
def png(tmp_path):
    im = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    im.paste((200, 60, 40, 255), (16, 8, 48, 40))
    im.save(tmp_path / "in.png")
    return tmp_path / "in.png"


def run(argv, capsys) -> tuple[int, str]:
    rc = cli.main([str(a) for a in argv] + ["-q"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err.strip()


def one_line(err: str) -> str:
    assert err.count("\n") == 0, err
    return err


def tmp_left(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*.tmp")]


def test_overwrite_with_disk_full_or_ctrl_c_keeps_the_old_file(png, tmp_path, fast, monkeypatch, capsys):
    out = tmp_path / "m.glb"
    out.write_bytes(b"old mesh")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    rc, err = run([png, "-o", out, "--overwrite"], capsys)
    assert (
        rc == 1
        and one_line(err)
        == f"error: Could not write {out}: the disk is full (or the quota used up); "
        "free some space or choose another folder."
    )
    assert out.read_bytes() == b"old mesh" and not tmp_left(tmp_path)

    def ctrl_c(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "fsync", ctrl_c)
    rc, err = run([png, "-o", out, "--overwrite"], capsys)
    assert rc == cli.EXIT_INTERRUPTED and one_line(err) == "Interrupted; nothing was written."
    assert out.read_bytes() == b"old mesh" and not tmp_left(tmp_path)
    monkeypatch.undo()


@pytest.mark.parametrize(
    "sig, code, word",
    [(signal.SIGTERM, cli.EXIT_TERMINATED, "Terminated"), (signal.SIGINT, cli.EXIT_INTERRUPTED, "Interrupted")],
    ids=["SIGTERM", "SIGINT"],
)
def test_signal_while_writing_removes_the_temp_file(png, tmp_path, fast, monkeypatch, capsys, sig, code, word):
    """A real signal to this process while the temp file is being written: the exit status of the signal, one
    line, no file, no temp file; and the handlers that were there before are back afterwards."""
    # a shell starts background jobs with SIGINT ignored, and the CLI rightly leaves an ignored signal alone:
    # this test needs a foreground process's handlers, so it sets them and puts the inherited ones back after
    inherited = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _signal_while_writing(png, tmp_path, monkeypatch, capsys, sig, code, word)
    finally:
        signal.signal(signal.SIGTERM, inherited[0])
        signal.signal(signal.SIGINT, inherited[1])


def _signal_while_writing(png, tmp_path, monkeypatch, capsys, sig, code, word):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    real_fsync = os.fsync

    def signalled(fd):
        real_fsync(fd)
        assert len(tmp_left(tmp_path)) == 1
        os.kill(os.getpid(), sig)
        # Python runs the handler at the main thread's next eval-breaker check (a loop's back edge, say), not
        # necessarily before the next line: wait in a loop, or the AssertionError can win the race
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pass
        raise AssertionError("the signal did not stop the write")

    monkeypatch.setattr(files.os, "fsync", signalled)
    out = tmp_path / "o" / "m.glb"
    rc, err = run([png, "-o", out], capsys)
    assert rc == code and one_line(err) == f"{word}; nothing was written."
    assert not out.exists() and not tmp_left(tmp_path)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_an_ignored_sigint_stays_ignored(png, tmp_path, fast, capsys):
    """A run started in the background (`cmd &`, nohup: SIGINT ignored) is not made interruptible by the CLI."""
    inherited = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rc, _ = run([png, "-o", tmp_path / "m.glb"], capsys)
        assert rc == 0 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_ctrl_c_during_start_up_exits_130_with_one_line(tmp_path):
    """Ctrl-C while `python -m s2core` imports torch (simulated by an import hook that raises it there)."""
    script = """
import runpy, sys
class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
sys.meta_path.insert(0, CtrlC())
sys.argv = ["s2core", "x.png", "-o", "m.glb"]
runpy.run_module("s2core", run_name="__main__")
"""
    r = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert r.returncode == 130 and r.stderr.strip() == "Interrupted while starting; nothing was written.", r.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_outputs_are_refused_before_any_work(png, tmp_path, fast, monkeypatch, capsys):
    (tmp_path / "dir.glb").mkdir()
    (tmp_path / "file").write_bytes(b"")
    (tmp_path / "kept.glb").write_bytes(b"kept")
    long = tmp_path / ("n" * 300 + ".glb")
    cases = [
        ([png, "-o", tmp_path / "dir.glb"], "is a folder, not a file; give a file name inside it"),
        ([png, "-o", tmp_path / "dir.glb", "--overwrite"], "is a folder, not a file"),
        ([png, "-o", tmp_path / "file" / "m.glb"], "part of its folder path is a file, not a folder"),
        ([png, "-o", long], "is 304 bytes long, more than the file system allows"),
        ([png, "-o", tmp_path / "kept.glb"], "kept.glb already exists; pass --overwrite or choose another name."),
        ([png, "-o", tmp_path / "m.fbx"], "The output must end in .glb, .obj, .ply or .stl, got m.fbx."),
    ]
    for argv, words in cases:
        rc, err = run(argv, capsys)
        assert rc == 1 and words in one_line(err), (argv[-1], err)
    assert "loaded" not in fast and (tmp_path / "kept.glb").read_bytes() == b"kept"

    # a read-only file system (root ignores chmod, so the flag statvfs reports is simulated)
    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(cli.os, "statvfs", lambda p: ReadOnly())
    rc, err = run([png, "-o", tmp_path / "ro" / "m.glb"], capsys)
    assert (
        rc == 1
        and one_line(err)
        == f"error: Could not write {tmp_path / 'ro' / 'm.glb'}: {tmp_path / 'ro'} is "
        "on a read-only file system; choose another folder."
    )
    assert "loaded" not in fast and not (tmp_path / "ro").exists()


def test_read_only_at_write_time_is_one_line(png, tmp_path, fast, monkeypatch, capsys):
    """The file system turns read-only during the run (the early check passed): still one line, no temp."""
    real_open = os.open

    def erofs(path, *a, **k):
        if str(path).endswith(".tmp"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(files.os, "open", erofs)
    rc, err = run([png, "-o", tmp_path / "m.glb"], capsys)
    assert rc == 1 and "is on a read-only file system; choose another folder." in one_line(err)
    assert not tmp_left(tmp_path) and not (tmp_path / "m.glb").exists()


def _broken(tmp_path: Path, name: str) -> Path:
    good = tmp_path / "good.png"
    Image.new("L", (64, 48), 255).save(good)
    data = good.read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    return tmp_path / name


def test_bad_image_and_mask_files_are_one_line(png, tmp_path, fast, monkeypatch, capsys):
    broken = _broken(tmp_path, "broken.png")
    (tmp_path / "folder.png").mkdir()
    cases = [
        ([broken, "-o", tmp_path / "a.glb"], f"error: The image {broken} is damaged or incomplete (PIL: "),
        ([png, "--mask", broken, "-o", tmp_path / "b.glb"], f"error: The mask {broken} is damaged or incomplete"),
        ([tmp_path / "folder.png", "-o", tmp_path / "c.glb"], "is a folder; give the path of an image file inside it."),
        ([tmp_path / "none.png", "-o", tmp_path / "d.glb"], "does not exist; give the path of an image file."),
        ([REPO / "README.md", "-o", tmp_path / "e.glb"], "is not an image file PIL can read; use a PNG or JPEG."),
    ]
    for argv, words in cases:
        rc, err = run(argv, capsys)
        assert rc == 1 and words in one_line(err), err
    # over PIL's decompression-bomb limit (lowered here so the test image stays small): refused, no PIL warning
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    rc, err = run([png, "-o", tmp_path / "f.glb"], capsys)
    assert rc == 1 and "has more than 134,217,728 pixels" in one_line(err) and "Warning" not in err
    assert "loaded" not in fast and not [p for p in tmp_path.iterdir() if p.suffix == ".glb"]


def test_sixteen_bit_mask_is_scaled_not_emptied(png, tmp_path, fast, capsys):
    """A 16-bit grey PNG mask (mode I;16): 65535 is full object, 32768 half; clipping made 300 → 255 and
    a mask saved with values up to 255 (of 65535) empty-looking."""
    m = np.zeros((48, 64), np.uint16)
    m[8:40, 16:48] = 65535
    m[0, 0] = 32768
    Image.fromarray(m).save(tmp_path / "m16.png")
    assert Image.open(tmp_path / "m16.png").mode == "I;16"
    rc, err = run([png, "--mask", tmp_path / "m16.png", "-o", tmp_path / "m.glb"], capsys)
    assert rc == 0, err
    mask = fast["mask"]
    assert mask.shape == (1, 48, 64) and mask[0, 20, 20] == 1.0 and mask[0, 47, 63] == 0.0
    assert abs(mask[0, 0, 0].item() - 0.5) < 1 / 255


@pytest.mark.parametrize(
    "flag, value, words",
    [
        ("--guidance", "inf", "guidance must be a finite number at least 0 (7 matches the original), got inf."),
        ("--guidance", "nan", "guidance must be a finite number at least 0"),
        ("--guidance", "-1", "guidance must be a finite number at least 0"),
        ("--mc-threshold", "nan", "mc_threshold must be a finite number (0.2 matches the original), got nan."),
        ("--mc-threshold", "-inf", "mc_threshold must be a finite number"),
        ("--max-vram-gb", "inf", "max_vram_gb must be a finite number above 0 (GiB), got inf."),
        ("--steps", "0,30,15", "dense_steps must be a whole number of at least 1, got 0."),
        ("--device", "gpu", "--device 'gpu' is not a device name; use cpu, cuda or cuda:N."),
    ],
    ids=lambda v: str(v),
)
def test_bad_settings_are_refused_before_loading(png, tmp_path, fast, capsys, flag, value, words):
    rc, err = run([png, "-o", tmp_path / "m.glb", f"{flag}={value}"], capsys)
    assert rc == 1 and words in one_line(err), err
    assert "loaded" not in fast and not (tmp_path / "m.glb").exists()


def test_device_cuda_without_cuda_is_one_sentence(png, tmp_path, fast, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, err = run([png, "-o", tmp_path / "m.glb", "--device", "cuda"], capsys)
    assert rc == 1 and one_line(err).startswith("error: --device 'cuda' asks for a CUDA GPU, but ")
    assert "use cpu (slow), or install a CUDA build of PyTorch" in err and "loaded" not in fast
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    rc, err = run([png, "-o", tmp_path / "m.glb", "--device", "cuda:3"], capsys)
    assert (
        rc == 1
        and one_line(err) == "error: --device 'cuda:3' names GPU 3, but only 1 CUDA GPU(s) are visible; use cuda:0."
    )


def test_out_of_memory_and_unexpected_errors_are_one_line(png, tmp_path, fast, monkeypatch, capsys):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore lines")

    monkeypatch.setattr(loading, "load_models", oom)
    rc, err = run([png, "-o", tmp_path / "m.glb"], capsys)
    assert rc == 1 and one_line(err).startswith("error: Out of GPU memory while moving the weights to the GPU; ")

    def bug(*a, **k):
        raise KeyError("dense_dit")

    monkeypatch.setattr(loading, "load_models", bug)
    rc, err = run([png, "-o", tmp_path / "m.glb"], capsys)
    assert (
        rc == 1
        and one_line(err)
        == "error: unexpected KeyError: 'dense_dit' (a bug: run again with --debug and report the traceback)."
    )
    with pytest.raises(KeyError):
        cli.main([str(png), "-o", str(tmp_path / "m.glb"), "--debug"])
    assert not list(tmp_path.glob("*.glb"))
