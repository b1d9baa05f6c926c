"""Image preprocessing: an RGB image and the object's mask → the official 518² model input (SPEC.md §4.2).

`preprocess_image(image, mask)` returns `[B, 4, S, S]` float32 in [0, 1]: RGB composited on white ‖ the
mask, exactly as the original `utils/image.py: preprocess_image` builds it from an RGBA array:

1. foreground = alpha > 0; crop to its bounding box (unless it covers < 0.1 % of the image);
2. composite on white in float64, back to 8 bit by truncation;
3. pad to a square (white / mask 0), resize to S (RGB bilinear, mask nearest — PIL's filters, which the
   original reaches through torchvision), pad 16 px on every side, resize to S again.

Inputs accepted (one or a batch):

| argument | forms |
|---|---|
| `image` | ComfyUI IMAGE `[B, H, W, C]` / `[H, W, C]` float 0..1, C = 3/4 (1/2: grey, + alpha); PIL image of any mode (alpha or a transparent colour is used; 16-bit grey scaled by 255/65535); uint8 NumPy `[H, W, C]` |
| `mask`  | ComfyUI MASK `[B, H, W]` / `[H, W]` float 0..1; PIL image (grey level; 16-bit scaled); NumPy `[H, W]`; None |

Mask convention: **1 = object** (alpha). ComfyUI's LoadImage outputs `1 − alpha` as its MASK (the nodes'
`mask_is_background` input inverts it; here `invert_mask=True`), and 64×64 zeros for a file without alpha,
which the nodes pass on as no mask; background-removal nodes already give 1 = object. Priority: `mask`, else the image's own alpha, else — only when the image border is a
near-uniform colour (a product shot) — a mask keyed out against that border colour; otherwise a
ValueError asks for a mask. NaN or infinite pixels and empty batches are refused. Images larger than
`max_side` (4096) are downscaled first (bounded memory; the result then differs slightly from
full-resolution processing).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from .image_file import MAX_SIDE, convert_pil

log = logging.getLogger(__name__)

EXTRA_PAD = 16  # official margin (apply_joint_transforms, test=True)
MIN_SIDE = 8  # smaller inputs cannot hold an object worth reconstructing
BORDER_TOLERANCE = 24  # 8-bit colour distance that still counts as "background" when keying on the border


_ROWS = 1024  # rows converted at a time: bounds the float temporaries for huge inputs


def _to_uint8(x: torch.Tensor, what: str) -> np.ndarray:
    """`[H, W(, C)]` float 0..1 → uint8 (×255, rounded, clipped), in row chunks; NaN or ±inf → ValueError
    (clipping would turn +inf into a silent 255 and -inf into 0)."""
    out = np.empty(tuple(x.shape), np.uint8)
    for r in range(0, x.shape[0], _ROWS):
        chunk = x[r : r + _ROWS].detach().float().cpu().numpy()
        if not np.isfinite(chunk).all():
            raise ValueError(f"The {what} contains NaN or infinite values; check the node that produced it.")
        out[r : r + _ROWS] = np.clip(np.rint(chunk * 255.0), 0, 255)
    return out


def _split_images(image) -> list[np.ndarray]:
    """Any accepted image form → list of `[H, W, 3|4]` uint8 arrays (validated)."""
    if isinstance(image, Image.Image):  # any mode; 16-bit grey scaled, not clipped
        return [np.asarray(convert_pil(image))]
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
        if image.dtype == torch.uint8:
            image = image.float() / 255.0
    if not isinstance(image, torch.Tensor):
        raise ValueError(
            f"The image must be a ComfyUI IMAGE tensor, a PIL image or a NumPy array, got {type(image).__name__}."
        )
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise ValueError(f"The image must be shaped [B, H, W, C] (ComfyUI IMAGE), got {tuple(image.shape)}.")
    if image.shape[0] == 0:
        raise ValueError(f"The image batch is empty (shape {tuple(image.shape)}); connect at least one image.")
    if image.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(
            f"The image has {image.shape[-1]} channels; expected grey (1), grey+alpha (2), RGB (3) or "
            f"RGBA (4) in the last dimension (shape {tuple(image.shape)})."
        )
    if not image.is_floating_point():
        raise ValueError(f"The image tensor must be float in [0, 1], got {image.dtype}.")
    if image.shape[-1] <= 2:  # grey (+ alpha) → RGB (+ alpha)
        image = torch.cat([image[..., :1].expand(*image.shape[:-1], 3), image[..., 1:]], dim=-1)
    return [_to_uint8(image[b], "image") for b in range(image.shape[0])]


def _split_masks(mask, invert: bool) -> list[np.ndarray] | None:
    """Any accepted mask form → list of `[H, W]` uint8 alpha arrays (1 = object), or None."""
    if mask is None:
        return None
    if isinstance(mask, Image.Image):
        mask = torch.from_numpy(np.array(convert_pil(mask, as_mask=True, what="mask"))).float() / 255.0
    elif isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
        mask = mask.float() / 255.0 if mask.dtype == torch.uint8 else mask
    if not isinstance(mask, torch.Tensor):
        raise ValueError(
            f"The mask must be a ComfyUI MASK tensor, a PIL image or a NumPy array, got {type(mask).__name__}."
        )
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"The mask must be shaped [B, H, W] (ComfyUI MASK), got {tuple(mask.shape)}.")
    if mask.shape[0] == 0:
        raise ValueError(f"The mask batch is empty (shape {tuple(mask.shape)}); connect a mask per image, or none.")
    alphas = [_to_uint8(mask[b], "mask") for b in range(mask.shape[0])]
    return [255 - a for a in alphas] if invert else alphas


def _key_out_background(rgb: np.ndarray) -> np.ndarray:
    """Alpha for an image without mask or alpha, keyed against a uniform border colour (or ValueError)."""
    H, W = rgb.shape[:2]
    w = max(1, min(H, W) // 100)
    border = np.concatenate(
        [rgb[:w].reshape(-1, 3), rgb[-w:].reshape(-1, 3), rgb[:, :w].reshape(-1, 3), rgb[:, -w:].reshape(-1, 3)]
    ).astype(np.int16)
    bg = np.median(border, axis=0)
    if (np.abs(border - bg).max(axis=1) > BORDER_TOLERANCE).mean() > 0.02:
        raise ValueError(
            "The image has no mask and no alpha channel, and its background is not a uniform colour, "
            "so the object cannot be separated; connect a mask (any background-removal node) or "
            "load an RGBA image."
        )
    dist = np.abs(rgb.astype(np.int16) - bg).max(axis=2)
    log.info("No mask given: keyed out the uniform background colour %s; connect a mask for best results.", bg)
    return np.where(dist > BORDER_TOLERANCE, 255, 0).astype(np.uint8)


def _shrink(rgba: np.ndarray, max_side: int) -> np.ndarray:
    H, W = rgba.shape[:2]
    if max(H, W) <= max_side:
        return rgba
    s = max_side / max(H, W)
    size = (max(1, round(W * s)), max(1, round(H * s)))
    log.info("Image of %dx%d downscaled to %dx%d before preprocessing.", W, H, *size)
    rgb = Image.fromarray(rgba[..., :3]).resize(size, Image.BILINEAR, reducing_gap=3.0)
    alpha = Image.fromarray(rgba[..., 3]).resize(size, Image.BILINEAR, reducing_gap=3.0)
    return np.concatenate([np.asarray(rgb), np.asarray(alpha)[..., None]], axis=-1)


def _official_preprocess(rgba: np.ndarray, size: int) -> torch.Tensor:
    """The original's steps 2-6 on one `[H, W, 4]` uint8 array → `[4, size, size]` float32."""
    H, W = rgba.shape[:2]
    fg = rgba[..., 3] > 0
    if fg.sum() >= H * W * 0.001:
        rows, cols = np.nonzero(fg.any(axis=1))[0], np.nonzero(fg.any(axis=0))[0]
        rgba = rgba[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    img = rgba / 255.0  # float64, as the original
    a = img[..., 3:]
    rgb = img[..., :3] * a + (1 - a)  # composite on white
    rgb = Image.fromarray((rgb * 255).astype(np.uint8))  # truncation, as the original
    mask = Image.fromarray((img[..., 3] * 255).astype(np.uint8))
    w, h = rgb.size
    m = max(w, h)
    offset = ((m - w) // 2, (m - h) // 2)
    sq_rgb, sq_mask = Image.new("RGB", (m, m), (255, 255, 255)), Image.new("L", (m, m), 0)
    sq_rgb.paste(rgb, offset)
    sq_mask.paste(mask, offset)
    rgb, mask = sq_rgb.resize((size, size), Image.BILINEAR), sq_mask.resize((size, size), Image.NEAREST)
    big = size + 2 * EXTRA_PAD
    pad_rgb, pad_mask = Image.new("RGB", (big, big), (255, 255, 255)), Image.new("L", (big, big), 0)
    pad_rgb.paste(rgb, (EXTRA_PAD, EXTRA_PAD))
    pad_mask.paste(mask, (EXTRA_PAD, EXTRA_PAD))
    rgb, mask = pad_rgb.resize((size, size), Image.BILINEAR), pad_mask.resize((size, size), Image.NEAREST)
    rgb_t = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255  # [3, S, S]
    mask_t = torch.from_numpy(np.array(mask))[None].float() / 255  # [1, S, S]
    return torch.cat([rgb_t, mask_t], dim=0)


def preprocess_image(
    image, mask=None, *, invert_mask: bool = False, size: int = 518, max_side: int = MAX_SIDE
) -> torch.Tensor:
    """Image (+ mask) → `[B, 4, size, size]` float32: RGB on white (channels 0-2) and the mask (channel 3).

    See the module docstring for accepted forms and the mask convention. Raises ValueError, before any
    model runs, for: an empty batch, a channel count other than 1-4, NaN or infinite pixels, a mask whose size or batch differs from the image's,
    an image smaller than 8×8, an empty (all-transparent) mask, or no usable mask at all.
    """
    images = _split_images(image)
    masks = _split_masks(mask, invert_mask)
    if masks is not None and len(masks) not in (1, len(images)):
        raise ValueError(
            f"The mask batch has {len(masks)} masks but the image batch has {len(images)} images; "
            "give one mask per image (or a single mask for all)."
        )
    out = []
    for b, arr in enumerate(images):
        H, W = arr.shape[:2]
        if min(H, W) < MIN_SIDE:
            raise ValueError(
                f"The image is only {W}x{H} pixels; Direct3D-S2 needs an image of at least "
                f"{MIN_SIDE}x{MIN_SIDE} showing the object."
            )
        rgb = arr[..., :3]
        if masks is not None:
            alpha = masks[b if len(masks) > 1 else 0]
            if alpha.shape != (H, W):
                raise ValueError(
                    f"The mask is {alpha.shape[1]}x{alpha.shape[0]} but the image is {W}x{H}; they must "
                    "match; resize the mask, or connect the mask made from this image."
                )
            _warn_if_inverted(alpha)
        elif arr.shape[-1] == 4:
            alpha = arr[..., 3]
        else:
            alpha = _key_out_background(rgb)
        if not (alpha > 0).any():
            raise ValueError(
                "The mask is empty, so there is no object to reconstruct; connect the image's alpha or "
                "a segmentation mask (LoadImage's MASK is 1 - alpha: keep mask_is_background on)."
            )
        rgba = _shrink(np.concatenate([rgb, alpha[..., None]], axis=-1), max_side)
        out.append(_official_preprocess(rgba, size))
    return torch.stack(out)


def _warn_if_inverted(alpha: np.ndarray) -> None:
    border = np.concatenate([alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]])
    if (border >= 128).mean() > 0.9:
        log.warning(
            "The mask covers almost all of the image border, so it may mark the background; "
            "LoadImage's MASK is 1 - alpha — switch mask_is_background if the object comes out hollow or boxy."
        )
