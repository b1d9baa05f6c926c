"""Issue 15 item 7 and issue 19 item 5 (cheap failures): Load Model looks at the files before it builds any
network, names a corrupt, truncated or wrong-release file with what to do, and fails fast without network.

Building the official networks costs ~20 s and ~10 GB of RAM, so every test here replaces
`loading.build_part` by one that fails the test: the error must come before it.
"""

import logging
import threading
import time

import pytest
import torch

from s2core import checkpoints as ck
from s2core import find_weights, loading
from s2core.manifest import manifest
from s2core.release import DINOV2_HUB_FILE, FILE_PARTS, manifest_key


@pytest.fixture
def no_build(monkeypatch):
    def build_part(*args, **kwargs):
        raise AssertionError("a network was built before the weight files were checked")

    monkeypatch.setattr(loading, "build_part", build_part)


def _zero_stride(key):
    one = torch.zeros(1, dtype=torch.float16)  # full shapes for a few bytes on disk
    return {s.name: one.expand(*s.shape) if s.shape else one.reshape(()) for s in manifest(key)}


def _dense_folder(tmp_path, dense_bytes=None):
    """A weights folder with a valid DINOv2 stand-in and model_dense.ckpt (replaced by `dense_bytes`)."""
    d = tmp_path / "weights"
    d.mkdir()
    torch.save({"cls_token": torch.zeros(1, 1, 4)}, d / DINOV2_HUB_FILE)
    path = d / "model_dense.ckpt"
    torch.save({p: _zero_stride(f"model_dense.{p}") for p in FILE_PARTS["model_dense"]}, path)
    if dense_bytes is not None:
        path.write_bytes(dense_bytes(path.read_bytes()))
    return d


def test_missing_files_are_reported_before_any_network_is_built(tmp_path, monkeypatch, no_build):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    t = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="model_dense.ckpt"):
        loading.load_models("v1.1", ("dense",), weights_dir=tmp_path, allow_download=False)
    assert time.perf_counter() - t < 10


def test_truncated_release_file_is_named_before_any_network_is_built(tmp_path, no_build):
    folder = _dense_folder(tmp_path, lambda b: b[: len(b) // 2])
    with pytest.raises(ValueError, match=r"model_dense\.ckpt` is not a readable PyTorch checkpoint.*download it again"):
        loading.load_models("v1.1", ("dense",), weights_dir=folder, allow_download=False)


@pytest.mark.parametrize("have,selected", [("v1.0", "v1.1"), ("v1.1", "v1.0")])
def test_other_release_through_the_loader_path_says_which_release(tmp_path, have, selected):
    """`load_part` (what load_models uses) said "missing 96 weights" for the other release's sparse DiT."""
    path = tmp_path / "model_sparse_512.ckpt"
    torch.save({p: _zero_stride(manifest_key("model_sparse_512", p, have)) for p in ("vae", "dit")}, path)
    with pytest.raises(ValueError, match=rf"this is the {have} release; choose {have}") as e:
        ck.load_part(path, "dit", manifest_key("model_sparse_512", "dit", selected))
    assert "missing" not in str(e.value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_dinov2_is_named(tmp_path, suffix):
    from safetensors.torch import save_file

    path = tmp_path / f"dinov2{suffix}"
    sd = {"cls_token": torch.zeros(1, 1, 64), "blocks.0.norm1.weight": torch.ones(64)}
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ValueError, match=rf"`{path}` is not a readable .*download it again"):
        ck.load_dinov2(path)


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_unsafe_dinov2_pth_is_refused_in_one_sentence(tmp_path):
    path = tmp_path / DINOV2_HUB_FILE
    torch.save({"cls_token": torch.zeros(1), "x": _Exploit()}, path)
    with pytest.raises(ValueError, match="unsafe unpickling to load; it was refused") as e:
        ck.load_dinov2(path)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no torch traceback attached


def test_no_network_fails_fast_with_one_line(tmp_path, monkeypatch, caplog):
    """Downloads allowed, Hub unreachable (a closed local port): one request, then the files-to-put-where
    message; huggingface_hub's per-file retries took 106 s and 88 log lines."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    caplog.set_level(logging.INFO)
    threads = set(threading.enumerate())
    t = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"cannot be reached \(no network\?\)"):
        find_weights.resolve_weights("v1.1", models_dir=tmp_path / "models")
    assert time.perf_counter() - t < 15
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) <= 1
    # nothing left running that could outlive the failed load (ComfyUI aborted at exit after one)
    assert not [th for th in set(threading.enumerate()) - threads if th.is_alive() and not th.daemon]
