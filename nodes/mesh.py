"""Mesh nodes: mesh -> 1024 structure, post-processing, saving."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import torch

from ..s2core import pipeline, results
from ..s2core.mesh.export import check_filename_prefix
from . import _comfy
from ._spec import MESH, MODEL, STRUCTURE, In, Node, Out

FORMATS = ("glb", "obj", "ply", "stl")
log = logging.getLogger(__name__)


class MeshToStructure(Node):
    node_id = "D3DS2MeshToStructure"
    display_name = "Direct3D-S2 Mesh to 1024 Structure"
    description = (
        "Normalises a mesh and voxelizes its surface into the sparse cells of the 1024 stage "
        "(the original's step between 512 and 1024). Any MESH works, not only ours."
    )
    inputs = (
        In("model", MODEL, "The model from Load Direct3D-S2 Model (its 1024 stage sets the grid)."),
        In("mesh", MESH, "Usually the 512 mesh from Sparse Decode; any closed mesh can be refined."),
    )
    outputs = (Out(STRUCTURE, "structure", "Sparse cells for the 1024 sparse sampler."),)

    @classmethod
    def run(cls, model, mesh):
        structure = pipeline.mesh_to_structure(model, _comfy.from_comfy_mesh(mesh), _comfy.should_stop)
        return (structure.to(_comfy.intermediate_device()),), None


class PostprocessMesh(Node):
    node_id = "D3DS2PostprocessMesh"
    display_name = "Direct3D-S2 Post-process Mesh"
    description = "Fills small holes and simplifies the mesh (the original's optional remesh step)."
    inputs = (
        In("mesh", MESH, "Any mesh."),
        In(
            "simplify",
            "BOOLEAN",
            "Reduce the face count. Off keeps every face (1024 meshes have millions).",
            default=True,
        ),
        In(
            "simplify_ratio",
            "FLOAT",
            "Fraction of faces to remove. 0.95 (the original) keeps 5 %: a much smaller file with less fine detail.",
            default=0.95,
            min=0.0,
            max=0.999,
            step=0.005,
        ),
        In("fill_holes", "BOOLEAN", "Close small holes in the surface.", default=False),
        In("remove_debris", "BOOLEAN", "Delete small disconnected pieces (under 1 % of the faces).", default=False),
    )
    outputs = (Out(MESH, "mesh", "The processed mesh."),)

    @classmethod
    def run(cls, mesh, simplify=True, simplify_ratio=0.95, fill_holes=False, remove_debris=False):
        out = pipeline.postprocess(
            _comfy.from_comfy_mesh(mesh), simplify, simplify_ratio, fill_holes, remove_debris, _comfy.should_stop
        )
        return (_comfy.to_comfy_mesh(out),), None


class SaveMesh(Node):
    node_id = "D3DS2SaveMesh"
    display_name = "Direct3D-S2 Save Mesh"
    description = (
        "Saves each mesh of the batch to its own file <prefix>_00001_.<format>, <prefix>_00002_..., "
        "without the batch's zero padding (items without faces are skipped), and shows them in the 3D "
        "viewer. GLB files record the workflow (unless --disable-metadata), seed, resolution and model "
        "variant. Writes geometry and vertex colours, and in GLB a mesh's UVs and texture (Colour From Image "
        "with texture_size); other UV and material maps: use core Save 3D Model."
    )
    inputs = (
        In("mesh", MESH, "The mesh (or batch of meshes) to save; any MESH works, not only ours."),
        In(
            "filename_prefix",
            "STRING",
            "Sub-folder and file name start inside ComfyUI's output folder; %date% style fields work as in Save Image.",
            default="mesh/Direct3D-S2",
        ),
        In(
            "format",
            "COMBO",
            "glb: one file with provenance, opens in the 3D viewer; obj/ply/stl for other tools.",
            default="glb",
            options=FORMATS,
        ),
    )
    outputs = (Out("STRING", "model_file", "Path relative to the output folder (for Preview 3D)."),)
    output_node = True
    hidden_prompt = True

    @classmethod
    def run(cls, mesh, filename_prefix="mesh/Direct3D-S2", format="glb", prompt=None, extra_pnginfo=None):
        texture = getattr(mesh, "texture", None)
        uvs = _comfy.item_uvs(mesh) if texture is not None else None
        texture = torch.as_tensor(texture) if uvs is not None else None
        if texture is not None and texture.ndim == 3:  # one unbatched image
            texture = texture[None]
        mesh = _comfy.from_comfy_mesh(mesh)  # padding removed: each item keeps only its own vertices/faces
        metadata = {k: v for k, v in mesh.info.items()}
        if not _comfy.disable_metadata():
            if prompt is not None:
                metadata["prompt"] = json.dumps(prompt)
            for k, v in (extra_pnginfo or {}).items():
                metadata[k] = json.dumps(v)
        check_filename_prefix(filename_prefix)  # one clear sentence before ComfyUI's generic refusal
        keep = [i for i in range(mesh.batch_size) if mesh.face_counts[i] > 0]
        if not keep:
            raise ValueError(
                "The mesh input has no faces in any batch item, so there is nothing to save; "
                "check the upstream decode (a lower threshold keeps more surface)."
            )
        for i in sorted(set(range(mesh.batch_size)) - set(keep)):
            log.warning("Direct3D-S2 Save Mesh: batch item %d has no faces; skipped.", i)
        folder, name, counter, subfolder = _comfy.output_path(filename_prefix)
        files = []
        for i in keep:  # one file per non-empty batch item, numbered like core SaveGLB
            for _ in range(1000):  # the name is claimed exclusively: if another run took it meanwhile, take the next
                f, counter = f"{name}_{counter:05}_.{format}", counter + 1
                try:
                    j = i if uvs is None or i < texture.shape[0] else 0  # one texture may serve the batch
                    tex = {} if uvs is None else {"uvs": [uvs[i]], "texture": texture[j : j + 1]}
                    pipeline.save(_item(mesh, i), os.path.join(folder, f), metadata, **tex)
                    break
                except FileExistsError:
                    continue
            else:
                raise FileExistsError(f"1000 file names after {name} in {folder} are taken; change filename_prefix.")
            files.append(f)
        ui = {"3d": [{"filename": f, "subfolder": subfolder, "type": "output"} for f in files]}
        return (os.path.join(subfolder, files[0]).replace(os.sep, "/"),), ui


def _item(mesh: results.Mesh, i: int) -> results.Mesh:
    """Batch item i as a one-item Mesh (with its vertex colours where the record carries them)."""
    out = results.Mesh.from_list([mesh.item(i)], mesh.resolution, mesh.info)
    colors = getattr(mesh, "vertex_colors", None)
    if isinstance(colors, torch.Tensor):
        start = sum(mesh.vertex_counts[:i])
        out = dataclasses.replace(out, vertex_colors=colors[start : start + mesh.vertex_counts[i]])
    return out
