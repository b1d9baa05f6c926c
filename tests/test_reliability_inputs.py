"""Inputs validated at the boundary (issue 19 items 3-4): image files (PIL modes, limits, broken files),
image tensors (non-finite pixels, empty batches), settings at every pipeline entry point and through the
nodes. Validation comes before any network: the entry points are called with `models=None` below, so
any work before the check would crash differently."""

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from s2core import image_file, loading
from s2core import pipeline as P
from s2core.image import preprocess_image
from s2core.image_file import convert_pil, read_image_and_mask, read_image_file

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Image files and PIL modes


def _grey16(values) -> np.ndarray:
    return np.asarray(values, np.uint16)


def test_sixteen_bit_grey_is_scaled_as_mask_and_as_image(tmp_path):
    a = np.zeros((8, 10), np.uint16)
    a[2:6, 3:8] = 65535
    a[0, 0], a[0, 1] = 32768, 255  # half; and 255/65535, which clipping made into full white
    Image.fromarray(a).save(tmp_path / "m.png")
    mask, size = read_image_file(tmp_path / "m.png", as_mask=True)
    assert size == (10, 8) and mask.dtype == np.uint8 and mask.shape == (8, 10)
    assert mask[3, 4] == 255 and mask[7, 9] == 0 and mask[0, 0] == 128 and mask[0, 1] == 1
    image, _ = read_image_file(tmp_path / "m.png")
    assert image.shape == (8, 10, 3) and (image[..., 0] == mask).all() and (image[..., 2] == mask).all()
    # the same through preprocess_image's PIL input (library path), and 32-bit "I" (older Pillow's 16-bit PNG)
    pil = Image.open(tmp_path / "m.png")
    np.testing.assert_array_equal(np.asarray(convert_pil(pil, as_mask=True)), mask)
    np.testing.assert_array_equal(np.asarray(convert_pil(pil.convert("I"), as_mask=True)), mask)
    rgba = np.zeros((8, 10, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 255, mask
    np.testing.assert_array_equal(
        preprocess_image(Image.fromarray(rgba[..., :3]), pil, size=28).numpy(),
        preprocess_image(Image.fromarray(rgba[..., :3]), Image.fromarray(mask), size=28).numpy(),
    )


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16B", "F"])
def test_every_pil_mode_converts(mode):
    """Each mode becomes RGB/RGBA (image) or L (mask) of the same size, alpha kept exactly when there is one."""
    base = Image.new("RGBA", (12, 9), (200, 100, 50, 255))
    base.paste((0, 0, 0, 0), (0, 0, 4, 9))
    if mode == "F":
        im = Image.fromarray(np.linspace(0, 1, 108, dtype=np.float32).reshape(9, 12))
    elif mode == "I;16B":
        im = Image.fromarray(np.full((9, 12), 65535, np.uint16)).convert("I").convert("I;16B")
    elif mode == "PA":
        im = base.convert("P").convert("PA")
    else:
        im = base.convert(mode)
    assert im.mode == mode
    image, mask = np.asarray(convert_pil(im)), np.asarray(convert_pil(im, as_mask=True))
    assert mask.shape == (9, 12) and mask.dtype == np.uint8
    has_alpha = mode in ("LA", "PA", "RGBA")
    assert image.shape == (9, 12, 4 if has_alpha else 3)
    if has_alpha:
        assert (image[:, :4, 3] == 0).all() and (image[:, 4:, 3] == 255).all()
    if mode == "F":
        assert mask[0, 0] == 0 and mask[-1, -1] == 255


def test_non_finite_float_file_is_refused(tmp_path):
    a = np.full((9, 12), 0.5, np.float32)
    a[3, 3] = np.inf
    Image.fromarray(a).save(tmp_path / "f.tiff")
    with pytest.raises(ValueError, match=r"^The mask .*f\.tiff contains NaN or infinite pixel values; save it as"):
        read_image_file(tmp_path / "f.tiff", as_mask=True)


def test_pixel_limit_and_pils_bomb_guard_without_a_warning(tmp_path, monkeypatch):
    Image.new("RGB", (100, 80), (255, 0, 0)).save(tmp_path / "a.png")
    with pytest.raises(
        ValueError,
        match=r"is 100x80 pixels \(0 million\), more than the 0 million this reader "
        r"decodes; downscale it \(to at most 4096 px on the longest side\) first\.",
    ):
        read_image_file(tmp_path / "a.png", max_pixels=5000)
    # between PIL's warning and error thresholds: read without PIL's raw DecompressionBombWarning
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image, size = read_image_file(tmp_path / "a.png")
    assert size == (100, 80) and image.shape == (80, 100, 3)
    # over PIL's error threshold (2x): one sentence naming our limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    with pytest.raises(ValueError, match="has more than 134,217,728 pixels, the most this reader decodes"):
        read_image_file(tmp_path / "a.png")
    assert image_file.MAX_PIXELS == 2**27 and image_file.MAX_SIDE == 4096  # the limits the docs state


def test_large_files_are_downscaled_before_floats(tmp_path):
    """A 12000x9000 JPEG and an 8000x6000 RGBA PNG, each read in a fresh interpreter: the JPEG decodes at 1/2
    scale (peak memory grows ~225 MB; decoding it whole is 324 MB, and the old reader's float copy 1.3 GB,
    2.9 GB in all), the PNG decodes once as 8-bit (192 MB) and is shrunk, PIL premultiplying a second 8-bit
    copy for RGBA (~510 MB; old reader 1.6 GB).
    Both come back at most 4096 px a side. Peak = VmHWM, the process's resident high-water mark (Linux)."""
    Image.new("RGB", (12000, 9000), (30, 140, 200)).save(tmp_path / "big.jpg", quality=50)
    Image.new("RGBA", (8000, 6000), (30, 140, 200, 255)).save(tmp_path / "big.png", compress_level=1)
    script = """
import json, sys
from s2core.image_file import read_image_file
def peak_mb():
    return next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
before = peak_mb()
a, size = read_image_file(sys.argv[1])
print(json.dumps([a.shape, size, peak_mb() - before]))
"""
    got = {}
    for name in ("big.jpg", "big.png"):
        r = subprocess.run(
            [sys.executable, "-c", script, name],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        assert r.returncode == 0, r.stderr
        got[name] = json.loads(r.stdout)
    assert got["big.jpg"][:2] == [[3072, 4096, 3], [12000, 9000]] and got["big.jpg"][2] < 300, got
    assert got["big.png"][:2] == [[3072, 4096, 4], [8000, 6000]] and got["big.png"][2] < 600, got


def test_image_and_mask_of_different_sizes(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "i.png")
    Image.new("L", (30, 40)).save(tmp_path / "m.png")
    with pytest.raises(ValueError, match=r"The mask .*m\.png is 30x40 but the image .*i\.png is 40x30; give a mask"):
        read_image_and_mask(tmp_path / "i.png", tmp_path / "m.png")


# ---------------------------------------------------------------------------------------------
# Image tensors


@pytest.mark.parametrize(
    "where, value",
    [("image", float("inf")), ("image", float("-inf")), ("mask", float("inf")), ("image", float("nan"))],
    ids=["+inf", "-inf", "mask-inf", "nan"],
)
def test_non_finite_pixels_are_refused(where, value):
    image, mask = torch.rand(1, 16, 16, 3), torch.ones(1, 16, 16)
    (image if where == "image" else mask)[0, 3, 3] = value
    with pytest.raises(ValueError, match=f"^The {where} contains NaN or infinite values; check the node"):
        preprocess_image(image, mask, size=28)


def test_empty_batches_are_one_sentence():
    with pytest.raises(ValueError, match=r"^The image batch is empty \(shape \(0, 16, 16, 3\)\); connect at least"):
        preprocess_image(torch.zeros(0, 16, 16, 3), size=28)
    with pytest.raises(ValueError, match=r"^The mask batch is empty"):
        preprocess_image(torch.rand(1, 16, 16, 3), torch.zeros(0, 16, 16), size=28)


# ---------------------------------------------------------------------------------------------
# Settings at the library's entry points (models=None: the check must come first)

STRUCTURE = SimpleNamespace(resolution=512, max_seqlen=10, batch_size=1)


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: P.sample_dense(None, None, guidance=float("inf")), "guidance must be a finite number at least 0"),
        (lambda: P.sample_dense(None, None, guidance=float("nan")), "guidance must be a finite number"),
        (lambda: P.sample_dense(None, None, steps=2.5), "steps must be a whole number of at least 1, got 2.5."),
        (
            lambda: P.sample_sparse(None, None, STRUCTURE, steps=2, max_tokens=-5),
            "max_tokens must be a whole number of at least 0 (0: no limit), got -5.",
        ),
        (lambda: P.sample_sparse(None, None, STRUCTURE, steps=2, guidance=float("-inf")), "guidance must be a finite"),
        (
            lambda: P.decode_dense(None, None, float("nan")),
            "The occupancy threshold must be a finite number above 0 and below 1, got nan.",
        ),
        (lambda: P.decode_sparse(None, None, threshold=float("inf")), "threshold must be a finite number (0.2 matches"),
        (lambda: P.image_to_mesh(None, None, guidance=float("inf")), "guidance must be a finite number"),
        (lambda: P.image_to_mesh(None, None, max_tokens=-5), "max_tokens must be a whole number of at least 0"),
        (lambda: P.image_to_mesh(None, None, mc_threshold=float("nan")), "mc_threshold must be a finite number"),
        (
            lambda: P.image_to_mesh(None, None, resolution=1024, sparse_1024_steps=0),
            "sparse_1024_steps must be a whole",
        ),
        (
            lambda: loading.Placement("cpu", max_vram_gb=float("inf")),
            "max_vram_gb must be a finite number above 0 (GiB)",
        ),
        (lambda: loading.Placement("tpu9"), "device 'tpu9' is not a device name; use cpu, cuda or cuda:N."),
    ],
    ids=[
        "dense-guidance-inf",
        "dense-guidance-nan",
        "dense-steps-float",
        "max-tokens-negative",
        "sparse-guidance",
        "dense-threshold-nan",
        "sparse-threshold-inf",
        "chain-guidance-inf",
        "chain-max-tokens",
        "chain-mc-nan",
        "chain-steps-0",
        "vram-inf",
        "device-name",
    ],
)
def test_settings_are_checked_first(call, words):
    with pytest.raises(ValueError) as e:
        call()
    assert words in str(e.value) and "\n" not in str(e.value)


def test_cuda_models_without_cuda(monkeypatch):
    """A placement policy for CUDA can be built anywhere (tests of the policy do); loading onto it cannot."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading.Placement("cuda").device.type == "cuda"
    with pytest.raises(ValueError, match=r"device 'cuda' asks for a CUDA GPU, but .*; use cpu \(slow\)"):
        loading.load_models("tiny-random", device="cuda")


# ---------------------------------------------------------------------------------------------
# Nodes (ComfyUI stubbed)

_spec = importlib.util.spec_from_file_location("d3ds2_stub_loader_inputs", Path(__file__).parent / "stubs" / "pack.py")
stubs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stubs)


@pytest.fixture
def pack(tmp_path):
    mod = stubs.load_pack(v3=False)
    import folder_paths

    folder_paths.output_directory = str(tmp_path / "output")
    yield mod
    stubs.unload()


ENCODER = SimpleNamespace(part=lambda name: SimpleNamespace(cfg=SimpleNamespace(size=28)))
TETRA = SimpleNamespace(
    vertices=torch.tensor([[[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]]),
    faces=torch.tensor([[[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]]]),
)


def test_nodes_refuse_bad_values_with_one_sentence(pack):
    cases = [
        (dict(node_id="D3DS2SampleDense", model=None, conditioning=None, guidance=float("nan")), "guidance must be"),
        (
            dict(
                node_id="D3DS2SampleSparse", model=None, conditioning=None, structure=STRUCTURE, steps=2, max_tokens=-5
            ),
            "max_tokens must be a whole number of at least 0",
        ),
        (dict(node_id="D3DS2DecodeSparse", model=None, sparse_latent=None, threshold=float("inf")), "threshold must"),
        (dict(node_id="D3DS2ImageToMesh", model=None, image=None, guidance=float("inf")), "guidance must be a finite"),
        (dict(node_id="D3DS2EncodeImage", model=ENCODER, image=torch.zeros(0, 16, 16, 3)), "The image batch is empty"),
        (
            dict(node_id="D3DS2EncodeImage", model=ENCODER, image=torch.full((1, 16, 16, 3), float("inf"))),
            "The image contains NaN or infinite values",
        ),
    ]
    for kwargs, words in cases:
        with pytest.raises(ValueError, match=words.replace("(", r"\(")):
            stubs.run_node(pack, **kwargs)


def test_save_node_long_prefix_and_a_taken_name(pack, tmp_path, monkeypatch):
    out = tmp_path / "output"
    with pytest.raises(
        ValueError,
        match=r"filename_prefix part 'a{30}'\.\.\. is 300 bytes long; file names can have "
        r"at most 255 bytes, so shorten it to 239 or fewer\.",
    ):
        stubs.run_node(pack, "D3DS2SaveMesh", mesh=TETRA, filename_prefix="a" * 300, format="glb")
    assert not out.exists() or not any(out.rglob("*.*"))
    # another queue run takes the name after ComfyUI counted the files: ours takes the next number, theirs stays
    import folder_paths

    real = folder_paths.get_save_image_path

    def counted_then_taken(prefix, output_dir, *a):
        folder, name, counter, sub, p = real(prefix, output_dir, *a)
        Path(folder, f"{name}_{counter:05}_.glb").write_bytes(b"other run")
        return folder, name, counter, sub, p

    monkeypatch.setattr(folder_paths, "get_save_image_path", counted_then_taken)
    saved = stubs.run_node(pack, "D3DS2SaveMesh", mesh=TETRA, filename_prefix="mesh/x", format="glb")
    assert saved["ui"]["3d"][0]["filename"] == "x_00002_.glb"
    assert (out / "mesh" / "x_00001_.glb").read_bytes() == b"other run"
    assert (out / "mesh" / "x_00002_.glb").read_bytes()[:4] == b"glTF"
    assert not list(out.rglob("*.tmp"))
