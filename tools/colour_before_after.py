"""Make docs/colour_before_after.png: the synthetic scene of tests/test_colour.py, rendered by our rasterizer.

    python tools/colour_before_after.py

Panels: the input picture (flat colours, camera azimuth 35°, elevation 20°), the bare mesh (before), the
coloured mesh from the camera `colour_mesh` found (after), and the same from behind (filled, never seen).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from s2core import results  # noqa: E402
from s2core.colour import Camera, colour_mesh, render_preview  # noqa: E402
from s2core.colour.scene import bumpy_shape, shape_colours  # noqa: E402

SIZE = 240


def main():
    torch.set_num_threads(1)
    v, f = bumpy_shape(64)
    truth = shape_colours(v)
    radius = float(v.norm(dim=1).max())
    cam = Camera(35.0, 20.0, 30.0, (0.0, 0.0, 0.0), radius, 115.0, SIZE / 2, SIZE / 2, SIZE, SIZE)
    picture = render_preview(v, f, cam, truth, shade=False)
    mask = (picture < 0.999).any(-1).float()
    out, (report,) = colour_mesh(results.Mesh.from_list([(v, f)]), picture[None], mask[None], frame=512)
    found = report.camera
    view = Camera(
        found.azimuth, found.elevation, found.fov, found.centre, radius, 115.0, SIZE / 2, SIZE / 2, SIZE, SIZE
    )
    back = Camera(
        found.azimuth + 180.0, found.elevation, found.fov, found.centre, radius, 115.0, SIZE / 2, SIZE / 2, SIZE, SIZE
    )
    panels = [
        (picture, "input picture"),
        (render_preview(v, f, view), "mesh (before)"),
        (render_preview(v, f, view, out.vertex_colors), "coloured (after)"),
        (render_preview(v, f, back, out.vertex_colors), "after, from behind"),
    ]
    strip = Image.new("RGB", (SIZE * len(panels), SIZE + 18), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for k, (img, label) in enumerate(panels):
        strip.paste(Image.fromarray((img.numpy() * 255).round().astype(np.uint8)), (k * SIZE, 18))
        draw.text((k * SIZE + 6, 3), label, fill=(0, 0, 0))
    path = REPO / "docs" / "colour_before_after.png"
    strip.save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB); {report.describe()}")


if __name__ == "__main__":
    main()
