"""Example workflows: every file parses, uses only our nodes or known core nodes, and every link's type
matches both sockets; the committed files equal what `tests/workflow_graphs.py` builds.

Regenerate after an intended change: `python tests/test_workflows.py --update`.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("d3ds2_workflow_graphs", Path(__file__).parent / "workflow_graphs.py")
wg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wg)

FILES = sorted(wg.EXAMPLES.glob("*.json"))


@pytest.fixture(scope="module")
def ours():
    return wg.our_nodes()


def test_five_examples_with_thumbnails():
    # the original three, the core 3D toolchain chain and the core background-removal variant of text-to-image
    assert {p.stem for p in FILES} == set(wg.WORKFLOWS) and len(FILES) == 5
    for p in FILES:
        jpg = p.with_suffix(".jpg")
        assert jpg.is_file() and jpg.read_bytes()[:3] == b"\xff\xd8\xff", f"{jpg.name} is not a JPEG"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_workflow_is_consistent(path, ours):
    wf = json.loads(path.read_text())
    assert wf["version"] == 0.4 and wf["last_node_id"] == len(wf["nodes"]) and wf["last_link_id"] == len(wf["links"])
    nodes = {n["id"]: n for n in wf["nodes"]}
    for n in nodes.values():
        assert n["type"] in ours or n["type"] in wg.CORE_NODES, f"unknown node type {n['type']}"
        s = wg.node_sockets(n["type"], ours)
        assert len(n["widgets_values"]) == len(s["widgets"]), f"{n['type']}: widget values do not match widgets"
        for i in n["inputs"]:
            assert s["inputs"][i["name"]] == i["type"]
            if i["link"] is None:
                assert i["name"] in s["optional"], f"{n['type']}.{i['name']} is required but unconnected"
    for lid, src, slot, dst, dslot, typ in wf["links"]:
        out = nodes[src]["outputs"][slot]
        inp = nodes[dst]["inputs"][dslot]
        assert out["type"] == typ == inp["type"], f"link {lid}: {out['type']} -> {inp['type']} as {typ}"
        assert lid in out["links"] and inp["link"] == lid
    # it ends in a mesh saver fed by one of our meshes
    savers = [n for n in nodes.values() if n["type"] in ("D3DS2SaveMesh", "SaveGLB")]
    assert savers and all(i["link"] is not None for s in savers for i in s["inputs"])


@pytest.mark.parametrize("name", sorted(wg.WORKFLOWS))
def test_committed_equals_generated(name, ours):
    assert json.loads((wg.EXAMPLES / f"{name}.json").read_text()) == wg.WORKFLOWS[name](ours), (
        "example workflow is stale: run `python tests/test_workflows.py --update`"
    )


def test_api_prompt_of_the_separate_nodes_workflow(ours):
    wf = json.loads((wg.EXAMPLES / "direct3d_s2_image_to_mesh.json").read_text())
    prompt = wg.to_api_prompt(wf, ours, {"D3DS2LoadModel": {"variant": "tiny-random"}})
    kinds = [v["class_type"] for v in prompt.values()]
    assert "Note" not in kinds and kinds.count("D3DS2SampleSparse") == 2
    loader = next(v for v in prompt.values() if v["class_type"] == "D3DS2LoadModel")
    assert loader["inputs"]["variant"] == "tiny-random"
    sampler = next(v for v in prompt.values() if v["class_type"] == "D3DS2SampleDense")
    assert sampler["inputs"]["steps"] == 50 and "control_after_generate" not in sampler["inputs"]


def _by_type(wf):
    return {n["type"]: n for n in wf["nodes"]}


def test_core_toolchain_workflow_chains_our_mesh_into_decimate_unwrap_save(ours):
    wf = json.loads((wg.EXAMPLES / "direct3d_s2_decimate_unwrap.json").read_text())
    nodes, by = {n["id"]: n for n in wf["nodes"]}, _by_type(wf)
    chain = [(nodes[a]["type"], nodes[b]["type"]) for _, a, _, b, _, t in wf["links"] if t == "MESH"]
    assert chain == [("D3DS2ImageToMesh", "DecimateMesh"), ("DecimateMesh", "UnwrapMesh"), ("UnwrapMesh", "SaveGLB")]
    assert f"Needs ComfyUI {wg.CORE_3D_VERSION} or newer" in by["Note"]["widgets_values"][0]
    prompt = wg.to_api_prompt(wf, ours)
    dec = next(v for v in prompt.values() if v["class_type"] == "DecimateMesh")
    assert dec["inputs"]["placement_mode"] == "midpoint" and dec["inputs"]["target_face_count"] == 50000


def test_text_to_image_variants(ours):
    old = _by_type(json.loads((wg.EXAMPLES / "direct3d_s2_text_to_image_to_mesh.json").read_text()))
    new = _by_type(json.loads((wg.EXAMPLES / "direct3d_s2_text_to_image_rembg_to_mesh.json").read_text()))
    # older ComfyUI: the white-background mask of core nodes, a background mask (mask_is_background on)
    assert {"ImageToMask", "ThresholdMask"} <= set(old) and "RemoveBackground" not in old
    assert old["D3DS2EncodeImage"]["widgets_values"] == [True]
    # 0.38+: core Remove Background, whose MASK is 1 on the object (mask_is_background off)
    assert {"LoadBackgroundRemovalModel", "RemoveBackground"} <= set(new) and "ThresholdMask" not in new
    assert new["D3DS2EncodeImage"]["widgets_values"] == [False]
    assert f"Needs ComfyUI {wg.CORE_3D_VERSION} or newer" in new["Note"]["widgets_values"][0]
    assert "direct3d_s2_text_to_image_rembg_to_mesh" in old["Note"]["widgets_values"][0]


if __name__ == "__main__" and "--update" in sys.argv:
    for p in wg.write_all():
        print("wrote", p)
