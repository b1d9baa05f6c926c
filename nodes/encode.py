"""Image encoder node."""
from __future__ import annotations

from ..s2core import pipeline
from . import _comfy
from ._spec import COND, IMAGE, MASK, MODEL, In, Node, Out


# LoadImage's MASK for a file without alpha (JPG, RGB PNG): 64x64 zeros whatever the image size
LOAD_IMAGE_NO_ALPHA = (64, 64)


def object_mask(mask, mask_is_background: bool):
    """The MASK input as s2core wants it (1 = object), or None for "no mask".

    LoadImage's 64x64 all-zero MASK for images without alpha means no mask: the image's own background is
    keyed out then, as when nothing is connected (it is not resized to the image, nor inverted into
    "everything is the object")."""
    if mask is None:
        return None
    if tuple(mask.shape[-2:]) == LOAD_IMAGE_NO_ALPHA and not bool(mask.any()):
        return None
    return 1.0 - mask if mask_is_background else mask


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
        cond = pipeline.encode_image(model, image, object_mask(mask, mask_is_background),
                                     should_stop=_comfy.should_stop)
        return (cond.to(_comfy.intermediate_device()),), None
