"""The example workflows as code: built from our node descriptions and a table of the core nodes they use.

`python tests/test_workflows.py --update` writes `example_workflows/<name>.json` (ComfyUI's UI
"litegraph" format, COMFYUI.md §8) and a same-named `.jpg` diagram; `tests/test_workflows.py` checks the
committed files; `tools/comfyui_headless_check.py` converts every workflow to the API format with
`to_api_prompt` and runs it in a real ComfyUI.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "example_workflows"
AUX_ID = "comfyui-direct3d-s2/ComfyUI-Direct3D-S2"

# Core ComfyUI nodes the examples use: socket inputs, widget names (in widget order), outputs.
# "Note" is a frontend-only node (no backend class); it is dropped from API prompts.
CORE_NODES: dict[str, dict] = {
    "LoadImage": {"inputs": {}, "widgets": ["image", "upload"], "outputs": [("IMAGE", "IMAGE"), ("MASK", "MASK")]},
    "CheckpointLoaderSimple": {
        "inputs": {},
        "widgets": ["ckpt_name"],
        "outputs": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    },
    "CLIPTextEncode": {"inputs": {"clip": "CLIP"}, "widgets": ["text"], "outputs": [("CONDITIONING", "CONDITIONING")]},
    "EmptyLatentImage": {"inputs": {}, "widgets": ["width", "height", "batch_size"], "outputs": [("LATENT", "LATENT")]},
    "KSampler": {
        "inputs": {"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING", "latent_image": "LATENT"},
        "widgets": ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
        "outputs": [("LATENT", "LATENT")],
    },
    "VAEDecode": {"inputs": {"samples": "LATENT", "vae": "VAE"}, "widgets": [], "outputs": [("IMAGE", "IMAGE")]},
    "ImageToMask": {"inputs": {"image": "IMAGE"}, "widgets": ["channel"], "outputs": [("MASK", "MASK")]},
    "ThresholdMask": {"inputs": {"mask": "MASK"}, "widgets": ["value"], "outputs": [("MASK", "MASK")]},
    "SaveGLB": {"inputs": {"mesh": "MESH"}, "widgets": ["filename_prefix"], "outputs": []},
    # ComfyUI 0.38 core 3D / background-removal nodes (comfy_extras/nodes_mesh_postprocess.py, nodes_bg_removal.py);
    # DecimateMesh's placement_mode is a dynamic combo: its value "midpoint" has no sub-widgets
    "DecimateMesh": {
        "inputs": {"mesh": "MESH"},
        "widgets": ["target_face_count", "placement_mode"],
        "outputs": [("mesh", "MESH")],
    },
    "UnwrapMesh": {
        "inputs": {"mesh": "MESH"},
        "widgets": ["segmenter", "resolution", "padding", "weld_distance"],
        "outputs": [("mesh", "MESH")],
    },
    "LoadBackgroundRemovalModel": {
        "inputs": {},
        "widgets": ["bg_removal_name"],
        "outputs": [("bg_model", "BACKGROUND_REMOVAL")],
    },
    "RemoveBackground": {
        "inputs": {"bg_removal_model": "BACKGROUND_REMOVAL", "image": "IMAGE"},
        "widgets": ["resolution"],
        "outputs": [("mask", "MASK")],
    },
    "Note": {"inputs": {}, "widgets": ["text"], "outputs": []},
}
FRONTEND_ONLY = {"Note"}
# the ComfyUI version whose source these core nodes were read from (they are absent from 0.3.x)
CORE_3D_VERSION = "0.38.1"


def our_nodes() -> dict[str, type]:
    """Our node descriptions by id (imports the pack without ComfyUI; only the framework-free spec is read)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("d3ds2_stub_loader", Path(__file__).parent / "stubs" / "pack.py")
    stubs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stubs)
    stubs.load_pack(v3=False)
    try:
        return {n.node_id: n for n in sys.modules[f"{stubs.NAME}.nodes"].NODES}
    finally:
        stubs.unload()


def node_sockets(type_: str, ours: dict) -> dict:
    """{'inputs': {name: type}, 'optional': set, 'widgets': [names], 'outputs': [(name, type)]} of any node used."""
    if type_ in CORE_NODES:
        d = CORE_NODES[type_]
        return {
            "inputs": dict(d["inputs"]),
            "optional": set(),
            "widgets": list(d["widgets"]),
            "outputs": list(d["outputs"]),
        }
    from importlib import import_module  # noqa: F401  (keeps the signature symmetric)

    n = ours[type_]
    widgets = []
    for i in n.inputs:
        if i.type in ("INT", "FLOAT", "BOOLEAN", "STRING", "COMBO"):
            widgets.append(i.name)
            if i.seed:
                widgets.append("control_after_generate")
    return {
        "inputs": {i.name: i.type for i in n.inputs if i.type not in ("INT", "FLOAT", "BOOLEAN", "STRING", "COMBO")},
        "optional": {i.name for i in n.inputs if i.optional},
        "widgets": widgets,
        "outputs": [(o.name, o.type) for o in n.outputs],
    }


def _defaults(n) -> list:
    vals = []
    for i in n.inputs:
        if i.type in ("INT", "FLOAT", "BOOLEAN", "STRING", "COMBO"):
            vals.append(i.default)
            if i.seed:
                vals.append("fixed")
    return vals


class Graph:
    def __init__(self, ours: dict):
        self.ours = ours
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(
        self, type_: str, pos, widgets: dict | list | None = None, size=(320, 130), title: str | None = None
    ) -> dict:
        s = node_sockets(type_, self.ours)
        if type_ in self.ours:
            values = _defaults(self.ours[type_])
            for k, v in (widgets or {}).items():
                values[s["widgets"].index(k)] = v
            props = {"Node name for S&R": type_, "aux_id": AUX_ID}
        else:
            values = list(widgets or [])
            props = {"Node name for S&R": type_}
        node = {
            "id": len(self.nodes) + 1,
            "type": type_,
            "pos": list(pos),
            "size": list(size),
            "flags": {},
            "order": len(self.nodes),
            "mode": 0,
            "inputs": [{"name": k, "type": t, "link": None} for k, t in s["inputs"].items()],
            "outputs": [{"name": k, "type": t, "links": [], "slot_index": j} for j, (k, t) in enumerate(s["outputs"])],
            "properties": props,
            "widgets_values": values,
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def link(self, src: dict, out_slot: int, dst: dict, in_name: str) -> None:
        lid = len(self.links) + 1
        slot = next(j for j, i in enumerate(dst["inputs"]) if i["name"] == in_name)
        typ = src["outputs"][out_slot]["type"]
        self.links.append([lid, src["id"], out_slot, dst["id"], slot, typ])
        src["outputs"][out_slot]["links"].append(lid)
        dst["inputs"][slot]["link"] = lid

    def workflow(self) -> dict:
        return {
            "id": "00000000-0000-4000-8000-00000000d3d5",
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4,
        }


NOTE_TINY = (
    "Direct3D-S2: the model loader downloads about 5 GB of weights into models/direct3d_s2/ the first time "
    "(or put the files there yourself). Choose variant 'tiny-random' to try the graph without weights "
    "(13-17 s measured on a 2-core CPU, see the README): its meshes are meaningless."
)


def workflow_separate_nodes(ours) -> dict:
    g = Graph(ours)
    note = g.add(
        "Note",
        (20, 420),
        [NOTE_TINY + " LoadImage gives 1 - alpha as MASK, so Encode Image keeps 'mask_is_background' on."],
        size=(360, 140),
    )
    del note
    img = g.add("LoadImage", (20, 20), ["example.png", "image"], size=(320, 360))
    model = g.add("D3DS2LoadModel", (380, 20), size=(320, 200))
    enc = g.add("D3DS2EncodeImage", (380, 260))
    dense = g.add("D3DS2SampleDense", (740, 20))
    dec = g.add("D3DS2DecodeDense", (740, 200))
    s512 = g.add("D3DS2SampleSparse", (1100, 20), size=(320, 200))
    d512 = g.add("D3DS2DecodeSparse", (1100, 260))
    m2s = g.add("D3DS2MeshToStructure", (1460, 20))
    s1024 = g.add("D3DS2SampleSparse", (1460, 180), {"steps": 15}, size=(320, 200))
    d1024 = g.add("D3DS2DecodeSparse", (1460, 420))
    colour = g.add("D3DS2ColourFromImage", (1820, 20), size=(320, 200))
    save = g.add("D3DS2SaveMesh", (2180, 20), size=(360, 400))
    g.link(img, 0, enc, "image")
    g.link(img, 1, enc, "mask")
    for n in (enc, dense, dec, s512, d512, m2s, s1024, d1024):
        g.link(model, 0, n, "model")
    g.link(enc, 0, dense, "conditioning")
    g.link(dense, 0, dec, "dense_latent")
    g.link(enc, 0, s512, "conditioning")
    g.link(dec, 0, s512, "structure")
    g.link(s512, 0, d512, "sparse_latent")
    g.link(d512, 0, m2s, "mesh")
    g.link(enc, 0, s1024, "conditioning")
    g.link(m2s, 0, s1024, "structure")
    g.link(s1024, 0, d1024, "sparse_latent")
    g.link(d1024, 0, colour, "mesh")  # vertex colours from the same picture (no weights), saved as GLB COLOR_0
    g.link(img, 0, colour, "image")
    g.link(img, 1, colour, "mask")
    g.link(colour, 0, save, "mesh")
    return g.workflow()


NOTE_SDXL = " The text-to-image part still needs its SDXL checkpoint (models/checkpoints/sd_xl_base_1.0.safetensors)."
PROMPT = "a single ceramic teapot, product photo, centered, plain white background, soft light"
NEGATIVE = "cropped, cluttered background, text, multiple objects"


def _text_to_image(g: Graph):
    """Core text-to-image nodes (SDXL checkpoint); returns the VAEDecode node (IMAGE output 0)."""
    ckpt = g.add("CheckpointLoaderSimple", (20, 20), ["sd_xl_base_1.0.safetensors"], size=(320, 100))
    pos = g.add("CLIPTextEncode", (20, 160), [PROMPT], size=(320, 160))
    neg = g.add("CLIPTextEncode", (20, 360), [NEGATIVE], size=(320, 140))
    lat = g.add("EmptyLatentImage", (380, 360), [1024, 1024, 1], size=(280, 110))
    ks = g.add("KSampler", (380, 20), [42, "fixed", 25, 6.0, "euler", "normal", 1.0], size=(300, 270))
    vae = g.add("VAEDecode", (720, 20), [], size=(200, 50))
    g.link(ckpt, 0, ks, "model")
    g.link(ckpt, 1, pos, "clip")
    g.link(ckpt, 1, neg, "clip")
    g.link(pos, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(lat, 0, ks, "latent_image")
    g.link(ks, 0, vae, "samples")
    g.link(ckpt, 2, vae, "vae")
    return vae


def _image_to_512_mesh(g: Graph, image: dict, mask: dict, mask_is_background: bool) -> dict:
    """Our nodes from an IMAGE + MASK to a 512 mesh saved by core SaveGLB; returns the loader."""
    model = g.add("D3DS2LoadModel", (1000, 300), {"sparse_1024": False}, size=(320, 200))
    enc = g.add("D3DS2EncodeImage", (1000, 20), {"mask_is_background": mask_is_background})
    dense = g.add("D3DS2SampleDense", (1360, 20))
    dec = g.add("D3DS2DecodeDense", (1360, 200))
    s512 = g.add("D3DS2SampleSparse", (1720, 20), size=(320, 200))
    d512 = g.add("D3DS2DecodeSparse", (1720, 260))
    save = g.add("SaveGLB", (2080, 20), ["mesh/Direct3D-S2"], size=(360, 400))
    g.link(image, 0, enc, "image")
    g.link(mask, 0, enc, "mask")
    for n in (enc, dense, dec, s512, d512):
        g.link(model, 0, n, "model")
    g.link(enc, 0, dense, "conditioning")
    g.link(dense, 0, dec, "dense_latent")
    g.link(enc, 0, s512, "conditioning")
    g.link(dec, 0, s512, "structure")
    g.link(s512, 0, d512, "sparse_latent")
    g.link(d512, 0, save, "mesh")
    return model


def _text_to_mesh(ours, note: str, mask_from_image, mask_is_background: bool) -> dict:
    """Note, core text-to-image, `mask_from_image(g, vae)` (adds the mask nodes, returns the MASK node), then
    our 512 chain."""
    g = Graph(ours)
    g.add("Note", (20, 560), [note + NOTE_TINY + NOTE_SDXL], size=(420, 220))
    vae = _text_to_image(g)
    _image_to_512_mesh(g, vae, mask_from_image(g, vae), mask_is_background)
    return g.workflow()


def _near_white_is_background(g: Graph, vae: dict) -> dict:
    to_mask = g.add("ImageToMask", (720, 120), ["red"], size=(240, 60))
    thr = g.add("ThresholdMask", (720, 220), [0.95], size=(240, 60))
    g.link(vae, 0, to_mask, "image")
    g.link(to_mask, 0, thr, "mask")
    return thr


def _remove_background(g: Graph, vae: dict) -> dict:
    bg = g.add("LoadBackgroundRemovalModel", (720, 120), ["birefnet.safetensors"], size=(240, 60))
    rm = g.add("RemoveBackground", (720, 220), [1024], size=(240, 80))
    g.link(bg, 0, rm, "bg_removal_model")
    g.link(vae, 0, rm, "image")
    return rm


def workflow_text_to_mesh(ours) -> dict:
    note = (
        "Text to image with core nodes, then image to mesh. Works on any ComfyUI. The mask path here is a "
        "placeholder made of core nodes (near-white pixels = background, for prompts asking for a plain white "
        "background). On ComfyUI " + CORE_3D_VERSION + " or newer use direct3d_s2_text_to_image_rembg_to_mesh "
        "(core Remove Background) instead, or connect any background-removal node's MASK to Encode Image and "
        "switch 'mask_is_background' off (those masks are 1 on the object). "
    )
    return _text_to_mesh(ours, note, _near_white_is_background, mask_is_background=True)


def workflow_text_to_mesh_rembg(ours) -> dict:
    note = (
        "Needs ComfyUI " + CORE_3D_VERSION + " or newer (core Load Background Removal Model and Remove "
        "Background; put birefnet.safetensors from Comfy-Org/BiRefNet into models/background_removal/). Text to "
        "image with core nodes; Remove Background's MASK is 1 on the object, so Encode Image has "
        "'mask_is_background' off. Older ComfyUI: use direct3d_s2_text_to_image_to_mesh. "
    )
    return _text_to_mesh(ours, note, _remove_background, mask_is_background=False)


def _image_to_mesh_node(g: Graph) -> dict:
    """LoadImage and Load Model into the all-in-one Image To Mesh node; returns it (MESH output 0). Node and
    link ids follow the order of the calls, so the saved workflows depend on this order."""
    img = g.add("LoadImage", (20, 20), ["example.png", "image"], size=(320, 360))
    model = g.add("D3DS2LoadModel", (380, 20), size=(320, 200))
    i2m = g.add("D3DS2ImageToMesh", (380, 260), size=(340, 420))
    g.link(model, 0, i2m, "model")
    g.link(img, 0, i2m, "image")
    g.link(img, 1, i2m, "mask")
    return i2m


def workflow_decimate_unwrap(ours) -> dict:
    g = Graph(ours)
    g.add(
        "Note",
        (20, 420),
        [
            "Needs ComfyUI " + CORE_3D_VERSION + " or newer (core Decimate Mesh and Unwrap Mesh "
            "UVs). Our mesh is a core MESH, so core's mesh tools take it directly: decimate the "
            "1024 mesh to 50k faces, add a UV atlas, save with core Save 3D Model. " + NOTE_TINY
        ],
        size=(360, 160),
    )
    i2m = _image_to_mesh_node(g)
    dec = g.add("DecimateMesh", (760, 20), [50000, "midpoint"], size=(300, 110))
    uv = g.add("UnwrapMesh", (760, 170), ["pec", 1024, 1, 0.0], size=(300, 160))
    save = g.add("SaveGLB", (1100, 20), ["mesh/Direct3D-S2"], size=(360, 400))
    g.link(i2m, 0, dec, "mesh")
    g.link(dec, 0, uv, "mesh")
    g.link(uv, 0, save, "mesh")
    return g.workflow()


def workflow_all_in_one(ours) -> dict:
    g = Graph(ours)
    g.add("Note", (20, 420), [NOTE_TINY], size=(360, 120))
    i2m = _image_to_mesh_node(g)
    save = g.add("D3DS2SaveMesh", (760, 20), size=(360, 400))
    g.link(i2m, 0, save, "mesh")
    return g.workflow()


WORKFLOWS = {
    "direct3d_s2_image_to_mesh": workflow_separate_nodes,
    "direct3d_s2_text_to_image_to_mesh": workflow_text_to_mesh,
    "direct3d_s2_all_in_one": workflow_all_in_one,
    "direct3d_s2_text_to_image_rembg_to_mesh": workflow_text_to_mesh_rembg,
    "direct3d_s2_decimate_unwrap": workflow_decimate_unwrap,
}


def thumbnail(wf: dict, path: Path, width: int = 480) -> None:
    """A small diagram: one box per node (ours blue, core grey), links as lines."""
    from PIL import Image, ImageDraw

    nodes = {n["id"]: n for n in wf["nodes"]}
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes.values())
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes.values())
    k = (width - 20) / x1
    height = int(y1 * k) + 20
    im = Image.new("RGB", (width, height), (32, 32, 36))
    d = ImageDraw.Draw(im)

    def box(n):
        x, y = n["pos"]
        w, h = n["size"]
        return (10 + x * k, 10 + y * k, 10 + (x + w) * k, 10 + (y + h) * k)

    for _, a, _, b, _, _ in wf["links"]:
        (_, ay0, ax1, ay1), (bx0, by0, _, by1) = box(nodes[a]), box(nodes[b])
        d.line([(ax1, (ay0 + ay1) / 2), (bx0, (by0 + by1) / 2)], fill=(200, 200, 120), width=1)
    for n in nodes.values():
        ours = n["type"].startswith("D3DS2")
        d.rectangle(box(n), fill=(40, 80, 140) if ours else (70, 70, 76), outline=(220, 220, 220))
        label = n["type"].removeprefix("D3DS2")
        d.text((box(n)[0] + 3, box(n)[1] + 2), label[:14], fill=(255, 255, 255))
    im.save(path, "JPEG", quality=85)


def write_all() -> list[Path]:
    ours = our_nodes()
    EXAMPLES.mkdir(exist_ok=True)
    out = []
    for name, build in WORKFLOWS.items():
        wf = build(ours)
        p = EXAMPLES / f"{name}.json"
        p.write_text(json.dumps(wf, indent=1) + "\n")
        thumbnail(wf, p.with_suffix(".jpg"))
        out += [p, p.with_suffix(".jpg")]
    return out


def to_api_prompt(wf: dict, ours: dict, overrides: dict[str, dict] | None = None) -> dict:
    """UI workflow → API prompt (`{id: {class_type, inputs}}`); `overrides[type] = {widget: value}`."""
    links = {lk[0]: lk for lk in wf["links"]}
    prompt = {}
    for n in wf["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        s = node_sockets(n["type"], ours)
        inputs = {}
        for name, value in zip(s["widgets"], n["widgets_values"]):
            if name not in ("control_after_generate", "upload"):
                inputs[name] = value
        inputs.update((overrides or {}).get(n["type"], {}))
        for i in n["inputs"]:
            if i["link"] is not None:
                _, src, slot, _, _, _ = links[i["link"]]
                inputs[i["name"]] = [str(src), slot]
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt
