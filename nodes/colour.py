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
        "post-processing (simplifying changes the vertices and drops the colours)."
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
    )
    outputs = (
        Out(MESH, "mesh", "The mesh with vertex colours."),
        Out("STRING", "camera", "The camera found (azimuth, elevation, lens) and the silhouette IoU it reached."),
        Out(IMAGE, "preview", "The coloured mesh rendered from the found camera."),
    )

    @classmethod
    def run(cls, mesh, image, mask=None, mask_is_background=True, mirror_symmetry=True):
        mask = object_mask(mask, mask_is_background)
        m = _comfy.from_comfy_mesh(mesh).to(_comfy.compute_device())
        out, reports = colour_mesh(
            m, image, mask, symmetry=mirror_symmetry, callback=_comfy.progress(1), should_stop=_comfy.should_stop
        )
        previews = torch.stack(
            [
                render_preview(v, f, r.camera.resized(PREVIEW, PREVIEW), out.item_colors(i))
                for i, ((v, f), r) in enumerate(zip(out.items(), reports))
            ]
        ).cpu()
        text = "\n".join(f"mesh {i}: {r.describe()}" for i, r in enumerate(reports))
        return (_comfy.to_comfy_mesh(out), text, previews), None
