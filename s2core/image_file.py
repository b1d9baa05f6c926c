"""Reading the image (and mask) files the command line is given: bounded memory, one sentence per failure.

`read_image_and_mask(image_path, mask_path)` → (image `[H, W, 3|4]` uint8, alpha kept when the file has
one; mask `[H, W]` uint8, 255 = object, or None), both at most `MAX_SIDE` pixels on the longest side.

Limits. A file over `MAX_PIXELS` (2^27 = 134 million pixels, e.g. 16384 x 8192; 512 MiB once decoded
as 8-bit RGBA) is refused before it is decoded. A larger-than-`MAX_SIDE` (4096 px, the size
`image.preprocess_image` works at) file is downscaled before anything turns it into floats: JPEGs decode
straight at 1/2, 1/4 or 1/8 scale (`Image.draft`), other formats decode once as 8-bit and are resized
(peak: the 8-bit image, twice for RGBA, which PIL resizes premultiplied; a 12000x9000 JPEG takes ~225 MB,
an 8000x6000 RGBA PNG ~510 MB, `tests/test_reliability_inputs.py`).
PIL's own decompression-bomb guard (a warning above 89 M pixels, an error above 179 M) is replaced by
this explicit limit, so no raw PIL warning is printed.

Modes. 16-bit grey (`I;16*`, and 32-bit `I`, which older Pillow gives for 16-bit PNGs) is scaled by
255/65535, not clipped (a clipped 16-bit mask is nearly all 0 or all 255); float (`F`) files are taken as
0..1 and must be finite; palette, bilevel, CMYK, YCbCr and grey(+alpha) convert through PIL; EXIF
rotation is applied, as ComfyUI's LoadImage does.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .files import explain_os_error

log = logging.getLogger(__name__)

MAX_SIDE = 4096
MAX_PIXELS = 2**27
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_RESIZABLE = ("L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")  # bilinear works in these modes


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """`size` (W, H) scaled so its longest side is at most max_side (aspect kept, at least 1 px)."""
    w, h = size
    s = min(1.0, max_side / max(w, h))
    return max(1, round(w * s)), max(1, round(h * s))


def _open(path: Path, what: str, max_pixels: int) -> Image.Image:
    """Open the file (header only) with one sentence for a folder, a missing file, a non-image, a bomb."""
    if path.is_dir():
        raise IsADirectoryError(f"The {what} {path} is a folder; give the path of an image file inside it.")
    if not path.exists():
        raise FileNotFoundError(f"The {what} {path} does not exist; give the path of an image file.")
    try:
        with warnings.catch_warnings():  # our own size limit below replaces PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except UnidentifiedImageError:
        raise ValueError(f"The {what} {path} is not an image file PIL can read; use a PNG or JPEG.") from None
    except Image.DecompressionBombError:
        raise ValueError(
            f"The {what} {path} has more than {max_pixels:,} pixels, the most this reader decodes; "
            f"downscale it (to at most {MAX_SIDE} px on the longest side) first."
        ) from None
    except OSError as e:
        raise explain_os_error(e, path, "read") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ValueError(
            f"The {what} {path} is {w}x{h} pixels ({w * h / 1e6:.0f} million), more than the "
            f"{max_pixels / 1e6:.0f} million this reader decodes; downscale it (to at most {MAX_SIDE} "
            "px on the longest side) first."
        )
    return im


def _decode(im: Image.Image, path: Path, what: str, max_side: int) -> bool:
    """Decode in place (at reduced scale where the format can), then apply EXIF rotation; one sentence if
    the file is broken. True if the rotation turned the image by 90° (its sides swapped)."""
    try:
        if max(im.size) > max_side:
            im.draft(im.mode, _fit(im.size, max_side))  # JPEG: decode at 1/2, 1/4 or 1/8 scale; others: no-op
        im.load()
        turned = im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
        ImageOps.exif_transpose(im, in_place=True)
        return turned
    except (SyntaxError, ValueError, EOFError, OSError, Image.DecompressionBombError) as e:
        if isinstance(e, OSError) and e.errno is not None:  # a real I/O error, not a decoding one
            raise explain_os_error(e, path, "read") from None
        reason = str(e).strip().rstrip(".") or type(e).__name__
        raise ValueError(
            f"The {what} {path} is damaged or incomplete (PIL: {reason}); export or download it again."
        ) from None


def _to_8bit_grey(im: Image.Image, what: str, target: tuple[int, int]) -> Image.Image:
    """16/32-bit integer or float grey → 'L' at the target size, scaled rather than clipped."""
    if im.mode == "F":
        a = np.asarray(im.resize(target, Image.BILINEAR) if im.size != target else im, dtype=np.float32)
        if not np.isfinite(a).all():
            raise ValueError(f"The {what} contains NaN or infinite pixel values; save it as an 8- or 16-bit PNG.")
        return Image.fromarray(np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8))
    im = im.convert("I") if im.mode != "I" else im  # I;16 variants → 32-bit int (lossless)
    if im.size != target:
        im = im.resize(target, Image.BILINEAR)
    a = np.asarray(im, dtype=np.int64)
    return Image.fromarray(((np.clip(a, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8))  # 65535 → 255


def convert_pil(
    im: Image.Image, as_mask: bool = False, what: str = "image", target: tuple[int, int] | None = None
) -> Image.Image:
    """Any PIL mode → 'L' (mask), 'RGBA' (image with alpha or a transparent colour) or 'RGB', with 16-bit
    and float grey scaled (module docstring); resized to `target` (W, H) if given. `what` names the input
    in messages."""
    target = target or im.size
    if im.mode in _WIDE_GREY or im.mode == "F":
        im = _to_8bit_grey(im, what, target)
    if im.size != target and im.mode in _RESIZABLE and "transparency" not in im.info:  # shrink first: the
        # conversion then works on few pixels (a transparent key colour must be turned into alpha before)
        im = im.resize(target, Image.BILINEAR, reducing_gap=3.0)
    has_alpha = "A" in im.getbands() or "transparency" in im.info
    mode = "L" if as_mask else ("RGBA" if has_alpha else "RGB")
    if im.mode != mode:
        try:
            im = im.convert(mode)
        except ValueError:
            raise ValueError(
                f"The {what} uses the colour mode {im.mode}, which cannot be converted to {mode}; "
                "save it as an RGB(A) PNG."
            ) from None
    if im.size != target:  # palette and bilevel images: resized after the conversion
        im = im.resize(target, Image.BILINEAR, reducing_gap=3.0)
    return im


def read_image_file(
    path: str | os.PathLike, *, as_mask: bool = False, max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """One image or mask file → (uint8 array, the file's size (W, H)); see the module docstring.

    Image: `[h, w, 3]`, or `[h, w, 4]` when the file has alpha or a transparent colour. Mask: `[h, w]`,
    grey level (alpha for a file that is only alpha would be lost; white = object). (w, h) fit max_side.
    """
    path = Path(path)
    what = "mask" if as_mask else "image"
    with _open(path, what, max_pixels) as im:
        size = im.size
        if _decode(im, path, what, max_side):
            size = size[::-1]
        target = _fit(size, max_side)
        if target != size:
            log.info("The %s %s is %dx%d; downscaled to %dx%d first.", what, path, *size, *target)
        return np.array(convert_pil(im, as_mask, f"{what} {path}", target)), size  # np.array: writable


def read_image_and_mask(
    image_path: str | os.PathLike,
    mask_path: str | os.PathLike | None = None,
    *,
    max_side: int = MAX_SIDE,
    max_pixels: int = MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The image `[h, w, 3|4]` uint8 and the mask `[h, w]` uint8 (or None), checked to be the same size."""
    image, size = read_image_file(image_path, max_side=max_side, max_pixels=max_pixels)
    if mask_path is None:
        return image, None
    mask, mask_size = read_image_file(mask_path, as_mask=True, max_side=max_side, max_pixels=max_pixels)
    if mask_size != size:
        raise ValueError(
            f"The mask {mask_path} is {mask_size[0]}x{mask_size[1]} but the image {image_path} is "
            f"{size[0]}x{size[1]}; give a mask of the same size."
        )
    return image, mask
