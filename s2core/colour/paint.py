"""Vertex colours from one picture: projection of the visible surface, then fill of the hidden one.

1. `project_colours`: rasterize the mesh from the found camera in the picture's frame (a z-buffer); a vertex
   is seen when its depth is within 1.5 pixels' worth of the z-buffer at its pixel and it lies on the mask.
   It takes the picture's colour there (bilinear) with a confidence that falls off at grazing angles
   (smoothstep of cos between 0.15 and 0.6) and near seams: depth discontinuities and the mask's edge, where
   a pixel mixes object and background (within 2 pixels: weight x 0.2).
2. `mirror_seeds` (optional): the best mirror plane through the centroid, from candidate normals scored by the
   fraction of mirrored vertices that land on the surface; when it fits (>= SYMMETRY_FIT), hidden vertices
   whose mirror image lands next to a seen vertex take that colour as a weaker seed.
3. `fill_colours`: screened diffusion on the mesh graph, x_v = (λ w_v c_v + Σ_{u~v} x_u) / (λ w_v + deg v):
   seen vertices keep (almost) their colour, hidden ones become the harmonic blend of their surroundings over
   the surface. Plain Jacobi needs ~n² sweeps to cross n edges, so it runs coarse to fine: on graphs of
   vertex clusters (voxel cells halving in size, edges where mesh edges cross cells), each level starting from
   the coarser one's answer, the mesh graph last.

Colours are float32 RGB in [0, 1], linear in the picture's values (no colour-space conversion).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._kernels import raster
from ..hooks import ShouldStop
from .camera import Camera, _poll

LAMBDA = 100.0  # screening weight of a fully trusted colour against one neighbour
SEAM_PIXELS = 2
SYMMETRY_FIT = 0.9  # fraction of mirrored vertices that must land on the surface
MIRROR_WEIGHT = 0.5  # confidence of a mirrored colour relative to a seen one
COARSEST = 4  # cells across the bounding box at the first fill level
SWEEPS, FINAL_SWEEPS = 30, 60


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """[V, 3] area-weighted unit normals (counter-clockwise = outward)."""
    v = vertices.float()
    fn = torch.linalg.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
    n = torch.zeros_like(v)
    for k in range(3):
        n.index_add_(0, faces[:, k], fn)
    return F.normalize(n, dim=1)


def _sample(image: torch.Tensor, xy: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """image [C, H, W] at pixel positions xy [V, 2] (column, row; pixel centres at +0.5) → [V, C]."""
    h, w = image.shape[-2:]
    grid = torch.stack([xy[:, 0] / w * 2 - 1, xy[:, 1] / h * 2 - 1], 1)[None, None]
    out = F.grid_sample(
        image[None].float(), grid.to(image.device), mode=mode, padding_mode="border", align_corners=False
    )
    return out[0, :, 0].T


def picture_view(
    vertices: torch.Tensor, faces: torch.Tensor, camera: Camera, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(view depth [H, W], inf where empty; trust [H, W] in [0, 1]: low near depth seams and the mask's edge)
    of the mesh seen from `camera`, for `see_picture`."""
    z, _ = raster.rasterize(camera.project(vertices)[0], faces, camera.height, camera.width)
    zdepth = camera.depth_from_z(z)  # [H, W] view depth, inf where empty
    pixel = 1.0 / camera.scale  # one pixel in mesh units at the centre's depth
    # seams: depth jumps of more than 4 pixels' worth (or object/background) between neighbouring pixels
    finite = torch.where(torch.isfinite(zdepth), zdepth, torch.full_like(zdepth, 1e9))
    jump = torch.zeros_like(zdepth, dtype=torch.bool)
    jump[:, 1:] |= (finite[:, 1:] - finite[:, :-1]).abs() > 4 * pixel
    jump[1:, :] |= (finite[1:, :] - finite[:-1, :]).abs() > 4 * pixel
    k = 2 * SEAM_PIXELS + 1
    near_seam = F.max_pool2d(jump.float()[None], k, 1, SEAM_PIXELS)[0]
    core = -F.max_pool2d(-mask.float()[None], k, 1, SEAM_PIXELS)[0]  # eroded mask: 1 only away from the mask's edge
    return zdepth, (1 - 0.8 * near_seam) * (0.2 + 0.8 * core)


def see_picture(
    points: torch.Tensor,
    normals: torch.Tensor,
    camera: Camera,
    view: tuple[torch.Tensor, torch.Tensor],
    rgb: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(colours [P, 3], confidence [P] in [0, 1], 0 = not seen) of surface points [P, 3] with unit normals [P, 3]
    in rgb [3, H, W] and mask [H, W], given `picture_view`'s z-buffer and trust map of the same camera."""
    zdepth, trust = view
    screen, depth = camera.project(points)
    pixel = 1.0 / camera.scale
    tol = 1.5 * pixel * (depth / camera.distance if camera.fov > 0 else torch.ones_like(depth))
    col = screen[:, 0].floor().long()
    row = screen[:, 1].floor().long()
    inside = (col >= 0) & (col < camera.width) & (row >= 0) & (row < camera.height)
    at = row.clamp(0, camera.height - 1) * camera.width + col.clamp(0, camera.width - 1)
    seen = inside & (depth <= zdepth.flatten()[at] + tol)
    xy = screen[:, :2]
    on_mask = _sample(mask.float()[None], xy)[:, 0] > 0.5
    facing = (normals * camera.toward_camera(points)).sum(1)
    angle = ((facing - 0.15) / 0.45).clamp(0, 1)
    angle = angle * angle * (3 - 2 * angle)  # smoothstep
    conf = angle * _sample(trust[None], xy)[:, 0] * (seen & on_mask)
    colours = _sample(rgb, xy).clamp(0, 1)
    return colours, conf


def project_colours(
    vertices: torch.Tensor, faces: torch.Tensor, camera: Camera, rgb: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(colours [V, 3], confidence [V] in [0, 1], 0 = not seen) from rgb [3, H, W] and mask [H, W] in the
    camera's frame (H, W = camera.height, camera.width)."""
    view = picture_view(vertices, faces, camera, mask)
    return see_picture(vertices, vertex_normals(vertices, faces), camera, view, rgb, mask)


def _edges(faces: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Directed edges (src, dst) of the mesh graph over n vertices: each undirected edge once per direction
    (a closed mesh lists every edge in two faces; deduplicating halves the sweeps' work)."""
    a, b = faces.flatten(), faces[:, [1, 2, 0]].flatten()
    key = torch.unique(torch.minimum(a, b) * n + torch.maximum(a, b))
    lo, hi = key // n, key % n
    return torch.cat([lo, hi]), torch.cat([hi, lo])


def _jacobi(x, src, dst, seed, w, sweeps: int, should_stop) -> torch.Tensor:
    """Sweeps of x_v ← (λ w_v seed_v + Σ x_u) / (λ w_v + deg v), damped 0.8 (no oscillation on near-bipartite parts)."""
    n = x.shape[0]
    deg = torch.zeros(n, device=x.device).index_add_(0, dst, torch.ones_like(dst, dtype=torch.float32))
    lw = (LAMBDA * w)[:, None]
    den = (lw + deg[:, None]).clamp_min(1e-12)
    fixed = lw * seed
    isolated = (deg == 0) & (w == 0)
    for i in range(sweeps):  # host loop over sweeps
        if i % 10 == 0:
            _poll(should_stop)
        s = torch.zeros_like(x).index_add_(0, dst, x[src])
        new = (fixed + s) / den
        x = torch.where(isolated[:, None], x, 0.2 * x + 0.8 * new)
    return x


def fill_colours(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    colours: torch.Tensor,
    conf: torch.Tensor,
    should_stop: ShouldStop | None = None,
) -> torch.Tensor:
    """[V, 3]: seen colours kept (screened), hidden ones diffused over the surface, coarse to fine."""
    src, dst = _edges(faces, vertices.shape[0])
    v = vertices.float()
    lo = v.amin(0)
    extent = float((v.amax(0) - lo).amax().clamp_min(1e-9))
    e = v[faces[:, 1]] - v[faces[:, 0]] if faces.shape[0] else v[:0]
    edge = float(e.norm(dim=1).mean()) if e.shape[0] else extent
    known = conf > 0
    x = prev = None  # prev: each vertex's cluster at the last level (set with x)
    cells = COARSEST
    while extent / cells > 2 * edge:  # cluster levels: cells of at least two edges, halving
        key = ((v - lo) / (extent / cells)).floor().long().clamp(0, cells - 1)
        key = (key[:, 0] * cells + key[:, 1]) * cells + key[:, 2]
        _, cid = torch.unique(key, return_inverse=True)
        n = int(cid.max()) + 1
        wsum = torch.zeros(n, device=v.device).index_add_(0, cid, conf)
        seed = (
            torch.zeros(n, 3, device=v.device).index_add_(0, cid, colours * conf[:, None])
            / wsum.clamp_min(1e-12)[:, None]
        )
        if x is None:  # start from the mean seen colour
            start = (colours * conf[:, None]).sum(0) / conf.sum().clamp_min(1e-12)
            init = start.expand(n, 3).clone()
        else:  # prolong: each cluster starts from the mean of its vertices' previous values
            cnt = torch.zeros(n, device=v.device).index_add_(0, cid, torch.ones_like(conf))
            init = torch.zeros(n, 3, device=v.device).index_add_(0, cid, x[prev]) / cnt[:, None]
        cs, cd = cid[src], cid[dst]
        cross = cs != cd
        x = _jacobi(init, cs[cross], cd[cross], seed, (wsum > 0).float() * wsum.clamp(max=1.0), SWEEPS, should_stop)
        prev = cid
        cells *= 2
    if x is None:
        x = ((colours * conf[:, None]).sum(0) / conf.sum().clamp_min(1e-12)).expand(v.shape[0], 3).clone()
    else:
        x = x[prev]
    x = torch.where(known[:, None], colours, x)  # start the mesh level at the seen colours
    return _jacobi(x, src, dst, colours, conf, FINAL_SWEEPS, should_stop).clamp(0, 1)


# ---------------------------------------------------------------- symmetry


def _cell_keys(points: torch.Tensor, lo: torch.Tensor, h: float, n: int) -> torch.Tensor:
    g = ((points - lo) / h).floor().long() + 1  # +1: a one-cell margin for neighbours and mirrored points
    inb = ((g >= 0) & (g < n)).all(1)
    g = g.clamp(0, n - 1)
    return torch.where(inb, (g[:, 0] * n + g[:, 1]) * n + g[:, 2], -1)


def _normals_to_try(device) -> torch.Tensor:
    """The three axes first, then 253 spread directions of a half sphere (Fibonacci), [256, 3]."""
    k = torch.arange(253, dtype=torch.float64) + 0.5
    z = k / 253  # upper half sphere: a plane's normal and its opposite are the same plane
    phi = k * torch.pi * (3 - 5**0.5)
    r = (1 - z * z).sqrt()
    fib = torch.stack([r * phi.cos(), z, r * phi.sin()], 1)
    return torch.cat([torch.eye(3, dtype=torch.float64), fib]).float().to(device)


def symmetry_plane(
    vertices: torch.Tensor, samples: int = 4096, cells: int = 128
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(point [3], unit normal [3], fit in [0, 1]) of the best mirror plane through the centroid; fit = the
    fraction of mirrored sample vertices landing in a cell (1/cells of the extent) next to the surface."""
    v = vertices.float()
    centroid = v.mean(0)
    lo = v.amin(0)
    extent = float((v.amax(0) - lo).amax().clamp_min(1e-9))
    h = extent / cells
    n = cells + 3
    stride = max(1, v.shape[0] // 200_000)
    occ_keys = _cell_keys(v[::stride], lo, h, n)
    offs = torch.stack(torch.meshgrid(*[torch.tensor([-1, 0, 1], device=v.device)] * 3, indexing="ij"), -1).view(-1, 3)
    occ = torch.unique((occ_keys[:, None] + (offs[:, 0] * n + offs[:, 1]) * n + offs[:, 2]).flatten())
    pick = torch.linspace(0, v.shape[0] - 1, min(samples, v.shape[0]), device=v.device).long()
    p = v[pick] - centroid
    best = (-1.0, None)
    for normal in _normals_to_try(v.device):  # host loop over 256 candidate planes (small batches of points)
        mirrored = p - 2 * (p @ normal)[:, None] * normal + centroid
        keys = _cell_keys(mirrored, lo, h, n)
        i = torch.searchsorted(occ, keys).clamp(max=occ.numel() - 1)
        fit = float(((occ[i] == keys) & (keys >= 0)).float().mean())
        if fit > best[0] + 1e-9:
            best = (fit, normal)
    return centroid, best[1], best[0]


def mirror_seeds(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    colours: torch.Tensor,
    conf: torch.Tensor,
    fit_threshold: float = SYMMETRY_FIT,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(colours, confidence, plane fit): hidden vertices whose mirror image lands in a cell (~2 edge lengths)
    holding seen vertices get those vertices' mean colour at MIRROR_WEIGHT x their confidence; unchanged when
    the best plane's fit is below `fit_threshold`."""
    if vertices.shape[0] < 4:
        return colours, conf, 0.0
    centroid, normal, fit = symmetry_plane(vertices)
    if fit < fit_threshold or not bool((conf > 0).any()):
        return colours, conf, fit
    v = vertices.float()
    lo = v.amin(0) - 1e-6
    extent = float((v.amax(0) - lo).amax().clamp_min(1e-9))
    e = v[faces[:, 1]] - v[faces[:, 0]]
    h = max(extent / 253, 2 * float(e.norm(dim=1).mean())) if faces.shape[0] else extent / 253
    n = int(extent / h) + 4
    seen = conf > 0
    keys = _cell_keys(v[seen], lo, h, n)
    table, inv = torch.unique(keys, return_inverse=True)
    w = conf[seen]
    wsum = torch.zeros(table.numel(), device=v.device).index_add_(0, inv, w)
    mean = torch.zeros(table.numel(), 3, device=v.device).index_add_(0, inv, colours[seen] * w[:, None])
    mean = mean / wsum.clamp_min(1e-12)[:, None]
    hidden = torch.nonzero(~seen).squeeze(1)
    p = v[hidden] - centroid
    q = _cell_keys(p - 2 * (p @ normal)[:, None] * normal + centroid, lo, h, n)
    i = torch.searchsorted(table, q).clamp(max=table.numel() - 1)
    hit = (table[i] == q) & (q >= 0)
    colours, conf = colours.clone(), conf.clone()
    colours[hidden[hit]] = mean[i[hit]]
    conf[hidden[hit]] = MIRROR_WEIGHT * wsum[i[hit]].clamp(max=1.0)
    return colours, conf, fit
