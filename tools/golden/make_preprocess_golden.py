"""Record the original `utils/image.py: preprocess_image` on a generated RGBA scene (for tests/test_image.py).

Run with the upstream environment (see tools/golden/harness.py for the torchvision stand-in, whose PIL path
is PIL itself):

    UPSTREAM_VENV/bin/python tools/golden/make_preprocess_golden.py --upstream UPSTREAM/Direct3D-S2

Writes tests/data/preprocess_original.png: the original's `[4, 518, 518]` output (RGB on white ‖ mask) as
an RGBA PNG; every value is k/255, so 8 bits store it losslessly.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "tests" / "data"


def scene() -> np.ndarray:
    """A 173x131 RGBA scene without RNG: textured object with a soft, off-centre alpha edge."""
    H, W = 131, 173
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    rgb = np.stack([127 + 120 * np.sin(x / 7.0), 127 + 120 * np.cos(y / 5.0), 127 + 120 * np.sin((x + y) / 11.0)], -1)
    r = np.sqrt(((x - 101) / 38.0) ** 2 + ((y - 58) / 29.0) ** 2)
    alpha = np.clip((1.15 - r) * 4.0, 0.0, 1.0) * 255
    return np.concatenate([rgb, alpha[..., None]], -1).astype(np.uint8)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", required=True)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import harness

    harness.install_stand_ins(args.upstream)
    from direct3d_s2.utils.image import preprocess_image
    from PIL import Image

    out = preprocess_image(scene())  # [4, 518, 518] float32, values k/255
    u8 = (out.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(u8.astype(np.float32) / 255, out.permute(1, 2, 0).numpy())
    Image.fromarray(u8, "RGBA").save(DATA / "preprocess_original.png", optimize=True)
