"""All-in-one node: the whole official chain in one node."""

from __future__ import annotations

from ..s2core import pipeline
from . import _comfy
from ._mask import MASK_INPUTS, object_mask
from ._spec import IMAGE, MESH_OUT, MODEL, SEED_MAX, In, Node


class ImageToMesh(Node):
    node_id = "D3DS2ImageToMesh"
    display_name = "Direct3D-S2 Image to Mesh"
    description = (
        "Image in, mesh out: encode, dense stage, 512 stage, then (at 1024) the 1024 stage, with the "
        "original's defaults. Use the separate nodes to stop early or reuse a structure."
    )
    inputs = (
        In("model", MODEL, "The model from Load Direct3D-S2 Model (with the stages this resolution needs)."),
        In("image", IMAGE, "The picture of one object; a batch gives one mesh per image."),
        *MASK_INPUTS,
        In(
            "seed",
            "INT",
            "Noise seed of every stage; batch item i uses seed + i.",
            default=0,
            min=0,
            max=SEED_MAX,
            seed=True,
        ),
        In(
            "resolution",
            "COMBO",
            "1024: finest detail (measured peak 4.2 GiB of GPU memory allocated, H100, "
            "batch 1); 512: faster, 4.1 GiB peak.",
            default="1024",
            options=("1024", "512"),
        ),
        In("dense_steps", "INT", "Coarse-stage steps. 50 matches the original.", default=50, min=1, max=200),
        In("sparse_512_steps", "INT", "512-stage steps. 30 matches the original.", default=30, min=1, max=200),
        In("sparse_1024_steps", "INT", "1024-stage steps. 15 matches the original.", default=15, min=1, max=200),
        In(
            "guidance",
            "FLOAT",
            "How strongly the shape follows the image. 7 matches the original.",
            default=7.0,
            min=0.0,
            max=30.0,
            step=0.1,
        ),
        In(
            "mc_threshold",
            "FLOAT",
            "Surface iso-level. 0.2 matches the original.",
            default=0.2,
            min=0.0,
            max=0.9,
            step=0.01,
        ),
        In(
            "remove_interior",
            "BOOLEAN",
            "Run the 1024 refiner that removes the inner shell. Off: faster, but the mesh has a second, inner surface.",
            default=True,
        ),
        In(
            "refine_512",
            "BOOLEAN",
            "Run the 512 interior-removal refiner, as the original always does. Off: "
            "faster, but the 512 mesh keeps an inner shell.",
            default=True,
        ),
        In(
            "max_tokens",
            "INT",
            "Refuse 1024 structures with more sparse tokens than this (a memory budget). 0: no limit.",
            default=0,
            min=0,
            max=10_000_000,
        ),
    )
    outputs = (MESH_OUT,)

    @classmethod
    def run(
        cls,
        model,
        image,
        mask=None,
        mask_is_background=True,
        seed=0,
        resolution="1024",
        dense_steps=50,
        sparse_512_steps=30,
        sparse_1024_steps=15,
        guidance=7.0,
        mc_threshold=0.2,
        remove_interior=True,
        refine_512=True,
        max_tokens=0,
    ):
        mask = object_mask(mask, mask_is_background)
        total = dense_steps + sparse_512_steps + (sparse_1024_steps if resolution == "1024" else 0)
        mesh = pipeline.image_to_mesh(
            model,
            image,
            mask,
            seed,
            int(resolution),
            dense_steps,
            sparse_512_steps,
            sparse_1024_steps,
            guidance,
            mc_threshold,
            remove_interior,
            max_tokens=max_tokens,
            refine_512=refine_512,
            callback=_comfy.progress(total),
            should_stop=_comfy.should_stop,
        )
        return (_comfy.to_comfy_mesh(mesh),), None
