"""A synthetic coloured object for the tests, the benchmark and the README picture: no files, any size.

`bumpy_shape(n)` is a closed genus-0 mesh (a latitude/longitude sphere, poles closed by fans) pushed out by
three bumps in different directions and squashed per axis, so its silhouettes differ between views (a
sphere's would not tell the camera). `n` latitude rows → 2n longitude columns, ~4n² faces (n = 1024: 4.2 M).
`shape_colours` is a smooth colour field over space, so hidden colours have a plausible ground truth.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BUMPS = ((0.55, 0.3, 0.75, 0.45), (-0.8, -0.2, 0.3, 0.3), (0.1, 0.9, -0.4, 0.25))  # (direction xyz, height)
SQUASH = (1.0, 0.8, 0.65)


def bumpy_shape(n: int = 48, device="cpu", bumps=BUMPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(vertices [V, 3] float32 inside [-1, 1]³, faces [F, 3] int64, counter-clockwise = outward); `bumps`:
    (x, y, z, height) each."""
    lat = (torch.arange(1, n, device=device, dtype=torch.float32) / n) * math.pi  # rows without the poles
    lon = torch.arange(2 * n, device=device, dtype=torch.float32) / (2 * n) * 2 * math.pi
    t, p = torch.meshgrid(lat, lon, indexing="ij")
    d = torch.stack([t.sin() * p.sin(), t.cos(), t.sin() * p.cos()], -1).view(-1, 3)
    d = torch.cat([d, torch.tensor([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]], device=device)])
    r = torch.ones(d.shape[0], device=device)
    for x, y, z, h in bumps:
        a = F.normalize(torch.tensor([x, y, z], device=device), dim=0)
        r = r + h * torch.exp(-((d - a) ** 2).sum(1) / 0.25)
    v = d * r[:, None] * torch.tensor(SQUASH, device=device)
    v = v / v.abs().amax() * 0.95
    rows, cols = n - 1, 2 * n
    i = torch.arange(rows - 1, device=device)[:, None] * cols
    j = torch.arange(cols, device=device)[None]
    a, b = i + j, i + (j + 1) % cols  # quad (a, b) on row i, (c, e) below it
    c, e = a + cols, b + cols
    quads = torch.cat([torch.stack([a, c, b], -1).view(-1, 3), torch.stack([b, c, e], -1).view(-1, 3)])
    top, bottom = rows * cols, rows * cols + 1
    ring0, ringl = torch.arange(cols, device=device), (rows - 1) * cols + torch.arange(cols, device=device)
    cap_top = torch.stack([torch.full_like(ring0, top), ring0, (ring0 + 1) % cols], -1)
    cap_bottom = torch.stack(
        [torch.full_like(ringl, bottom), (ringl - (rows - 1) * cols + 1) % cols + (rows - 1) * cols, ringl], -1
    )
    faces = torch.cat([quads, cap_top, cap_bottom])
    return v, faces


def shape_colours(vertices: torch.Tensor) -> torch.Tensor:
    """[V, 3] smooth RGB in [0.05, 0.95]: a different low-frequency wave per channel."""
    x, y, z = vertices.float().unbind(1)
    return torch.stack(
        [
            0.5 + 0.45 * torch.sin(2.0 * x + 0.5 * y),
            0.5 + 0.45 * torch.sin(1.7 * y - 1.1 * z + 1.0),
            0.5 + 0.45 * torch.cos(1.5 * z + 0.8 * x),
        ],
        1,
    )
