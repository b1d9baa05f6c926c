"""Checkpoint I/O: every official part loads through the real file path; bad files give one clear sentence.

Synthetic release files are written with the manifests' exact names and shapes. For `.ckpt` the tensors
are zero-stride views of a single element (torch.save keeps the stride, so a 500M-parameter part costs
bytes, yet `torch.load(weights_only=True)` returns tensors of the full shapes). `.safetensors` needs
contiguous data, so that path writes real fp16 tensors of the smaller parts plus one DiT.
"""

import os
from pathlib import Path

import pytest
import torch

from s2core import checkpoints as ck
from s2core import find_weights
from s2core.manifest import known_parts, manifest
from s2core.release import DINOV2_HUB_FILE, FILE_PARTS, manifest_key


def _expanded_part(key):
    one = torch.zeros(1, dtype=torch.float16)
    return {s.name: one.expand(*s.shape) if s.shape else one.reshape(()) for s in manifest(key)}


def _write_release_ckpt(folder: Path, stem: str, variant="v1.1") -> Path:
    parts = {p: _expanded_part(manifest_key(stem, p, variant)) for p in FILE_PARTS[stem]}
    path = folder / f"{stem}.ckpt"
    torch.save(parts, path)
    return path


def _load_release_file(path: Path, variant="v1.1") -> dict:
    """Every part of a release file through `load_part`, the loader's path (checked against its manifest)."""
    stem = path.name.split(".")[0]
    return {p: ck.load_part(path, p, manifest_key(stem, p, variant)) for p in FILE_PARTS[stem]}


@pytest.mark.parametrize("variant", ["v1.1", "v1.0"])
@pytest.mark.parametrize("stem", sorted(FILE_PARTS))
def test_every_release_file_loads_through_ckpt_path(tmp_path, stem, variant):
    path = _write_release_ckpt(tmp_path, stem, variant)
    assert path.stat().st_size < 2_000_000  # zero-stride tensors: the test stays cheap
    parts = _load_release_file(path, variant)
    assert sorted(parts) == sorted(FILE_PARTS[stem])
    for part, sd in parts.items():
        specs = manifest(manifest_key(stem, part, variant))
        assert list(sd) == [s.name for s in specs]
        assert all(tuple(sd[s.name].shape) == s.shape for s in specs)


def test_all_manifests_are_covered_by_release_files():
    covered = {manifest_key(s, p, v) for s in FILE_PARTS for p in FILE_PARTS[s] for v in ("v1.1", "v1.0")}
    assert covered | {"dinov2_vitl14_reg4"} == set(known_parts())


@pytest.mark.parametrize("stem", ["model_refiner", "model_refiner_1024"])
def test_safetensors_conversion_round_trip(tmp_path, stem):
    # real (contiguous) tensors: deterministic values, so the round trip compares content too
    from s2core.testing import deterministic_state_dict

    parts = {p: deterministic_state_dict(manifest_key(stem, p), seed=1, dtype=torch.float16) for p in FILE_PARTS[stem]}
    src = tmp_path / f"{stem}.ckpt"
    torch.save(parts, src)
    out = ck.convert_to_safetensors(src)
    assert out.suffix == ".safetensors" and out.exists()
    loaded = _load_release_file(out)
    for p in parts:
        assert loaded[p].keys() == parts[p].keys()
        for k in parts[p]:
            assert torch.equal(loaded[p][k], parts[p][k]), k
    # converting again is a no-op; a different file under that name is never overwritten
    assert ck.convert_to_safetensors(src) == out
    other = {p: {k: v + 1 for k, v in sd.items()} for p, sd in parts.items()}
    torch.save(other, src)
    before = out.read_bytes()[:4096]
    with pytest.raises(FileExistsError, match="already exists with different content"):
        ck.convert_to_safetensors(src)
    assert out.read_bytes()[:4096] == before
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


# --- bad input ------------------------------------------------------------------------------------


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "model_dense.ckpt"
    p.write_text("<html>404 Not Found</html>")
    with pytest.raises(ValueError, match=r"model_dense\.ckpt` is not a readable PyTorch checkpoint"):
        _load_release_file(p)


def test_empty_file(tmp_path):
    p = tmp_path / "model_dense.ckpt"
    p.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        ck.load_checkpoint(p)


def test_truncated_checkpoint(tmp_path):
    from s2core.testing import deterministic_state_dict

    p = tmp_path / "model_refiner.ckpt"
    torch.save({"refiner": deterministic_state_dict("model_refiner.refiner", 0, dtype=torch.float16)}, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        _load_release_file(p)


def test_truncated_safetensors(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "model_refiner.safetensors"
    save_file({"refiner.x": torch.ones(1000)}, str(p))
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        ck.load_checkpoint(p)


def test_checkpoint_of_another_model(tmp_path):
    p = tmp_path / "model_sparse_512.ckpt"
    torch.save(
        {
            "vae": {"conv1.weight": torch.ones(3, 3), "fc.bias": torch.ones(3)},
            "dit": {"encoder.layer.0.weight": torch.ones(2)},
        },
        p,
    )
    with pytest.raises(ValueError) as e:
        _load_release_file(p)
    msg = str(e.value)
    assert "checkpoint of another model" in msg and "model_sparse_512.ckpt" in msg
    assert "missing" in msg and "unexpected" in msg  # the grouped report follows the sentence


def test_missing_weights_and_wrong_shape_are_named(tmp_path):
    parts = {p: _expanded_part(f"model_refiner.{p}") for p in ("refiner",)}
    first = next(iter(parts["refiner"]))
    del parts["refiner"][first]
    p = tmp_path / "model_refiner.ckpt"
    torch.save(parts, p)
    with pytest.raises(ValueError, match=rf"missing 1 weights \(first: `{first}`\)"):
        _load_release_file(p)
    parts = {"refiner": _expanded_part("model_refiner.refiner")}
    parts["refiner"][first] = torch.zeros(2, 2)
    torch.save(parts, p)
    with pytest.raises(ValueError, match="wrong shape"):
        _load_release_file(p)


def test_missing_part(tmp_path):
    p = tmp_path / "model_dense.ckpt"
    torch.save({"vae": _expanded_part("model_dense.vae")}, p)
    with pytest.raises(ValueError, match=r"has no `dit` weights \(it has: vae\)"):
        _load_release_file(p)
    with pytest.raises(ValueError, match="has no `dit` weights"):
        ck.load_part(p, "dit")


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['D3DS2_SENTINEL']}",))


def test_unsafe_pickle_is_refused_and_never_executed(tmp_path, monkeypatch):
    sentinel = tmp_path / "pwned"
    monkeypatch.setenv("D3DS2_SENTINEL", str(sentinel))
    p = tmp_path / "model_dense.ckpt"
    torch.save({"vae": {"w": torch.ones(1)}, "payload": _Exploit()}, p)
    with pytest.raises(ValueError, match="unsafe unpickling.*refused"):
        ck.load_checkpoint(p)
    assert not sentinel.exists()


def test_offline_without_weights_names_files_sizes_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    models = tmp_path / "models" / "direct3d_s2"
    with pytest.raises(FileNotFoundError) as e:
        find_weights.resolve_weights("v1.1", models_dir=models)
    msg = str(e.value)
    assert "HF_HUB_OFFLINE=1" in msg and str(models / "v1.1") in msg
    for stem in FILE_PARTS:
        assert f"{stem}.ckpt (" in msg
    assert DINOV2_HUB_FILE in msg
    assert "1.09 GB if stored in fp16" in msg  # model_sparse_512: (37.9M + 509.3M) params x 2 bytes = 1.094 GB
    assert not models.exists()  # nothing written while offline


def test_local_folder_wins_and_missing_folder_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for stem in ("model_dense",):
        _write_release_ckpt(tmp_path, stem)
    (tmp_path / DINOV2_HUB_FILE).write_bytes(b"x")
    got = find_weights.resolve_weights("v1.1", stages=("dense",), local_dir=tmp_path)
    assert got == {"model_dense": tmp_path / "model_dense.ckpt", "dinov2": tmp_path / DINOV2_HUB_FILE}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_weights.resolve_weights("v1.1", local_dir=tmp_path / "nope")
    with pytest.raises(ValueError, match="Unknown Direct3D-S2 variant"):
        find_weights.resolve_weights("v9")


def test_comfyui_models_folder_layouts_are_found(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = tmp_path / "direct3d_s2"
    (models / "v1.1").mkdir(parents=True)
    (models / "direct3d-s2-v-1-1").mkdir()
    _write_release_ckpt(models / "v1.1", "model_sparse_512")
    _write_release_ckpt(models / "direct3d-s2-v-1-1", "model_refiner")  # where a download lands
    got = find_weights.resolve_weights("v1.1", stages=("sparse_512",), models_dir=models, with_dinov2=False)
    assert got["model_sparse_512"].parent.name == "v1.1"
    assert got["model_refiner"].parent.name == "direct3d-s2-v-1-1"


def test_read_only_models_folder_is_clear(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        # root ignores permission bits; simulate the check's input instead
        monkeypatch.setattr(find_weights.os, "access", lambda p, mode: False)
    models = tmp_path / "ro"
    models.mkdir()
    os.chmod(models, 0o555)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        with pytest.raises(PermissionError, match="read-only"):
            find_weights.resolve_weights("v1.1", stages=("dense",), models_dir=models, with_dinov2=False)
    finally:
        os.chmod(models, 0o755)


def _write_sparse_safetensors(path: Path, stem: str, variant: str) -> None:
    """A valid .safetensors file of zeros with the release's names/shapes (fp16), written as a sparse file:
    header by hand (format: 8-byte little-endian header length, JSON header, data), data left as a hole."""
    import json
    import struct

    header, offset = {}, 0
    for part in FILE_PARTS[stem]:
        for s in manifest(manifest_key(stem, part, variant)):
            n = 2
            for d in s.shape:
                n *= d
            header[f"{part}.{s.name}"] = {"dtype": "F16", "shape": list(s.shape), "data_offsets": [offset, offset + n]}
            offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)


# v1.0 differs from v1.1 only in the sparse DiTs, so only those files get a v1.0 case
@pytest.mark.parametrize(
    "stem,variant",
    [(s, "v1.1") for s in sorted(FILE_PARTS)] + [("model_sparse_512", "v1.0"), ("model_sparse_1024", "v1.0")],
)
def test_every_release_file_loads_through_safetensors_path(tmp_path, stem, variant):
    path = tmp_path / f"{stem}.safetensors"
    _write_sparse_safetensors(path, stem, variant)
    parts = _load_release_file(path, variant)
    for part, sd in parts.items():
        specs = manifest(manifest_key(stem, part, variant))
        assert sorted(sd) == sorted(s.name for s in specs)
        assert all(tuple(sd[s.name].shape) == s.shape and sd[s.name].dtype == torch.float16 for s in specs)
    del parts
