"""Image preprocessing (SPEC.md §4.2): official geometry and compositing, input forms, validation errors."""

import logging

import numpy as np
import pytest
import torch
from conftest import GENERATORS
from PIL import Image

from s2core.image import preprocess_image


def scene(W=200, H=120, box=(50, 40, 150, 80), color=(220, 30, 10), alpha=255):
    """RGBA uint8 array: transparent background (grey colour underneath), an opaque box (x0, y0, x1, y1)."""
    arr = np.zeros((H, W, 4), np.uint8)
    arr[..., :3] = 90
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1, :3] = color
    arr[y0:y1, x0:x1, 3] = alpha
    return arr


def bbox(mask):
    ys, xs = torch.nonzero(mask > 0, as_tuple=True)
    return ys.min().item(), ys.max().item(), xs.min().item(), xs.max().item()


def test_official_geometry_and_white_background():
    out = preprocess_image(Image.fromarray(scene()))  # RGBA PIL: alpha is the mask
    assert out.shape == (1, 4, 518, 518) and out.dtype == torch.float32
    # crop 100x40 → pad to 100x100 (30 rows above) → 518 → pad 16 → 518 (×518/550): SPEC §4.2 by hand
    k, s = 518 / 550, 5.18
    y0, y1, x0, x1 = bbox(out[0, 3])
    assert abs(y0 - (16 + 30 * s) * k) < 2 and abs(y1 + 1 - (16 + 70 * s) * k) < 2
    assert abs(x0 - 16 * k) < 2 and abs(x1 + 1 - (16 + 518) * k) < 2  # longer side ≈ 487.8 px, centred
    assert torch.equal(out[0, :3, 100, :], torch.ones(3, 518))  # background composited on white
    assert torch.equal(out[0, :, 259, 259], torch.tensor([220 / 255, 30 / 255, 10 / 255, 1.0]))
    assert set(out[0, 3].unique().tolist()) <= {0.0, 1.0}  # nearest-resized binary mask stays binary


def test_semi_transparent_compositing_follows_the_original_formula():
    a = 128
    out = preprocess_image(Image.fromarray(scene(W=40, H=40, box=(0, 0, 40, 40), color=(200, 100, 50), alpha=a)))
    f = np.array([200, 100, 50]) / 255.0 * (a / 255.0) + (1 - a / 255.0)  # float64, then ×255 truncated
    expect = torch.tensor((f * 255).astype(np.uint8) / 255.0, dtype=torch.float32)
    assert torch.equal(out[0, :3, 259, 259], expect)
    assert out[0, 3, 259, 259] == torch.tensor(float(int(a / 255.0 * 255))) / 255


def test_comfy_tensors_match_pil_rgba():
    arr = scene()
    ref = preprocess_image(Image.fromarray(arr))
    image = torch.from_numpy(arr[..., :3].astype(np.float32) / 255.0)[None]  # ComfyUI IMAGE [1, H, W, 3]
    alpha = torch.from_numpy(arr[..., 3].astype(np.float32) / 255.0)[None]  # [1, H, W], 1 = object
    assert torch.equal(preprocess_image(image, alpha), ref)
    assert torch.equal(preprocess_image(image, 1.0 - alpha, invert_mask=True), ref)  # LoadImage's MASK
    rgba = torch.from_numpy(arr.astype(np.float32) / 255.0)[None]
    assert torch.equal(preprocess_image(rgba), ref)  # IMAGE with alpha channel
    assert torch.equal(preprocess_image(arr), ref)  # uint8 NumPy RGBA


def test_loadimage_mask_without_invert_is_flagged(caplog):
    arr = scene()
    image = torch.from_numpy(arr[..., :3].astype(np.float32) / 255.0)[None]
    inverted = torch.from_numpy(1.0 - arr[..., 3].astype(np.float32) / 255.0)[None]
    with caplog.at_level(logging.WARNING, logger="s2core.image"):
        preprocess_image(image, inverted)
    assert "mask_is_background" in caplog.text  # the node input that exists (issue 15 item 6)


def test_no_mask_uniform_background_is_keyed_out():
    arr = scene()
    arr[..., :3][arr[..., 3] == 0] = 255  # a product shot on white, no alpha
    rgb = torch.from_numpy(arr[..., :3].astype(np.float32) / 255.0)[None]
    ref = preprocess_image(rgb, torch.from_numpy(arr[..., 3].astype(np.float32) / 255.0)[None])
    assert torch.equal(preprocess_image(rgb), ref)


def test_no_mask_busy_background_asks_for_a_mask():
    noise = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="connect a mask"):
        preprocess_image(noise)


def test_tiny_object_keeps_whole_frame_like_the_original():
    out = preprocess_image(Image.fromarray(scene(W=200, H=200, box=(99, 99, 101, 101))))  # 4 px < 0.1 %
    y0, y1, x0, x1 = bbox(out[0, 3])
    assert y1 - y0 < 10 and x1 - x0 < 10 and abs((y0 + y1) / 2 - 258.5) < 4


def test_huge_image_is_downscaled_first():
    arr = scene(W=1200, H=720, box=(300, 240, 900, 480))
    full = preprocess_image(Image.fromarray(arr), max_side=4096)
    small = preprocess_image(Image.fromarray(arr), max_side=300)
    assert small.shape == full.shape
    assert all(abs(a - b) <= 3 for a, b in zip(bbox(small[0, 3]), bbox(full[0, 3])))


def test_batch_with_one_shared_mask_and_small_size():
    arr = scene()
    image = torch.from_numpy(arr[..., :3].astype(np.float32) / 255.0)[None].repeat(2, 1, 1, 1)
    alpha = torch.from_numpy(arr[..., 3].astype(np.float32) / 255.0)
    out = preprocess_image(image, alpha, size=56)
    assert out.shape == (2, 4, 56, 56) and torch.equal(out[0], out[1])


@pytest.mark.parametrize(
    "image,mask,message",
    [
        (torch.ones(1, 32, 32, 3), torch.zeros(1, 32, 32), "mask is empty"),
        (Image.fromarray(np.zeros((32, 32, 4), np.uint8)), None, "mask is empty"),
        (torch.ones(1, 32, 48, 3), torch.ones(1, 64, 64), "mask is 64x64 but the image is 48x32"),
        (torch.ones(2, 32, 32, 3), torch.ones(3, 32, 32), "mask batch has 3 masks but the image batch has 2"),
        (torch.ones(1, 1, 1, 3), None, "only 1x1 pixels"),
        (torch.ones(1, 32, 32, 5), None, "5 channels"),
        (torch.full((1, 32, 32, 3), float("nan")), None, "image contains NaN"),
        (torch.ones(1, 32, 32, 3), torch.full((1, 32, 32), float("nan")), "mask contains NaN"),
        ("photo.png", None, "must be a ComfyUI IMAGE"),
    ],
    ids=["empty-mask", "transparent-rgba", "mask-size", "batch", "1x1", "channels", "nan-image", "nan-mask", "type"],
)
def test_validation_errors(image, mask, message):
    with pytest.raises(ValueError, match=message):
        preprocess_image(image, mask)


def test_matches_the_original_on_a_soft_edged_scene():
    """The original `preprocess_image` output recorded by tools/golden/make_preprocess_golden.py (exact: uint8 ops)."""
    import importlib.util
    from pathlib import Path

    data = Path(__file__).parent / "data"
    spec = importlib.util.spec_from_file_location("make_preprocess_golden", GENERATORS / "make_preprocess_golden.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    ref = torch.from_numpy(np.array(Image.open(data / "preprocess_original.png"))).permute(2, 0, 1).float() / 255
    rgba = gen.scene()
    assert torch.equal(preprocess_image(Image.fromarray(rgba))[0], ref)
    image = torch.from_numpy(rgba[..., :3].astype(np.float32) / 255)[None]
    mask = torch.from_numpy(rgba[..., 3].astype(np.float32) / 255)[None]
    assert torch.equal(preprocess_image(image, mask)[0], ref)


def test_grey_inputs_equal_their_rgb_version():
    """Grey (1 channel) and grey+alpha (2) tensors, and PIL 'L' / 'LA', give what the same picture in RGB(A) gives."""
    arr = scene(color=(120, 120, 120))
    grey, alpha = arr[..., :1].astype(np.float32) / 255, arr[..., 3:].astype(np.float32) / 255
    rgba = preprocess_image(torch.from_numpy(arr.astype(np.float32) / 255)[None])
    assert torch.equal(preprocess_image(torch.from_numpy(np.concatenate([grey, alpha], -1))[None]), rgba)
    assert torch.equal(preprocess_image(torch.from_numpy(grey)[None], torch.from_numpy(alpha[..., 0])[None]), rgba)
    assert torch.equal(preprocess_image(Image.fromarray(arr).convert("LA")), rgba)
    assert torch.equal(preprocess_image(Image.fromarray(arr[..., 0]).convert("L"), Image.fromarray(arr[..., 3])), rgba)


def test_16k_pixel_side_is_bounded_and_keeps_the_object():
    """A 16384-pixel-tall strip (ComfyUI float IMAGE): converted in row chunks, downscaled to max_side first,
    and the object (8192 x 16 px) still fills the frame's height, centred and thin (SPEC §4.2 geometry)."""
    H, W = 16384, 32
    img = torch.ones(1, H, W, 3)
    mask = torch.zeros(1, H, W)
    img[:, 4096:12288, 8:24] = torch.tensor([0.2, 0.4, 0.6])
    mask[:, 4096:12288, 8:24] = 1
    out = preprocess_image(img, mask)
    assert out.shape == (1, 4, 518, 518) and out.isfinite().all()
    k = 518 / 550
    y0, y1, x0, x1 = bbox(out[0, 3])
    assert abs(y0 - 16 * k) < 2 and abs(y1 + 1 - (16 + 518) * k) < 2  # the long side spans the frame
    assert x1 - x0 <= 4 and abs((x0 + x1) / 2 - 258.5) < 2  # 16/8192 of the width, centred
