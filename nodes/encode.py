"""Image encoder node."""

from __future__ import annotations

from ..s2core import pipeline
from . import _comfy
from ._mask import MASK_INPUTS, object_mask
from ._spec import COND, IMAGE, MODEL, In, Node, Out


class EncodeImage(Node):
    node_id = "D3DS2EncodeImage"
    display_name = "Direct3D-S2 Encode Image"
    description = (
        "Crops the object out of the image with its mask, centres it on white and encodes it with "
        "DINOv2 (the conditioning of every stage)."
    )
    inputs = (
        In("model", MODEL, "The model from Load Direct3D-S2 Model."),
        In("image", IMAGE, "The picture of one object. Several images make a batch: one mesh each."),
        *MASK_INPUTS,
    )
    outputs = (Out(COND, "conditioning", "Image features for the samplers."),)

    @classmethod
    def run(cls, model, image, mask=None, mask_is_background=True):
        cond = pipeline.encode_image(
            model, image, object_mask(mask, mask_is_background), should_stop=_comfy.should_stop
        )
        return (cond.to(_comfy.intermediate_device()),), None
