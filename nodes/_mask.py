"""The object-mask inputs every node that takes a picture shares, and how their values reach s2core.

`MASK_INPUTS` are the `mask` and `mask_is_background` inputs (one wording for Encode Image, Image to Mesh
and Colour From Image, which all hand the mask to `s2core.image.preprocess_image`); `object_mask` turns
their values into the mask s2core wants.
"""

from __future__ import annotations

from ._spec import MASK, In

# LoadImage's MASK for a file without alpha (JPG, RGB PNG): 64x64 zeros whatever the image size
LOAD_IMAGE_NO_ALPHA = (64, 64)

MASK_INPUTS = (
    In(
        "mask",
        MASK,
        "Where the object is. Without it the image's transparency is used, or else a plain "
        "background is keyed out; for any other picture connect a background-removal node.",
        optional=True,
    ),
    In(
        "mask_is_background",
        "BOOLEAN",
        "On: the mask is 1 on the background, as Load Image gives it "
        "(1 - alpha). Off: the mask is 1 on the object, as most background-removal nodes give it.",
        default=True,
    ),
)


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
