"""Mesh files: formats round-trip, axis convention, atomic no-overwrite writes, ComfyUI-style names, extras."""

import json
import struct

import numpy as np
import pytest
import torch
import trimesh

from s2core.mesh.export import FORMATS, check_filename_prefix, mesh_bytes, save_mesh, write_atomic
from s2core.mesh.frame import ORIGINAL_TO_GLTF


def _asymmetric():
    """A tetrahedron with distinct extents per axis: tip at +y (0.9), long along +x, short along z."""
    v = torch.tensor([[-0.5, -0.3, -0.2], [0.8, -0.3, -0.2], [-0.5, -0.3, 0.3], [-0.2, 0.9, 0.0]])
    f = torch.tensor([[0, 1, 2], [0, 3, 1], [1, 3, 2], [2, 3, 0]])
    m = trimesh.Trimesh(v.numpy(), f.numpy(), process=False)
    assert m.is_watertight and m.volume > 0  # outward winding
    return v, f


def _sphere():
    m = trimesh.creation.icosphere(subdivisions=2)
    return torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces)


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_counts(tmp_path, fmt):
    v, f = _sphere()
    path = save_mesh(v, f, tmp_path / f"m.{fmt}", normals=v / v.norm(dim=1, keepdim=True) if fmt != "stl" else None)
    back = trimesh.load(path, force="mesh", process=(fmt == "stl"))  # STL stores loose triangles: merge
    assert len(back.faces) == len(f) and len(back.vertices) == len(v)
    assert back.is_watertight


def test_axis_convention_gltf(tmp_path):
    v, f = _asymmetric()
    path = save_mesh(v, f, tmp_path / "a.glb")
    back = trimesh.load(path, force="mesh", process=False)
    # glTF is Y-up: the tip (original +y) is the highest vertex, +x stays the long side, and the
    # mapping is a rotation (volume stays positive, i.e. faces still wind outward)
    want = v.double().numpy() @ ORIGINAL_TO_GLTF.T
    np.testing.assert_allclose(back.vertices, want, atol=1e-6)
    assert np.argmax(back.vertices[:, 1]) == 3
    assert np.ptp(back.vertices[:, 0]) > np.ptp(back.vertices[:, 2])
    assert back.volume > 0
    assert np.isclose(np.linalg.det(ORIGINAL_TO_GLTF), 1.0)


def test_glb_extras(tmp_path):
    v, f = _asymmetric()
    extras = {"prompt": {"3": {"class_type": "D3DS2Sample"}}, "seed": 42}
    path = save_mesh(v, f, tmp_path / "x.glb", extras=extras)
    data = path.read_bytes()
    magic, _, _ = struct.unpack("<4sII", data[:12])
    n, kind = struct.unpack("<I4s", data[12:20])
    assert magic == b"glTF" and kind == b"JSON"
    tree = json.loads(data[20 : 20 + n])
    assert tree["asset"]["extras"] == extras
    assert len(trimesh.load(path, force="mesh", process=False).faces) == 4


def test_never_overwrites_and_atomic(tmp_path, monkeypatch):
    v, f = _asymmetric()
    p = save_mesh(v, f, tmp_path / "a.obj")
    before = p.read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_mesh(v, f, p)
    assert p.read_bytes() == before
    # a failure while writing leaves neither a partial file nor the temp file
    import os

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(b"x" * 100, tmp_path / "b.glb")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.obj"]


@pytest.mark.parametrize(
    "prefix", ["../evil", "mesh/../../evil", "/abs/evil", "\\\\server\\share\\x", "C:\\evil", "c:evil", "", "mesh/"]
)
def test_prefix_cannot_escape(prefix):
    with pytest.raises(ValueError, match="filename_prefix"):
        check_filename_prefix(prefix)


def test_bad_input(tmp_path):
    v, f = _asymmetric()
    with pytest.raises(ValueError, match="format"):
        save_mesh(v, f, tmp_path / "a.fbx")
    with pytest.raises(ValueError, match="empty"):
        mesh_bytes(v, f[:0], "glb")
    bad = v.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        mesh_bytes(bad, f, "ply")
    with pytest.raises(ValueError, match="one normal per vertex"):
        mesh_bytes(v, f, "glb", normals=torch.zeros(2, 3))
    # non-manifold meshes are legal files
    nm_v = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1]], dtype=torch.float32)
    nm_f = torch.tensor([[0, 1, 2], [1, 0, 3], [0, 1, 4]])
    back = trimesh.load(save_mesh(nm_v, nm_f, tmp_path / "nm.ply"), force="mesh", process=False)
    assert len(back.faces) == 3


def test_final_file_has_umask_mode_and_no_temp_left(tmp_path):
    """mkstemp creates 0600 files; the finished mesh must get the mode a plain open() would give (0666 & ~umask)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        p = write_atomic(b"mesh", tmp_path / "a.glb")
        os.umask(0o077)
        q = write_atomic(b"mesh", tmp_path / "b.glb")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert stat.S_IMODE(q.stat().st_mode) == 0o600
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.glb", "b.glb"]  # temp files renamed away


def _glb_json(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<I", data[12:16])[0]
    return json.loads(data[20 : 20 + n]), data[20 + n + 8 :]


def test_glb_texture_round_trip():
    """uvs (core MESH layout, v = 0 the top row) become TEXCOORD_0 unchanged and the texture the material's
    baseColorTexture (8-bit rounding); no COLOR_0 beside it (glTF would multiply the two)."""
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])
    f = torch.tensor([[0, 1, 2], [1, 3, 2]])
    uvs = torch.tensor([[0.1, 0.2], [0.9, 0.2], [0.1, 0.7], [0.9, 0.7]])
    texture = torch.rand(8, 12, 3, generator=torch.Generator().manual_seed(0))
    data = mesh_bytes(v, f, "glb", colors=torch.rand(4, 3), uvs=uvs, texture=texture)
    tree, blob = _glb_json(data)
    prim = tree["meshes"][0]["primitives"][0]
    assert "TEXCOORD_0" in prim["attributes"] and "COLOR_0" not in prim["attributes"]
    assert "baseColorTexture" in tree["materials"][prim["material"]]["pbrMetallicRoughness"]
    view = tree["bufferViews"][tree["accessors"][prim["attributes"]["TEXCOORD_0"]]["bufferView"]]
    raw = np.frombuffer(blob[view.get("byteOffset", 0) : view.get("byteOffset", 0) + view["byteLength"]], np.float32)
    np.testing.assert_allclose(raw.reshape(-1, 2), uvs.numpy(), atol=1e-6)
    import io

    loaded = trimesh.load(io.BytesIO(data), file_type="glb", process=False, force="mesh")
    image = np.asarray(loaded.visual.material.baseColorTexture.convert("RGB"))
    np.testing.assert_array_equal(image, np.rint(texture.numpy() * 255).astype(np.uint8))
    np.testing.assert_allclose(loaded.visual.uv[:, 1], 1 - uvs[:, 1].numpy(), atol=1e-6)  # trimesh keeps v up


def test_texture_of_wrong_shape_is_one_sentence():
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match="pass uvs"):
        mesh_bytes(v, torch.tensor([[0, 1, 2]]), "glb", uvs=torch.zeros(2, 2), texture=torch.zeros(4, 4, 3))
