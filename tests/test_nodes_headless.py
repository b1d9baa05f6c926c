"""The headless ComfyUI release check (tools/comfyui_headless_check.py).

The planning logic (API prompts that differ from the workflow only in the model choice, skipping
workflows whose core nodes or model files a ComfyUI lacks) runs always. The real run needs a ComfyUI
checkout with its requirements: set COMFYUI_DIR (and COMFYUI_PYTHON to its interpreter); its last result
is recorded in tests/HEADLESS_CHECK.md.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("d3ds2_headless_check", REPO / "tools" / "comfyui_headless_check.py")
hc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hc)
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))


@pytest.fixture(scope="module")
def graphs():
    return hc._graphs()


@pytest.fixture(scope="module")
def ours(graphs):
    return graphs.our_nodes()


def object_info(graphs, ours, core_types, files=()):
    """A fake /object_info in ComfyUI 0.3.x's form (combos as option lists) for the given node types."""
    info = {}
    for t in core_types:
        s = graphs.node_sockets(t, ours)
        info[t] = {"input": {"required": {w: ["STRING", {}] for w in s["widgets"]}}}
    for t in ("CheckpointLoaderSimple", "LoadBackgroundRemovalModel"):
        if t in info:
            name = graphs.node_sockets(t, ours)["widgets"][0]
            info[t]["input"]["required"][name] = [list(files), {}]
    for node_id, n in ours.items():
        info[node_id] = {"input": {"required": {i.name: [i.type, {}] for i in n.inputs}}}
    return info


OLD_CORE = [
    "LoadImage",
    "CheckpointLoaderSimple",
    "CLIPTextEncode",
    "EmptyLatentImage",
    "KSampler",
    "VAEDecode",
    "ImageToMask",
    "ThresholdMask",
    "SaveGLB",
]
NEW_CORE = OLD_CORE + ["DecimateMesh", "UnwrapMesh", "LoadBackgroundRemovalModel", "RemoveBackground"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_prompt_changes_only_the_model_choice(path, graphs, ours):
    wf = json.loads(path.read_text())
    plain, tiny = graphs.to_api_prompt(wf, ours), graphs.to_api_prompt(wf, ours, hc.MODEL_CHOICE)
    diff = {
        (k, name) for k in plain for name in plain[k]["inputs"] if plain[k]["inputs"][name] != tiny[k]["inputs"][name]
    }
    loaders = [k for k, v in plain.items() if v["class_type"] == "D3DS2LoadModel"]
    assert diff == {(k, "variant") for k in loaders} and len(loaders) == 1
    assert tiny[loaders[0]]["inputs"]["variant"] == "tiny-random"


def test_skip_decisions_on_old_and_new_comfyui(graphs, ours):
    decide = {}
    for label, core, files in (
        ("0.3", OLD_CORE, ()),
        ("0.38", NEW_CORE, ()),
        ("0.38+files", NEW_CORE, ("sd_xl_base_1.0.safetensors", "birefnet.safetensors")),
    ):
        info = object_info(graphs, ours, core, files)
        for path in WORKFLOWS:
            prompt = graphs.to_api_prompt(json.loads(path.read_text()), ours, hc.MODEL_CHOICE)
            decide[label, path.stem] = hc.skip_reason(prompt, info)
    # image workflows run everywhere; the core toolchain chain needs 0.38.1+ (it says so)
    for name in ("direct3d_s2_image_to_mesh", "direct3d_s2_all_in_one"):
        assert decide["0.3", name] is None and decide["0.38", name] is None
    assert "DecimateMesh" in decide["0.3", "direct3d_s2_decimate_unwrap"]
    assert graphs.CORE_3D_VERSION in decide["0.3", "direct3d_s2_decimate_unwrap"]
    assert decide["0.38", "direct3d_s2_decimate_unwrap"] is None
    # text to image needs the SDXL checkpoint; the Remove Background variant also its model and 0.38.1+
    assert "sd_xl_base_1.0.safetensors" in decide["0.3", "direct3d_s2_text_to_image_to_mesh"]
    assert "RemoveBackground" in decide["0.3", "direct3d_s2_text_to_image_rembg_to_mesh"]
    assert "sd_xl_base_1.0.safetensors" in decide["0.38", "direct3d_s2_text_to_image_rembg_to_mesh"]
    assert decide["0.38+files", "direct3d_s2_text_to_image_rembg_to_mesh"] is None


def test_combo_options_of_every_object_info_form():
    assert hc.combo_options([["a.safetensors"], {}]) == ["a.safetensors"]  # 0.3.x
    assert hc.combo_options(["COMBO", {"options": ["pec", "adaptive"]}]) == ["pec", "adaptive"]  # V3 schema
    assert hc.combo_options(["COMFY_DYNAMICCOMBO_V3", {"options": [{"key": "midpoint"}, {"key": "qem"}]}]) == [
        "midpoint",
        "qem",
    ]
    assert hc.combo_options(["INT", {"default": 1}]) is None


def test_record_is_dated_markdown(tmp_path):
    results = [
        {"name": "a", "result": "PASS", "seconds": 12.3, "faces": [40]},
        {"name": "b", "result": "SKIP", "why": "this ComfyUI has no DecimateMesh"},
    ]
    hc.record(
        tmp_path / "r.md",
        results,
        {"comfyui_version": "0.3.64", "pytorch_version": "2.13.0"},
        "cmd",
        2,
        1,
        "3.10 2.00 1.00",
    )
    text = (tmp_path / "r.md").read_text()
    assert "* date: 20" in text and "ComfyUI: 0.3.64" in text and "| a | PASS | 12.3 | 40 |" in text
    assert "1 PyTorch thread(s)" in text and "load average after the run: 3.10 2.00 1.00" in text
    assert "| b | SKIP | - | - | this ComfyUI has no DecimateMesh |" in text


def test_import_failed_means_our_pack_only():
    ours = "   0.1 seconds: /tmp/b/custom_nodes/ComfyUI-Direct3D-S2"
    core = "IMPORT FAILED: nodes_audio.py"  # ComfyUI's own module without torchaudio, in the same log
    assert not hc.import_failed("\n".join([core, ours]))
    assert hc.import_failed("   0.1 seconds (IMPORT FAILED): /tmp/b/custom_nodes/ComfyUI-Direct3D-S2")
    assert hc.import_failed("   0.1 seconds (IMPORT FAILED): C:\\b\\custom_nodes\\ComfyUI-Direct3D-S2")
    assert not hc.import_failed("   0.1 seconds (IMPORT FAILED): /tmp/b/custom_nodes/other-pack")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="set COMFYUI_DIR to a ComfyUI checkout to run it")
def test_headless_comfyui_runs_every_example_workflow():
    r = subprocess.run(
        [sys.executable, str(REPO / "tools" / "comfyui_headless_check.py"), "--timeout", "900"],
        capture_output=True,
        text=True,
        timeout=5000,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.splitlines()[-1].startswith("OK")
