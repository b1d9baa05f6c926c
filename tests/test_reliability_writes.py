"""Writes that lose nothing (issue 19 item 2): exclusive create with one winner among racing processes,
--overwrite that keeps the old file until the new one is complete, temp files removed on errors and
signals, and every OS error as one sentence (s2core/files.py)."""

import errno
import multiprocessing as mp
import os
import signal
from pathlib import Path

import pytest

from s2core import files
from s2core.files import remove_temp_files, write_atomic


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


def _racer(i: int, folder: str, trials: int, barrier, results, no_links: bool) -> None:
    if no_links:  # a file system without hard links: the O_EXCL placeholder path

        def refuse(*a, **k):
            raise OSError(errno.EPERM, "Operation not permitted")

        os.link = refuse
    won = []
    for t in range(trials):
        barrier.wait(timeout=60)
        try:
            write_atomic(str(i).encode() * 4096, os.path.join(folder, f"t{t}.glb"))
            won.append(t)
        except FileExistsError:
            pass
    results.put((i, won))


@pytest.mark.parametrize("no_links", [False, True], ids=["hard-link", "no-hard-links"])
def test_racing_writers_exactly_one_winner(tmp_path, no_links):
    """8 processes write the same new name at once, 100 times: each time exactly one succeeds, the file holds
    that winner's bytes, and no temp file is left. (The old check-then-rename gave 16 double wins in 200.)"""
    n, trials = 8, 100
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(i, str(tmp_path), trials, barrier, results, no_links)) for i in range(n)]
    for p in procs:
        p.start()
    outcome = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    winners = {t: [i for i, won in outcome if t in won] for t in range(trials)}
    assert {t: len(w) for t, w in winners.items()} == {t: 1 for t in range(trials)}
    for t, (i,) in winners.items():
        assert (tmp_path / f"t{t}.glb").read_bytes() == str(i).encode() * 4096
    assert _leftovers(tmp_path) == []


def test_overwrite_replaces_only_with_a_complete_file(tmp_path, monkeypatch):
    """--overwrite: disk full or Ctrl-C while the new file is written keep the old file byte for byte."""
    p = tmp_path / "m.glb"
    p.write_bytes(b"old mesh")
    real_fsync = os.fsync

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(OSError, match=r"^Could not write .*m\.glb: the disk is full") as e:
        write_atomic(b"new mesh", p, overwrite=True)
    assert e.value.errno == errno.ENOSPC
    assert p.read_bytes() == b"old mesh" and _leftovers(tmp_path) == []

    def ctrl_c(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "fsync", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(b"new mesh", p, overwrite=True)
    assert p.read_bytes() == b"old mesh" and _leftovers(tmp_path) == []

    monkeypatch.setattr(files.os, "fsync", real_fsync)
    assert write_atomic(b"new mesh", p, overwrite=True) == p
    assert p.read_bytes() == b"new mesh" and _leftovers(tmp_path) == []
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_atomic(b"third", p)
    assert p.read_bytes() == b"new mesh"


def test_name_taken_just_before_the_final_step_is_not_clobbered(tmp_path, monkeypatch):
    """Another writer creates the name after every check, right before the temp file takes it: ours must fail
    and theirs stay (the old `exists()` check followed by `os.replace` replaced theirs)."""
    p = tmp_path / "m.glb"
    real_link, real_replace = os.link, os.replace

    def other_writer_first(real):
        def step(src, dst, *a, **k):
            if not p.exists():
                p.write_bytes(b"theirs")
            return real(src, dst, *a, **k)

        return step

    monkeypatch.setattr(files.os, "link", other_writer_first(real_link))
    monkeypatch.setattr(files.os, "replace", other_writer_first(real_replace))
    with pytest.raises(FileExistsError, match="already exists"):
        write_atomic(b"ours", p)
    assert p.read_bytes() == b"theirs" and _leftovers(tmp_path) == []


def test_signal_cut_clean_up_is_finished_by_remove_temp_files(tmp_path, monkeypatch):
    """A second signal that cuts write_atomic's own clean-up short leaves the temp file listed; the CLI's
    handler then removes it with remove_temp_files()."""
    real_unlink = os.unlink
    calls = []

    def fail(fd):
        raise KeyboardInterrupt

    def interrupted_once(path):
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real_unlink(path)

    monkeypatch.setattr(files.os, "fsync", fail)
    monkeypatch.setattr(files.os, "unlink", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(b"x" * 100, tmp_path / "m.glb")
    assert len(_leftovers(tmp_path)) == 1
    remove_temp_files()
    assert _leftovers(tmp_path) == [] and not (tmp_path / "m.glb").exists() and not files._TEMP_FILES


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.ENOSPC, "the disk is full"),
        (errno.EROFS, "read-only file system; choose another folder"),
        (errno.EACCES, "permission denied; choose a file and folder"),
        (errno.EIO, "Input/output error; check the folder"),
    ],
    ids=["disk-full", "read-only", "permission", "other"],
)
def test_os_errors_are_one_sentence_with_the_same_type(tmp_path, monkeypatch, code, words):
    """(Root ignores chmod here, so the failing system call is replaced.) Same exception class and errno,
    one line naming the file and the fix; no temp file."""
    real_open = os.open

    def failing_open(path, *a, **k):
        if str(path).endswith(".tmp"):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(files.os, "open", failing_open)
    with pytest.raises(OSError) as e:
        write_atomic(b"x", tmp_path / "sub" / "m.glb")
    assert type(e.value) is type(OSError(code, "x")) and e.value.errno == code
    msg = str(e.value)
    assert words in msg and "m.glb" in msg and "\n" not in msg and "[Errno" not in msg
    assert _leftovers(tmp_path) == []


def test_bad_output_names_are_one_sentence(tmp_path):
    (tmp_path / "folder.glb").mkdir()
    (tmp_path / "file").write_bytes(b"")
    cases = [
        (tmp_path / "folder.glb", IsADirectoryError, "is a folder, not a file"),
        (tmp_path / "file" / "m.glb", NotADirectoryError, "part of its folder path is a file"),
        (tmp_path / ("n" * 300 + ".glb"), OSError, "304 bytes long, more than the file system allows"),
    ]
    for path, kind, words in cases:
        with pytest.raises(kind, match=words):
            write_atomic(b"x", path, overwrite=True)
    assert (tmp_path / "folder.glb").is_dir() and _leftovers(tmp_path) == []


def test_a_long_but_legal_name_is_written(tmp_path):
    """250 bytes is a legal file name; the temp name must not push it over 255 (mkstemp's `.<name>.XXXX.tmp` did)."""
    p = write_atomic(b"ok", tmp_path / ("n" * 246 + ".glb"))
    assert p.read_bytes() == b"ok" and _leftovers(tmp_path) == []


def test_sigterm_from_outside_while_writing_leaves_no_temp_file(tmp_path):
    """A real SIGTERM sent by another process while the CLI writes (the file's fsync is made to wait): exit 143,
    one line, no temp file and no output. Runs the CLI in a fresh interpreter, with the chain replaced by a
    tetrahedron so it takes seconds."""
    import subprocess
    import sys
    import time

    from PIL import Image

    Image.new("RGBA", (32, 32), (200, 60, 40, 255)).save(tmp_path / "in.png")
    out, ready = tmp_path / "o" / "m.glb", tmp_path / "writing"
    script = f"""
import os, sys, time, torch
from s2core import cli, files, loading, pipeline, results
tetra = results.Mesh.from_list([(torch.tensor([[0., 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]),
                                  torch.tensor([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]]))], 512)
loading.load_models = lambda *a, **k: None
pipeline.image_to_mesh = lambda *a, **k: tetra
def slow_fsync(fd):
    open({str(ready)!r}, "w").close()
    time.sleep(60)
files.os.fsync = slow_fsync
sys.exit(cli.main([{str(tmp_path / "in.png")!r}, "-q", "--device", "cpu", "-o", {str(out)!r}]))
"""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1"),
    )
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.communicate()[1]
    assert len(_leftovers(tmp_path / "o")) == 1  # the temp file is there while writing
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip() == "Terminated; nothing was written.", err
    assert not out.exists() and _leftovers(tmp_path) == []
