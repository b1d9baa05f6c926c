"""Our MESH is core's MESH: `Types.MESH` (stand-in of ComfyUI 0.38's signature, tests/stubs/v3) where it
exists, a look-alike otherwise, driven here through the access pattern of core's mesh helpers
(`get_mesh_batch_item`, the batch loop of DecimateMesh/FillHoles, UnwrapMesh's per-item loop, the GLB
writer's attribute reads). Also: any core MESH goes into our nodes (UVs, colours, padded batches), Save
writes each batch item without padding, and the axis conversion round-trips exactly.
"""

import copy
import importlib.util
import inspect
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import stubs

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _load(tmp_path, v3):
    stubs.load_pack(v3=v3)
    import folder_paths

    folder_paths.models_dir = str(tmp_path / "models")
    folder_paths.output_directory = str(tmp_path / "output")
    mods = sys.modules
    return mods[f"{stubs.NAME}.nodes._mesh"], mods[f"{stubs.NAME}.s2core.pipeline"], mods[f"{stubs.NAME}.nodes"]


def _results(P):
    """The pack's own s2core.results beside its pipeline module P (package-mode classes, not the top-level ones)."""
    return sys.modules[P.__name__.replace(".pipeline", ".results")]


@pytest.fixture
def v3(tmp_path):
    yield _load(tmp_path, True)
    stubs.unload()


@pytest.fixture
def v1(tmp_path):
    yield _load(tmp_path, False)
    stubs.unload()


def two_meshes(P):
    """A batch of two meshes of different sizes (a tetrahedron and a cube), in the original's frame."""
    import trimesh

    tet_v = torch.tensor([[0.0, 0, 0], [0.9, 0, 0], [0, 0.7, 0], [0, 0, 0.5]])
    tet_f = torch.tensor([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    box = trimesh.creation.box(extents=(1.0, 0.6, 0.4))
    return _results(P).Mesh.from_list(
        [(tet_v, tet_f), (torch.tensor(box.vertices, dtype=torch.float32), torch.tensor(box.faces))],
        resolution=512,
        info={"seed": 7},
    )


# --- core's access pattern, restated from reading ComfyUI 0.38 (comfy_extras/nodes_save_3d.py,
# --- nodes_mesh_postprocess.py); the helpers read the optional attributes without getattr defaults


def core_batch_item(mesh, i):
    n = mesh.vertices.shape[1] if mesh.vertex_counts is None else int(mesh.vertex_counts[i].item())
    m = mesh.faces.shape[1] if mesh.face_counts is None else int(mesh.face_counts[i].item())
    cut = lambda t: None if t is None else t[i, :n]
    return mesh.vertices[i, :n], mesh.faces[i, :m], cut(mesh.vertex_colors), cut(mesh.uvs), cut(mesh.normals)


def core_glb_fields(mesh, i):
    """What core's GLB writer reads besides the batch item (SaveGLB, MeshToFile3D)."""
    v, f, c, uv, nrm = core_batch_item(mesh, i)
    tan = None if mesh.tangents is None else mesh.tangents[i, : v.shape[0]]
    images = [getattr(mesh, k, None) for k in ("texture", "metallic_roughness", "normal_map", "emissive")]
    return v, f, c, uv, nrm, tan, images, mesh.unlit, mesh.occlusion_in_mr, mesh.material


def core_decimate_like(mesh, keep_faces):
    """DecimateMesh/FillHoles: shallow copy, per-item work on unpadded items, re-pack, reset UV/normal fields."""
    MESH = type(mesh)
    out = copy.copy(mesh)
    vs, fs = [], []
    for i in range(mesh.vertices.shape[0]):
        v, f, c, _, _ = core_batch_item(mesh, i)
        vs.append(v)
        fs.append(f[:keep_faces])
    n, m = max(v.shape[0] for v in vs), max(f.shape[0] for f in fs)
    pv, pf = vs[0].new_zeros(len(vs), n, 3), fs[0].new_zeros(len(fs), m, 3)
    for i, (v, f) in enumerate(zip(vs, fs)):
        pv[i, : len(v)], pf[i, : len(f)] = v, f
    packed = MESH(
        pv, pf, vertex_counts=torch.tensor([len(v) for v in vs]), face_counts=torch.tensor([len(f) for f in fs])
    )
    out.vertices, out.faces, out.vertex_colors = packed.vertices, packed.faces, packed.vertex_colors
    out.vertex_counts, out.face_counts = packed.vertex_counts, packed.face_counts
    out.uvs = out.normals = out.tangents = None
    return out


def test_mesh_output_is_types_mesh_with_every_field(v3):
    _mesh, P, _ = v3
    from comfy_api.latest import Types

    out = _mesh.to_comfy_mesh(two_meshes(P))
    assert type(out) is Types.MESH
    for name in inspect.signature(Types.MESH).parameters:
        assert hasattr(out, name), name
    assert out.vertices.shape == (2, 8, 3) and out.faces.shape == (2, 12, 3) and out.vertices.dtype == torch.float32
    assert out.vertex_counts.tolist() == [4, 8] and out.face_counts.tolist() == [4, 12]
    assert out.uvs is None and out.normals is None and out.unlit is False and out.info["seed"] == 7
    # the batch's padding is zeros, and only the counts say where each item ends
    assert not out.vertices[0, 4:].any() and not out.faces[0, 4:].any()


def test_local_mesh_matches_the_core_signature_where_types_mesh_is_missing(v1):
    _mesh_v1, P, _ = v1
    spec = importlib.util.spec_from_file_location(
        "d3ds2_geometry_standin", Path(__file__).parent / "stubs" / "v3" / "comfy_api" / "latest" / "_geometry.py"
    )
    geometry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(geometry)
    stand_in = inspect.signature(geometry.MESH).parameters
    local = inspect.signature(_mesh_v1.LocalMesh).parameters
    assert list(local) == list(stand_in) and all(local[k].default == stand_in[k].default for k in local)
    out = _mesh_v1.to_comfy_mesh(two_meshes(P))  # ComfyUI 0.3.x: no Types.MESH -> the look-alike
    assert type(out) is _mesh_v1.LocalMesh and all(hasattr(out, k) for k in stand_in)


def test_old_comfy_api_without_types_mesh_gets_local_mesh(v3, monkeypatch):
    _mesh, P, _ = v3
    from comfy_api.latest import Types

    monkeypatch.delattr(Types, "MESH")  # comfy_api exists (0.3.64) but has no MESH
    assert type(_mesh.to_comfy_mesh(two_meshes(P))) is _mesh.LocalMesh


def test_old_types_mesh_with_fewer_arguments_still_gets_every_field(v3, monkeypatch):
    _mesh, P, _ = v3
    from comfy_api.latest import Types

    class OldMesh:  # an intermediate core version: only vertices, faces, uvs, vertex_colors
        def __init__(self, vertices, faces, uvs=None, vertex_colors=None):
            self.vertices, self.faces, self.uvs, self.vertex_colors = vertices, faces, uvs, vertex_colors

    monkeypatch.setattr(Types, "MESH", OldMesh)
    out = _mesh.to_comfy_mesh(two_meshes(P))
    assert type(out) is OldMesh and out.vertex_counts.tolist() == [4, 8] and out.normals is None
    assert all(hasattr(out, k) for k in _mesh.FIELDS)


def test_our_mesh_through_core_helpers(v3):
    _mesh, P, _ = v3
    src = two_meshes(P)
    out = _mesh.to_comfy_mesh(src)
    for i, (v, f) in enumerate(src.items()):
        cv, cf, c, uv, nrm, tan, images, unlit, occ, material = core_glb_fields(out, i)
        assert torch.equal(cv, v) and torch.equal(cf, f)  # identity frame: glTF axes = the original's
        assert c is None and uv is None and nrm is None and tan is None and images == [None] * 4
        assert unlit is False and occ is False and material is None
    dec = core_decimate_like(out, keep_faces=3)
    assert dec.face_counts.tolist() == [3, 3] and dec.info == {"seed": 7}
    back = _mesh.from_comfy_mesh(dec)  # what core hands back goes into our nodes again
    assert back.face_counts == (3, 3) and back.vertex_counts == (4, 8)
    # UnwrapMesh's loop indexes mesh.vertices[i] / mesh.faces[i] and reads vertex_colors and texture
    for i in range(out.vertices.shape[0]):
        assert out.vertices[i].shape == (8, 3) and out.faces[i].shape == (12, 3)
    assert out.vertex_colors is None and out.texture is None
    copy.deepcopy(out)  # older core versions deep-copy the MESH


def test_core_mesh_with_uvs_colours_and_padding_goes_into_our_nodes(v3, tmp_path):
    _mesh, P, nodes = v3
    from comfy_api.latest import Types

    src = two_meshes(P)
    out = _mesh.to_comfy_mesh(src)
    core = Types.MESH(
        out.vertices,
        out.faces.int(),
        uvs=torch.rand(2, 8, 2),
        vertex_colors=torch.rand(2, 8, 4),
        vertex_counts=out.vertex_counts,
        face_counts=out.face_counts,
    )  # no `info`: a core mesh
    back = _mesh.from_comfy_mesh(core)
    assert back.vertex_counts == (4, 8) and back.face_counts == (4, 12)
    assert torch.equal(back.vertices, src.vertices) and torch.equal(back.faces, src.faces)
    # list-of-items layout (older core post-processing) and an unbatched mesh are accepted too
    listed = Types.MESH([src.item(0)[0], src.item(1)[0]], [src.item(0)[1], src.item(1)[1]])
    assert _mesh.from_comfy_mesh(listed).face_counts == (4, 12)
    single = Types.MESH(src.item(1)[0], src.item(1)[1])
    assert _mesh.from_comfy_mesh(single).face_counts == (12,)
    with pytest.raises(ValueError, match="not a MESH"):
        _mesh.from_comfy_mesh(torch.zeros(3))
    with pytest.raises(ValueError, match="do not match"):
        _mesh.from_comfy_mesh(Types.MESH(torch.zeros(2, 4, 3), torch.zeros(1, 4, 3, dtype=torch.long)))


def test_colours_are_linear_in_core_mesh_and_srgb_in_ours(v3):
    """Core MESH vertex colours are linear (glTF's convention; core Paint Mesh converts before storing), ours
    are the picture's sRGB values: the adapter converts both ways, and back again is the identity."""
    _mesh, P, _ = v3
    R = _results(P)
    v, f = two_meshes(P).item(0)
    srgb = torch.tensor([[0.0, 0.5, 1.0], [0.04, 0.2, 0.8], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]])
    core = _mesh.to_comfy_mesh(R.Mesh.from_list([(v, f)], colors=[srgb]))
    lin = core.vertex_colors[0]
    # 0.5 sRGB is 0.2140 linear; 0.04 lies on the linear segment (0.04 / 12.92); 0 and 1 stay
    assert torch.allclose(lin[0], torch.tensor([0.0, 0.21404, 1.0]), atol=1e-5)
    assert abs(float(lin[1, 0]) - 0.04 / 12.92) < 1e-7
    back = _mesh.from_comfy_mesh(core)
    assert torch.allclose(back.vertex_colors, srgb, atol=1e-6)


def test_save_writes_each_batch_item_without_padding(v3, tmp_path):
    import trimesh

    _mesh, P, nodes = v3
    from comfy_api.latest import Types

    out = _mesh.to_comfy_mesh(two_meshes(P))
    empty = torch.zeros(1, 8, 3), torch.zeros(1, 12, 3, dtype=torch.long)
    batch = Types.MESH(
        torch.cat([out.vertices, empty[0]]),
        torch.cat([out.faces, empty[1]]),
        vertex_counts=torch.tensor([4, 8, 0]),
        face_counts=torch.tensor([4, 12, 0]),
    )
    save = next(n for n in nodes.NODES if n.node_id == "D3DS2SaveMesh")
    (path,), ui = save.run(batch, filename_prefix="mesh/b", format="glb")
    names = [e["filename"] for e in ui["3d"]]
    assert path == "mesh/b_00001_.glb" and names == ["b_00001_.glb", "b_00002_.glb"]  # the empty item is skipped
    got = [trimesh.load(tmp_path / "output" / "mesh" / n, force="mesh", process=False) for n in names]
    assert [len(m.faces) for m in got] == [4, 12] and [len(m.vertices) for m in got] == [4, 8]
    np.testing.assert_array_equal(got[0].vertices, out.vertices[0, :4].numpy())
    with pytest.raises(ValueError, match="no faces in any batch item"):
        save.run(
            Types.MESH(*empty, vertex_counts=torch.tensor([0]), face_counts=torch.tensor([0])), filename_prefix="mesh/e"
        )


SWAP = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]])  # a Z-up -> Y-up style rotation (core TRELLIS.2's)


def test_frame_round_trip_is_exact_and_mesh_to_structure_inverts_it(v3, monkeypatch):
    _mesh, P, nodes = v3
    frame = sys.modules[f"{stubs.NAME}.s2core.mesh.frame"]
    assert np.array_equal(frame.ORIGINAL_TO_GLTF, np.eye(3))  # Direct3D-S2's frame is glTF's (frame.py)
    monkeypatch.setattr(frame, "ORIGINAL_TO_GLTF", SWAP)  # the plumbing must hold for any signed permutation
    src = two_meshes(P)
    src = _results(P).Mesh.from_list([(v + torch.rand(v.shape) * 1e-3, f) for v, f in src.items()])
    out = _mesh.to_comfy_mesh(src)
    v0 = src.item(0)[0]
    assert torch.equal(out.vertices[0, :4], torch.stack([v0[:, 0], v0[:, 2], -v0[:, 1]], 1))
    back = _mesh.from_comfy_mesh(out)
    assert torch.equal(back.vertices, src.vertices) and torch.equal(back.faces, src.faces)  # bit for bit
    # Mesh to Structure voxelizes exactly the original-frame mesh (the voxelizer itself: test_voxelize.py)
    seen = []
    monkeypatch.setattr(
        P,
        "mesh_to_structure",
        lambda model, mesh, should_stop=None: (
            seen.append(mesh) or _results(P).make_structure(torch.zeros(1, 4, dtype=torch.int32), 1024, 32)
        ),
    )
    m2s = next(n for n in nodes.NODES if n.node_id == "D3DS2MeshToStructure")
    m2s.run("model", out)
    assert torch.equal(seen[0].vertices, src.vertices) and seen[0].face_counts == src.face_counts


def test_file_and_mesh_agree_on_the_frame(v3, tmp_path, monkeypatch):
    """The CLI's file (exporter) and the node's MESH use the same conversion, whatever the constant."""
    import trimesh

    _mesh, P, _ = v3
    frame = sys.modules[f"{stubs.NAME}.s2core.mesh.frame"]
    monkeypatch.setattr(frame, "ORIGINAL_TO_GLTF", SWAP)
    src = two_meshes(P)
    P.save(_results(P).Mesh.from_list([src.item(1)]), tmp_path / "cli.glb")
    from_file = trimesh.load(tmp_path / "cli.glb", force="mesh", process=False).vertices
    np.testing.assert_array_equal(from_file, _mesh.to_comfy_mesh(src).vertices[1].numpy())
