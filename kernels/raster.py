"""Triangle rasterization: nearest depth and triangle id per pixel (a z-buffer), memory-bounded.

For pixel (i, j) (column i, row j) with centre p = (i + 0.5, j + 0.5), triangle t covers p when p's
barycentric coordinates b in t's screen triangle are all >= -1e-6 (either winding: no culling, so open
meshes show their back sides), and

    depth[j, i] = min over covering t of  z_t(p) = b0 z0 + b1 z1 + b2 z2,     face[j, i] = argmin (ties: lower id).

`z` is whatever the caller wants compared and must be linear in screen space: view depth for an orthographic
camera, -1/depth for a perspective one (1/depth is what interpolates linearly after the perspective divide).

Layouts: screen [V, 3] float32 (x = column, y = row, both in pixels, z as above); faces [F, 3] int64 indices
into screen (F < 2^31); outputs depth [H, W] float32 (+inf where empty) and face [H, W] int64 (-1 where empty).
Triangles with a non-finite vertex or zero screen area cover nothing.

How (the reference below): triangles go in chunks of `TRIS` (bounding the per-triangle temporaries); each
chunk lists the (triangle, pixel) pairs of every triangle's pixel bounding box, at most `max_pairs` at a time
(so a few huge triangles or millions of tiny ones both use bounded memory: ~200 bytes a pair), evaluates the
affine barycentrics per pair and keeps the nearest with one `scatter_reduce(amin)` of a packed int64 key,
(order-preserving int32 of the float32 depth) << 32 | face id: depth order first, then the lower id, which
makes the result independent of evaluation order (deterministic on every device).

No Triton kernel yet: on a 1024 mesh the triangles are sub-pixel at the resolutions used here (64-1024 px),
so most triangles list zero or one pair and the work is the per-triangle setup, which the vectorised PyTorch
already does at memory speed. A binned Triton kernel stays out until `bench/bench_colour.py` shows it winning.
This module imports no Triton.
"""

from __future__ import annotations

import torch

__all__ = ["rasterize", "rasterize_reference", "depth_key", "TRIS", "MAX_PAIRS"]

TRIS = 1 << 20  # triangles set up at once (~100 bytes each of temporaries)
MAX_PAIRS = 1 << 21  # (triangle, pixel) pairs evaluated at once, ~400 MB (raised to H*W so one triangle always fits)
_EMPTY = torch.iinfo(torch.int64).max
_INSIDE = -1e-6  # barycentric slack: a pixel centre exactly on a shared edge is covered by both triangles


def depth_key(z: torch.Tensor) -> torch.Tensor:
    """float32 → int32 with the same order (negative floats have their 31 low bits flipped); an involution."""
    i = z.contiguous().view(torch.int32)
    return torch.where(i < 0, i ^ 0x7FFFFFFF, i)


def _setup(tri: torch.Tensor, height: int, width: int):
    """Per triangle [n, 3, 3]: affine barycentric rows [n, 3, 3] (b_k = a_k x + b_k y + c_k), z [n, 3], and the
    inclusive pixel box (c0, c1, r0, r1) of the centres it may cover; empty boxes for degenerate triangles."""
    x, y, z = tri[..., 0], tri[..., 1], tri[..., 2]  # [n, 3] each
    x0, x1, x2 = x.unbind(1)
    y0, y1, y2 = y.unbind(1)
    area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)  # twice the signed area
    ok = (area != 0) & torch.isfinite(tri).flatten(1).all(1)
    inv = torch.where(ok, 1.0 / torch.where(ok, area, torch.ones_like(area)), torch.zeros_like(area))
    # b0 is the edge function of edge (v1, v2) over the area, etc.: b_k(p) = ((xb - xa)(py - ya) - (yb - ya)(px - xa)) / area
    rows = []
    for (xa, ya), (xb, yb) in (((x1, y1), (x2, y2)), ((x2, y2), (x0, y0)), ((x0, y0), (x1, y1))):
        rows.append(torch.stack([-(yb - ya) * inv, (xb - xa) * inv, ((yb - ya) * xa - (xb - xa) * ya) * inv], 1))
    coef = torch.stack(rows, 1)  # [n, 3 (k), 3 (a, b, c)]
    big = float(max(height, width) + 2)  # clamp before the int cast (far-off vertices must not overflow)
    c0 = torch.ceil(x.amin(1).clamp(-big, big) - 0.5).long().clamp(min=0)
    c1 = torch.floor(x.amax(1).clamp(-big, big) - 0.5).long().clamp(max=width - 1)
    r0 = torch.ceil(y.amin(1).clamp(-big, big) - 0.5).long().clamp(min=0)
    r1 = torch.floor(y.amax(1).clamp(-big, big) - 0.5).long().clamp(max=height - 1)
    nx = (c1 - c0 + 1).clamp(min=0) * ok
    ny = (r1 - r0 + 1).clamp(min=0) * ok
    return coef, z, c0, r0, nx, ny


def rasterize_reference(
    screen: torch.Tensor, faces: torch.Tensor, height: int, width: int, max_pairs: int = MAX_PAIRS, tris: int = TRIS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(depth [H, W] float32, face [H, W] int64) of the nearest triangle per pixel; see the module docstring."""
    device = screen.device
    screen = screen.float()
    faces = faces.long()
    keys = torch.full((height * width,), _EMPTY, dtype=torch.int64, device=device)
    max_pairs = max(int(max_pairs), height * width)
    for f0 in range(0, faces.shape[0], tris):  # host loop over chunks of triangles: bounds the setup memory
        fc = faces[f0 : f0 + tris]
        coef, z, c0, r0, nx, ny = _setup(screen[fc], height, width)
        count = nx * ny  # pairs per triangle
        live = torch.nonzero(count > 0).squeeze(1)
        if live.numel() == 0:
            continue
        coef, z, c0, r0, nx, count = coef[live], z[live], c0[live], r0[live], nx[live], count[live]
        ids = live + f0
        cum = torch.cumsum(count, 0)
        start = 0
        while start < live.numel():  # host loop over groups of at most max_pairs pairs
            base = int(cum[start - 1]) if start else 0
            end = max(int(torch.searchsorted(cum, base + max_pairs, right=True)), start + 1)
            n_pairs = int(cum[end - 1]) - base
            t = torch.repeat_interleave(
                torch.arange(start, end, device=device), count[start:end], output_size=n_pairs
            )  # [P] triangle of each pair
            off = torch.arange(n_pairs, device=device) + base - (cum[t] - count[t])
            px, py = c0[t] + off % nx[t], r0[t] + off // nx[t]
            cx, cy = px.float() + 0.5, py.float() + 0.5
            ct = coef[t]  # [P, 3, 3]
            b = ct[..., 0] * cx[:, None] + ct[..., 1] * cy[:, None] + ct[..., 2]  # [P, 3]
            inside = (b >= _INSIDE).all(1)
            depth = (b * z[t]).sum(1)
            key = (depth_key(depth).long() << 32) | ids[t]
            keys.scatter_reduce_(0, (py * width + px)[inside], key[inside], "amin")
            start = end
    face = torch.where(keys == _EMPTY, -1, keys & 0xFFFFFFFF)
    depth = depth_key((keys >> 32).to(torch.int32)).view(torch.float32)
    depth = torch.where(face < 0, torch.full_like(depth, float("inf")), depth)
    return depth.view(height, width), face.view(height, width)


def rasterize(
    screen: torch.Tensor,
    faces: torch.Tensor,
    height: int,
    width: int,
    max_pairs: int = MAX_PAIRS,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The public entry: same contract as `rasterize_reference` (the only backend so far; see the docstring)."""
    if backend not in ("auto", "reference"):
        raise ValueError(f"Unknown rasterizer backend {backend!r}; use 'auto' or 'reference'.")
    return rasterize_reference(screen, faces, height, width, max_pairs)
