"""Bake per-vertex colours into a UV texture (issue 18's optional texture output).

For texel (column i, row j) of an S×S texture, its centre q = ((i + 0.5) / S, (j + 0.5) / S) in UV space; the
first triangle whose UV triangle covers q (lowest face id on overlaps) gives the texel its colour by barycentric
interpolation of the triangle's three vertex colours:

    texture[j, i] = b0 c[f0] + b1 c[f1] + b2 c[f2],     b = barycentrics of q in (uv[f0], uv[f1], uv[f2]).

UV layout is core MESH's (what core Unwrap Mesh UVs writes): `uvs [V, 2]` float, one per vertex (seam vertices
are duplicated), u along columns and v along rows with v = 0 the image's top row (glTF's convention), so row
j = v S. Per-face-corner UVs `[F, 3, 2]` are also taken (each corner its own UV, colours still per vertex).
UVs outside [0, 1] are clipped, not wrapped. The texture is `[S, S, 3]` float32 in [0, 1], the layout of one
item of core's `MESH.texture [B, H, W, 3]`, holding the same values as the vertex colours (the picture's
values, no colour-space conversion).

Where the picture saw the surface it is sampled per texel, sharper than the vertex colours: given `vertices`
and `picture(points, normals) -> (rgb, confidence)` (`colour_mesh` passes `paint.see_picture` with the found
camera), each texel's surface point and interpolated normal are looked up and

    texture = c + confidence (rgb - c),     c = the interpolated vertex colour above,

so seen texels take the picture's colour, hidden ones the filled vertex colours, with the same confidence
(grazing angles, seams) blending the two as the vertex projection uses. Without `picture`, only c.

Steps: rasterize the UV triangles with `kernels/raster.py` (UVs as screen positions in texels, constant depth,
so the nearest-depth tie rule picks the lowest face id; memory-bounded in triangle chunks), interpolate per
texel in chunks of `TEXELS`, then grow the charts by `dilate` texels: each pass gives every empty texel next to
a filled one the mean of its filled 3×3 neighbours, so bilinear and mipmapped sampling at chart borders reads
chart colours, not background. Texels still empty after that take the mean chart colour.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .._kernels import raster
from ..hooks import Callback, ShouldStop
from .camera import _poll
from .paint import vertex_normals

__all__ = ["bake_texture", "Picture", "DILATE", "TEXELS"]

Picture = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
DILATE = 8  # texels grown past chart borders (mip level 3 still reads chart colours)
TEXELS = 1 << 20  # texels interpolated at once (~100 bytes each of temporaries)


def _corner_layout(faces: torch.Tensor, uvs: torch.Tensor, colours: torch.Tensor):
    """(uv faces [F, 3], uvs [U, 2], colours [U, C]) with per-face-corner UVs unrolled to one UV vertex a corner."""
    n_faces = faces.shape[0]
    if uvs.ndim == 3 and uvs.shape[:2] == (n_faces, 3) and uvs.shape[2] == 2:
        corners = torch.arange(3 * n_faces, device=faces.device).view(n_faces, 3)
        return corners, uvs.reshape(-1, 2), colours[faces.reshape(-1)]
    if uvs.ndim == 2 and uvs.shape == (colours.shape[0], 2):
        return faces, uvs, colours
    raise ValueError(
        f"The mesh's uvs have shape {tuple(uvs.shape)} for {colours.shape[0]} vertices and {n_faces} faces; "
        "connect a mesh from core Unwrap Mesh UVs (one UV per vertex, [vertices, 2])."
    )


def _dilate(texture: torch.Tensor, filled: torch.Tensor, passes: int, should_stop: ShouldStop | None):
    """Grow filled texels `passes` times into empty ones (mean of the filled 3×3 neighbours); in place."""
    x = torch.cat([texture * filled[..., None], filled[..., None].float()], 2).permute(2, 0, 1)[None]  # [1, C+1, S, S]
    for _ in range(passes):  # host loop over passes: each grows the charts by one texel
        _poll(should_stop)
        s = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # the 1/9 cancels in the ratio
        grow = (x[0, -1] == 0) & (s[0, -1] > 0)
        if not grow.any():
            break
        x[0, :-1, grow] = s[0, :-1, grow] / s[0, -1, grow]
        x[0, -1, grow] = 1.0
    texture.copy_(x[0, :-1].permute(1, 2, 0))
    filled.copy_(x[0, -1] > 0)


def bake_texture(
    faces: torch.Tensor,
    uvs: torch.Tensor,
    colours: torch.Tensor,
    size: int,
    *,
    vertices: torch.Tensor | None = None,
    picture: Picture | None = None,
    dilate: int = DILATE,
    callback: Callback | None = None,
    should_stop: ShouldStop | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(texture [S, S, C] float32, covered [S, S] bool: texels inside a UV triangle) for faces [F, 3] into the
    vertices, uvs [V, 2] or [F, 3, 2] and colours [V, C]; with vertices [V, 3] and `picture`, seen texels are
    sampled from the picture (module docstring). `callback(done, total)` counts interpolation chunks and the
    dilation; errors are one ValueError sentence."""
    size = int(size)
    if size < 1:
        raise ValueError(f"texture_size is {size}; give a positive texture side in texels, such as 1024.")
    if faces.shape[0] == 0:
        raise ValueError("The mesh is empty (no faces), so there is nothing to bake; connect a decoded mesh.")
    device = colours.device
    if picture is not None and (vertices is None or vertices.shape[0] != colours.shape[0]):
        raise ValueError("Sampling the picture per texel needs the mesh's vertices, one per colour; pass vertices.")
    n_col = colours.shape[1]
    attr = colours.float()  # [V, C], then position and normal where the picture is sampled: [V, C + 6]
    if picture is not None:
        v = vertices.float().to(device)
        attr = torch.cat([attr, v, vertex_normals(v, faces.long().to(device))], 1)
    tri, uv, attr = _corner_layout(faces.long().to(device), uvs.float().to(device), attr)
    if not torch.isfinite(uv).all():
        raise ValueError("The mesh's uvs contain NaN or infinite values; unwrap the mesh again with core Unwrap Mesh.")
    screen = torch.cat([uv * size, torch.zeros_like(uv[:, :1])], 1)  # [U, 3]: texels, constant depth
    _, face = raster.rasterize(screen, tri, size, size)
    _poll(should_stop)
    face = face.view(-1)
    texture = torch.zeros(size * size, n_col, dtype=torch.float32, device=device)
    covered = face >= 0
    hits = torch.nonzero(covered).squeeze(1)
    chunks = max(1, -(-hits.numel() // TEXELS))
    total = chunks + 1
    for n, h in enumerate(hits.split(TEXELS)):  # host loop over texel chunks: bounds the temporaries
        _poll(should_stop)
        t = tri[face[h]]  # [n, 3]
        a, b, c = uv[t[:, 0]] * size, uv[t[:, 1]] * size, uv[t[:, 2]] * size  # [n, 2] each, in texels
        q = torch.stack([(h % size).float() + 0.5, (h // size).float() + 0.5], 1)
        area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
        b1 = ((q[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (q[:, 1] - a[:, 1])) / area
        b2 = ((b[:, 0] - a[:, 0]) * (q[:, 1] - a[:, 1]) - (q[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])) / area
        w = torch.stack([1 - b1 - b2, b1, b2], 1).clamp(min=0)  # the rasterizer's edge slack can give -1e-6
        w = w / w.sum(1, keepdim=True)
        val = (w[..., None] * attr[t]).sum(1)  # [n, C (+ 6)]
        if picture is not None:
            rgb, conf = picture(val[:, n_col : n_col + 3], F.normalize(val[:, n_col + 3 :], dim=1))
            val = val[:, :n_col] + conf[:, None] * (rgb - val[:, :n_col])
        texture[h] = val[:, :n_col]
        if callback is not None:
            callback(n + 1, total)
    texture = texture.view(size, size, -1)
    covered = covered.view(size, size)
    filled = covered.clone()
    if filled.any():
        _dilate(texture, filled, dilate, should_stop)
        texture[~filled] = texture[filled].mean(0)
    else:  # every triangle thinner than a texel or outside [0, 1]: the mean colour, not black
        texture[:] = colours.float().mean(0)
    if callback is not None:
        callback(total, total)
    return texture.clamp(0, 1), covered
