"""Colour From Image: vertex colours for a mesh from the picture it was made from (s2core.colour)."""

from __future__ import annotations

import torch

from ..s2core.colour import colour_mesh, render_preview
from . import _comfy
from ._mask import MASK_INPUTS, object_mask
from ._spec import IMAGE, MESH, In, Node, Out

PREVIEW = 512  # side of the preview render, pixels


class ColourFromImage(Node):
    node_id = "D3DS2ColourFromImage"
    display_name = "Direct3D-S2 Colour From Image"
    description = (
        "Finds the camera of the input picture from the object's silhouette, paints the visible "
        "surface with the picture's colours and fills the hidden side from its neighbours over the "
        "surface. No model weights. Save the mesh as GLB or PLY to keep the colours; colour after "
        "post-processing (simplifying changes the vertices and drops the colours). With texture_size > 0 "
        "and a mesh from core Unwrap Mesh UVs, also bakes a texture: the picture where seen, the vertex colours elsewhere."
    )
    inputs = (
        In("mesh", MESH, "The mesh made from this picture (any mesh works if the picture shows it)."),
        In("image", IMAGE, "The same picture given to Encode Image."),
        *MASK_INPUTS,
        In(
            "mirror_symmetry",
            "BOOLEAN",
            "Copy colours across the object's mirror plane to the hidden side when "
            "the shape is clearly symmetric (a face, a car); off: the hidden side only blends its surroundings.",
            default=True,
        ),
        In(
            "texture_size",
            "INT",
            "0: vertex colours only. Above 0: also bake them into a square texture of this many texels on the "
            "mesh's UVs (connect core Unwrap Mesh UVs first, ComfyUI 0.38.1+); the picture per texel where seen.",
            default=0,
            min=0,
            max=4096,
            step=64,
        ),
    )
    outputs = (
        Out(MESH, "mesh", "The mesh with vertex colours (and its UVs and texture when texture_size > 0)."),
        Out("STRING", "camera", "The camera found (azimuth, elevation, lens) and the silhouette IoU it reached."),
        Out(IMAGE, "preview", "The coloured mesh rendered from the found camera."),
    )

    @classmethod
    def run(cls, mesh, image, mask=None, mask_is_background=True, mirror_symmetry=True, texture_size=0):
        mask = object_mask(mask, mask_is_background)
        uvs = _comfy.item_uvs(mesh) if texture_size > 0 else None
        if texture_size > 0 and uvs is None:
            raise ValueError(
                "The mesh has no UVs, so texture_size cannot bake a texture; connect core Unwrap Mesh UVs "
                "(ComfyUI 0.38.1+) before this node, or set texture_size to 0."
            )
        m = _comfy.from_comfy_mesh(mesh).to(_comfy.compute_device())
        out, reports = colour_mesh(
            m,
            image,
            mask,
            symmetry=mirror_symmetry,
            uvs=uvs,
            texture_size=texture_size,
            callback=_comfy.progress(1),
            should_stop=_comfy.should_stop,
        )
        fields = {}
        if uvs is not None:  # core keeps MESH textures on the CPU
            fields = {"uvs": uvs, "texture": torch.stack([r.texture for r in reports]).cpu()}
        previews = torch.stack(
            [
                render_preview(v, f, r.camera.resized(PREVIEW, PREVIEW), out.item_colors(i))
                for i, ((v, f), r) in enumerate(zip(out.items(), reports))
            ]
        ).cpu()
        text = "\n".join(f"mesh {i}: {r.describe()}" for i, r in enumerate(reports))
        return (_comfy.to_comfy_mesh(out, **fields), text, previews), None
