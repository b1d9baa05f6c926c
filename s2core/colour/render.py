"""Preview renders with our rasterizer: a mesh (grey, or its vertex colours) seen from a `Camera`.

Shading is a head light: colour x (0.35 + 0.65 |cos|) with the face normal, on a white background; vertex
colours are interpolated with the pixel's barycentrics (screen-space, exact for orthographic cameras and
close enough for a preview in perspective).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._kernels import raster
from .camera import Camera

GREY = (0.72, 0.72, 0.72)


def render_preview(
    vertices: torch.Tensor, faces: torch.Tensor, camera: Camera, colours: torch.Tensor | None = None, shade: bool = True
) -> torch.Tensor:
    """[H, W, 3] float32 in [0, 1] (ComfyUI IMAGE layout without the batch); shade=False: flat colours
    (an albedo picture, as the synthetic tests' input)."""
    h, w = camera.height, camera.width
    screen, _ = camera.project(vertices)
    _, face = raster.rasterize(screen, faces, h, w)
    out = torch.ones(h * w, 3, device=vertices.device)
    pix = torch.nonzero(face.flatten() >= 0).squeeze(1)
    if pix.numel() == 0:
        return out.view(h, w, 3)
    f = faces[face.flatten()[pix]]  # [P, 3]
    v = vertices.float()
    normal = F.normalize(torch.linalg.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), dim=1)
    toward = camera.toward_camera(v[f[:, 0]])
    light = 0.35 + 0.65 * (normal * toward).sum(1).abs() if shade else torch.ones(pix.numel(), device=v.device)
    if colours is None:
        base = torch.tensor(GREY, device=v.device).expand(pix.numel(), 3)
    else:
        s = screen[f]  # [P, 3, 3]
        px = (pix % w).float() + 0.5
        py = (pix // w).float() + 0.5
        x0, y0, x1, y1, x2, y2 = s[:, 0, 0], s[:, 0, 1], s[:, 1, 0], s[:, 1, 1], s[:, 2, 0], s[:, 2, 1]
        area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
        b1 = ((px - x0) * (y2 - y0) - (x2 - x0) * (py - y0)) / area
        b2 = ((x1 - x0) * (py - y0) - (px - x0) * (y1 - y0)) / area
        b = torch.stack([1 - b1 - b2, b1, b2], 1).clamp(0, 1)
        base = (colours.float()[f] * b[..., None]).sum(1) / b.sum(1, keepdim=True).clamp_min(1e-12)
    out[pix] = (base * light[:, None]).clamp(0, 1)
    return out.view(h, w, 3)
