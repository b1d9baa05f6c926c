"""Model loader node."""

from __future__ import annotations

import torch

from ..s2core import loading
from . import _comfy
from ._spec import MODEL, In, Node, Out

PRECISIONS = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class LoadModel(Node):
    node_id = "D3DS2LoadModel"
    display_name = "Load Direct3D-S2 Model"
    description = (
        "Loads the Direct3D-S2 networks for the chosen stages from models/direct3d_s2/<variant>/, "
        "downloading missing files from Hugging Face if allowed. 'tiny-random' needs no files: it "
        "builds a tiny network with random weights whose meshes are meaningless (for testing graphs)."
    )
    inputs = (
        In(
            "variant",
            "COMBO",
            "Which release to load. v1.1 is the current official model; tiny-random is a "
            "seconds-fast random stand-in for testing graphs (its meshes are meaningless).",
            default="v1.1",
            options=loading.VARIANTS,
        ),
        In(
            "dense",
            "BOOLEAN",
            "Load the coarse (dense) stage. Needed to go from an image to a first structure.",
            default=True,
        ),
        In("sparse_512", "BOOLEAN", "Load the 512 stage (sparse DiT, VAE and refiner).", default=True),
        In(
            "sparse_1024",
            "BOOLEAN",
            "Load the 1024 stage. Off saves memory and download if you stop at 512.",
            default=True,
        ),
        In(
            "precision",
            "COMBO",
            "Compute precision. auto: fp16 on a GPU (as the original), fp32 on CPU.",
            default="auto",
            options=tuple(PRECISIONS),
        ),
        In(
            "allow_download",
            "BOOLEAN",
            "Download missing weights (about 5 GB) into models/direct3d_s2/. Off: only use files already on disk.",
            default=True,
        ),
    )
    outputs = (Out(MODEL, "model", "The loaded networks; connect to every Direct3D-S2 node."),)

    @classmethod
    def run(cls, variant, dense=True, sparse_512=True, sparse_1024=True, precision="auto", allow_download=True):
        stages = tuple(s for s, on in zip(loading.STAGES, (dense, sparse_512, sparse_1024)) if on)
        if not stages:
            raise ValueError("No stage is selected; turn on at least one of dense, sparse_512, sparse_1024.")
        placement = _comfy.ComfyPlacement()
        models_dir = None if variant == "tiny-random" else _comfy.models_dir()
        models = loading.load_models(
            variant,
            stages,
            placement.device,
            PRECISIONS[precision],
            models_dir=models_dir,
            allow_download=allow_download,
            progress=_comfy.download_progress_class(),
            placement=placement,
        )
        return (models,), None
