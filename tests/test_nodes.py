"""ComfyUI nodes with the ComfyUI modules stubbed (tests/stubs): schemas, tooltips, V3/V1 registration,
and execution of the whole chain with `tiny-random` on CPU down to a saved file and the 3D preview entry.

A real ComfyUI is exercised by tools/comfyui_headless_check.py (tests/test_nodes_headless.py).
"""

import asyncio
import json
import struct
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import stubs

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def v3_classes(mod):
    ext = asyncio.run(mod.comfy_entrypoint())
    return asyncio.run(ext.get_node_list())


def test_registration_v1_and_v3_exclusive(pack):
    assert set(pack.__all__) == {"NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"}
    assert not hasattr(pack, "comfy_entrypoint")  # ComfyUI would ignore it anyway next to mappings
    ids = set(pack.NODE_CLASS_MAPPINGS)
    assert len(ids) == 11 and all(i.startswith("D3DS2") for i in ids)
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == ids
    v3 = stubs.load_pack(v3=True)
    assert v3.__all__ == ["comfy_entrypoint"] and not hasattr(v3, "NODE_CLASS_MAPPINGS")
    assert {c.define_schema().node_id for c in v3_classes(v3)} == ids


def test_every_input_has_a_tooltip_v1(pack):
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY == "Direct3D-S2" and cls.DESCRIPTION
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for name, (_typ, opts) in spec.get(group, {}).items():
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)


def test_v3_schema_matches_description(pack_v3):
    for cls in v3_classes(pack_v3):
        s = cls.define_schema()
        node = cls.NODE
        assert s.category == "Direct3D-S2" and s.is_output_node == node.output_node
        assert [i.id for i in s.inputs] == [i.name for i in node.inputs]
        for inp, d in zip(s.inputs, node.inputs):
            assert inp.tooltip == d.tooltip and inp.optional == d.optional
            assert inp.io_type == d.type, f"{s.node_id}.{inp.id}"
            if d.default is not None:
                assert inp.options["default"] == d.default
        assert [o.io_type for o in s.outputs] == [o.type for o in node.outputs]
        if node.hidden_prompt:
            assert {h.value for h in s.hidden} == {"PROMPT", "EXTRA_PNGINFO"}


def picture():
    img = torch.ones(1, 64, 64, 3)
    img[:, 14:50, 18:46] = torch.tensor([0.1, 0.5, 0.9])
    load_image_mask = torch.ones(1, 64, 64)  # LoadImage: 1 - alpha, 1 = background
    load_image_mask[:, 14:50, 18:46] = 0.0
    return img, load_image_mask


def test_chain_of_separate_nodes_saves_glb(pack, tmp_path):
    import comfy.model_management as mm
    import comfy.utils

    model = stubs.run_node(
        pack,
        "D3DS2LoadModel",
        variant="tiny-random",
        dense=True,
        sparse_512=True,
        sparse_1024=True,
        precision="auto",
        allow_download=False,
    )[0]
    img, mask = picture()
    cond = stubs.run_node(pack, "D3DS2EncodeImage", model=model, image=img, mask=mask, mask_is_background=True)[0]
    comfy.utils.updates.clear()
    dense = stubs.run_node(pack, "D3DS2SampleDense", model=model, conditioning=cond, seed=3, steps=2, guidance=7.0)[0]
    assert comfy.utils.updates == [(1, 2), (2, 2)]
    structure = stubs.run_node(pack, "D3DS2DecodeDense", model=model, dense_latent=dense, threshold=0.1)[0]
    latent = stubs.run_node(
        pack,
        "D3DS2SampleSparse",
        model=model,
        conditioning=cond,
        structure=structure,
        seed=3,
        steps=2,
        guidance=7.0,
        max_tokens=0,
    )[0]
    # every stage told ComfyUI what it needs beyond the weights; the sparse DiT's need grows with the tokens
    loading = sys.modules[type(latent).__module__.replace(".results", ".loading")]  # the pack's own copy
    assert len(mm.memory_requests) == len(mm.loaded) and all(r > 0 for r in mm.memory_requests)
    assert mm.memory_requests[-1] == loading.activation_bytes("sparse sampling", tokens=latent.structure.num_tokens)
    mesh = stubs.run_node(pack, "D3DS2DecodeSparse", model=model, sparse_latent=latent, refine=False, threshold=0.2)[0]
    # core MESH layout: [B, N, 3] / [B, M, 3] on the intermediate device
    assert mesh.vertices.ndim == 3 and mesh.faces.ndim == 3 and mesh.vertices.shape[0] == 1
    assert mm.loaded, "stages did not go through load_models_gpu"
    out = stubs.run_node(
        pack,
        "D3DS2SaveMesh",
        mesh=mesh,
        filename_prefix="mesh/test",
        format="glb",
        prompt={"1": {"class_type": "X"}},
        extra_pnginfo={"workflow": {"nodes": []}},
    )
    entry = out["ui"]["3d"][0]
    assert entry == {"filename": "test_00001_.glb", "subfolder": "mesh", "type": "output"}
    assert out["result"] == ("mesh/test_00001_.glb",)
    data = (tmp_path / "output" / "mesh" / "test_00001_.glb").read_bytes()
    n = struct.unpack("<I", data[12:16])[0]
    extras = json.loads(data[20 : 20 + n])["asset"]["extras"]
    assert extras["seed"] == 3 and extras["resolution"] == 512 and extras["variant"] == "tiny-random"
    assert json.loads(extras["prompt"]) == {"1": {"class_type": "X"}} and "workflow" in extras
    # the counter advances; obj works too
    out2 = stubs.run_node(pack, "D3DS2SaveMesh", mesh=mesh, filename_prefix="mesh/test", format="obj")
    assert out2["ui"]["3d"][0]["filename"] == "test_00002_.obj"
    # a core-style MESH (no counts, no info) is accepted by our mesh nodes
    core = SimpleNamespace(
        vertices=mesh.vertices[:, : mesh.vertex_counts[0]], faces=mesh.faces[:, : mesh.face_counts[0]]
    )
    post = stubs.run_node(
        pack,
        "D3DS2PostprocessMesh",
        mesh=core,
        simplify=True,
        simplify_ratio=0.5,
        fill_holes=False,
        remove_debris=False,
    )[0]
    assert 0 < post.faces.shape[1] < core.faces.shape[1]


def test_metadata_can_be_disabled(pack, tmp_path):
    import comfy.cli_args

    comfy.cli_args.args.disable_metadata = True
    m = SimpleNamespace(
        vertices=torch.tensor([[[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]]),
        faces=torch.tensor([[[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]]]),
    )
    stubs.run_node(
        pack, "D3DS2SaveMesh", mesh=m, filename_prefix="t", format="glb", prompt={"a": 1}, extra_pnginfo={"w": 2}
    )
    data = (tmp_path / "output" / "t_00001_.glb").read_bytes()
    n = struct.unpack("<I", data[12:16])[0]
    assert "prompt" not in json.dumps(json.loads(data[20 : 20 + n])["asset"])


def test_cancel_raises_comfy_interrupt_and_writes_nothing(pack, tmp_path):
    import comfy.model_management as mm
    import comfy.utils

    model = stubs.run_node(
        pack,
        "D3DS2LoadModel",
        variant="tiny-random",
        dense=True,
        sparse_512=True,
        sparse_1024=False,
        precision="fp32",
        allow_download=False,
    )[0]
    img, mask = picture()
    real_update = comfy.utils.ProgressBar.update_absolute

    def press_cancel_at_step_2(self, value, total=None, preview=None):
        real_update(self, value, total, preview)
        if value == 2:
            mm.interrupt_processing = True  # the user pressed Cancel during step 2

    comfy.utils.ProgressBar.update_absolute = press_cancel_at_step_2
    try:
        with pytest.raises(mm.InterruptProcessingException):
            stubs.run_node(
                pack,
                "D3DS2ImageToMesh",
                model=model,
                image=img,
                mask=mask,
                seed=0,
                resolution="512",
                dense_steps=5,
                sparse_512_steps=5,
            )
    finally:
        comfy.utils.ProgressBar.update_absolute = real_update
        mm.interrupt_processing = False
    assert not (tmp_path / "output").exists() or not any((tmp_path / "output").rglob("*.*"))


def test_v3_execute_all_in_one_and_save(pack_v3, tmp_path):
    import folder_paths

    folder_paths.output_directory = str(tmp_path / "out")
    classes = {c.define_schema().node_id: c for c in v3_classes(pack_v3)}
    model = classes["D3DS2LoadModel"].execute(variant="tiny-random", sparse_1024=False, allow_download=False).result[0]
    img, mask = picture()
    mesh = (
        classes["D3DS2ImageToMesh"]
        .execute(
            model=model, image=img, mask=mask, resolution="512", dense_steps=2, sparse_512_steps=2, refine_512=False
        )
        .result[0]
    )
    save = classes["D3DS2SaveMesh"]
    save.hidden = SimpleNamespace(prompt={"p": 1}, extra_pnginfo=None)
    out = save.execute(mesh=mesh, filename_prefix="a/b", format="ply")
    assert out.ui["3d"][0]["filename"] == "b_00001_.ply" and (tmp_path / "out" / "a" / "b_00001_.ply").is_file()


def test_model_loader_messages(pack):
    with pytest.raises(ValueError, match="No stage is selected"):
        stubs.run_node(
            pack,
            "D3DS2LoadModel",
            variant="tiny-random",
            dense=False,
            sparse_512=False,
            sparse_1024=False,
            precision="auto",
            allow_download=False,
        )
