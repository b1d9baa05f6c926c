"""Image encoder node."""
from __future__ import annotations

from ..s2core import pipeline
from . import _comfy
from ._spec import COND, IMAGE, MASK, MODEL, In, Node, Out


class EncodeImage(Node):
    node_id = "D3DS2EncodeImage"
    display_name = "Direct3D-S2 Encode Image"
    description = ("Crops the object out of the image with its mask, centres it on white and encodes it with "
                   "DINOv2 (the conditioning of every stage).")
    inputs = (
        In("model", MODEL, "The model from Load Direct3D-S2 Model."),
        In("image", IMAGE, "The picture of one object. Several images make a batch: one mesh each."),
        In("mask", MASK, "Where the object is. Without it the whole image is treated as the object, so use a "
           "background-removal node or an image with transparency.", optional=True),
        In("mask_is_background", "BOOLEAN", "On: the mask is 1 on the background, as Load Image gives it "
           "(1 - alpha). Off: the mask is 1 on the object, as most background-removal nodes give it.",
           default=True),
    )
    outputs = (Out(COND, "conditioning", "Image features for the samplers."),)

    @classmethod
    def run(cls, model, image, mask=None, mask_is_background=True):
        if mask is not None and mask_is_background:
            mask = 1.0 - mask
        cond = pipeline.encode_image(model, image, mask, should_stop=_comfy.should_stop)
        return (cond.to(_comfy.intermediate_device()),), None
