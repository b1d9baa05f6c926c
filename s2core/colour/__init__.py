"""Colour a mesh from the picture it was made from: no model, only geometry (issue 18).

```
image + mask ─► preprocess_image (the encoder's crop, centre, pad) ─► frame (RGB, mask)
mesh + mask  ─► find_camera (silhouette IoU search) ─► Camera
mesh + Camera + frame ─► project_colours ─► seen colours + confidence ─► [mirror_seeds] ─► fill_colours
```

`colour_mesh` does this per batch item and returns the mesh with `vertex_colors` and one `ColourReport`
each; given per-item UVs it also bakes a texture per item (`bake.py`: the picture per seen texel, the vertex
colours elsewhere), found in the report. Vertices are in s2core's mesh frame (+Y up, see `camera.py`); the picture's mask convention is the
encoder's (1 = object; `invert_mask` for LoadImage's MASK).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hooks import Callback, ShouldStop
from ..image import preprocess_image
from ..results import Mesh
from .bake import bake_texture
from .camera import Camera, find_camera
from .paint import fill_colours, mirror_seeds, picture_view, project_colours, see_picture
from .render import render_preview

__all__ = [
    "colour_mesh",
    "ColourReport",
    "Camera",
    "find_camera",
    "project_colours",
    "fill_colours",
    "mirror_seeds",
    "render_preview",
    "bake_texture",
    "FRAME",
]

FRAME = 1024  # side of the preprocessed frame colours are read from (the encoder uses 518; more is sharper)


@dataclass(frozen=True)
class ColourReport:
    """What `colour_mesh` found for one mesh: the camera, the silhouette IoU it reached (at 128 px), the
    fraction of vertices seen, the best mirror plane's fit, whether mirrored colours were used, and the
    baked texture [S, S, 3] (None unless UVs were given)."""

    camera: Camera
    iou: float
    seen: float
    symmetry_fit: float
    mirrored: bool
    texture: torch.Tensor | None = None

    def describe(self) -> str:
        sym = (
            f"mirrored across a symmetry plane (fit {self.symmetry_fit:.2f})"
            if self.mirrored
            else f"no mirroring (best plane fit {self.symmetry_fit:.2f})"
        )
        return (
            f"{self.camera.describe()}; silhouette IoU {self.iou:.3f}; {100 * self.seen:.0f}% of vertices "
            f"seen, the rest filled over the surface, {sym}"
            + (f"; texture {self.texture.shape[1]}x{self.texture.shape[0]} baked" if self.texture is not None else "")
        )


def _fill_welded(v, f, seen_rgb, conf, should_stop):
    """`fill_colours` over the surface with vertices at one position joined: UV unwrapping (core Unwrap Mesh)
    duplicates the vertices along its seams, and a fill over the unjoined graph would not cross them. A
    joined vertex keeps the most confident of its copies' projected colours; every copy gets its fill."""
    pos, inv = torch.unique(v, dim=0, return_inverse=True)
    if pos.shape[0] == v.shape[0]:
        return fill_colours(v, f, seen_rgb, conf, should_stop)
    best = torch.zeros(pos.shape[0], dtype=conf.dtype, device=v.device).scatter_reduce(0, inv, conf, "amax")
    pick = torch.full((pos.shape[0],), -1, dtype=torch.long, device=v.device)
    top = torch.nonzero(conf >= best[inv]).squeeze(1)  # copies as confident as their position's best
    pick[inv[top]] = top  # any one of them
    return fill_colours(pos, inv[f], seen_rgb[pick], best, should_stop)[inv]


def colour_mesh(
    mesh,
    image,
    mask=None,
    *,
    invert_mask: bool = False,
    symmetry: bool = True,
    frame: int = FRAME,
    uvs: list | None = None,
    texture_size: int = 1024,
    callback: Callback | None = None,
    should_stop: ShouldStop | None = None,
):
    """(`results.Mesh` with vertex_colors [V, 3] float32 in [0, 1], list of ColourReport) for a Mesh of B items
    and one picture (used for every item) or B pictures. `image`/`mask` take every form `preprocess_image`
    takes; errors (empty mask, no mask, empty mesh, batch mismatch) are one ValueError sentence.
    `uvs` (one [V_i, 2] per item, core MESH layout, see `bake.py`) adds a texture_size² texture per item to its
    report. `callback(done, total)` counts search rounds and the projection/fill (/bake) of every item."""
    if mesh.batch_size == 0 or sum(mesh.face_counts) == 0:
        raise ValueError("The mesh is empty (no faces), so there is nothing to colour; connect a decoded mesh.")
    frames = preprocess_image(image, mask, invert_mask=invert_mask, size=frame)  # [N, 4, S, S]
    if frames.shape[0] not in (1, mesh.batch_size):
        raise ValueError(
            f"There are {frames.shape[0]} pictures for {mesh.batch_size} meshes; give one picture, or "
            "one per mesh in the same order."
        )
    device = mesh.vertices.device
    colours, reports = [], []
    for i, (v, f) in enumerate(mesh.items()):  # host loop over batch items: one camera search each
        if f.shape[0] == 0:
            raise ValueError(
                f"Mesh {i} of the batch has no faces, so it cannot be coloured; remove it or decode it again."
            )
        rgbm = frames[i if frames.shape[0] > 1 else 0].to(device)

        steps = 3 if uvs is not None else 2

        def progress(done, total, i=i, steps=steps):  # the search's rounds, then projection, fill (and bake)
            if callback is not None:
                callback(i * (total + steps) + done, mesh.batch_size * (total + steps))
            last[:] = [total]  # noqa: B023 (called only within this iteration)

        last = [0]

        camera, iou = find_camera(v, f, rgbm[3], callback=progress, should_stop=should_stop)
        seen_rgb, conf = project_colours(v, f, camera, rgbm[:3], rgbm[3])
        fit, mirrored = 0.0, False
        if symmetry:
            before = int((conf > 0).sum())
            seen_rgb, conf, fit = mirror_seeds(v, f, seen_rgb, conf)
            mirrored = int((conf > 0).sum()) > before
        seen = float((conf > 0).float().mean())
        progress(last[0] + 1, last[0])
        colours.append(_fill_welded(v, f, seen_rgb, conf, should_stop))
        progress(last[0] + 2, last[0])
        texture = None
        if uvs is not None:
            view = picture_view(v, f, camera, rgbm[3])

            def picture(p, n, camera=camera, view=view, rgbm=rgbm):
                return see_picture(p, n, camera, view, rgbm[:3], rgbm[3])

            texture = bake_texture(
                f, uvs[i], colours[-1], texture_size, vertices=v, picture=picture, should_stop=should_stop
            )[0]
            progress(last[0] + 3, last[0])
        reports.append(ColourReport(camera, iou, seen, fit, mirrored, texture))
    out = Mesh.from_list(mesh.items(), mesh.resolution, mesh.info, colors=colours)
    return out, reports
