"""The camera of the input picture, found from the object's silhouette.

Frame: s2core's mesh frame (+Y up, the glTF front looks along -Z from +Z). A `Camera` looks at the centre of
the mesh's bounding box from direction

    d = (sin az · cos el, sin el, cos az · cos el)        (az = 0, el = 0: from +Z, the front)

with no roll (pictures are upright), right r = up × d / |·|, screen up u = d × r. A point p (relative to the
centre) has view depth `depth = distance - p·d` and image position (column, row) in pixels

    column = cx + scale · (p·r) · k,    row = cy - scale · (p·u) · k,     k = distance / depth (perspective), 1 (ortho)

so `scale` is pixels per mesh unit at the centre's depth, for either projection. `fov` (degrees, 0 =
orthographic) sets the perspective strength: the camera sits at `distance = radius / sin(fov / 2)`, where the
bounding sphere of radius `radius` just fills the field of view; only this ratio shapes the silhouette, since
scale and shift follow from the mask.

Search (`find_camera`): the encoder's preprocessing crops the picture to the object's bounding box, centres
it and pads it, so the object's bounding box in the frame is known from the mask, and for any view direction
the scale and shift follow from the projected vertices' bounding box (which is exactly the rendered silhouette's
bounding box): only azimuth, elevation (and the perspective strength, from a short list) are searched. A
deterministic grid over the sphere at low resolution, then pattern-search refinement of the best few
candidates at a higher resolution; score = silhouette IoU. Silhouettes cannot tell a view from its mirror
view when the object's outline is left-right symmetric; ties go to the earlier grid point (front first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._kernels import raster
from ..hooks import Callback, ShouldStop, poll

AZIMUTHS = tuple(range(0, 360, 15))  # coarse grid, degrees; 0 = front
ELEVATIONS = (0, 15, 30, -15, 45, 60, -30)  # common photo elevations first: earlier wins ties
FOVS = (30.0, 0.0)  # perspective strengths tried (degrees, 0 = orthographic); 30°: a typical product photo
COARSE_SIZE, FINE_SIZE = 64, 128  # silhouette resolutions of the grid and of the refinement
TOP_K = 3  # coarse candidates refined
STEPS = (8.0, 4.0, 2.0, 1.0, 0.5)  # refinement step sizes, degrees
PROXY_FACES = 200_000  # larger meshes are searched through `cluster_mesh`


@dataclass(frozen=True)
class Camera:
    """A view of the mesh: azimuth/elevation in degrees, fov in degrees (0 = orthographic), the centre
    [3] and bounding radius of the mesh (mesh units), scale (pixels per mesh unit at the centre), cx/cy (pixel
    position of the centre), and the image frame size (height, width) in pixels."""

    azimuth: float
    elevation: float
    fov: float
    centre: tuple[float, float, float]
    radius: float
    scale: float
    cx: float
    cy: float
    height: int
    width: int

    @property
    def distance(self) -> float:
        """Camera distance from the centre (mesh units); inf for orthographic."""
        return self.radius / math.sin(math.radians(self.fov) / 2) if self.fov > 0 else math.inf

    def axes(self, device=None) -> torch.Tensor:
        """[3, 3] rows r, u, d (right, up, towards the camera) in mesh coordinates."""
        az, el = math.radians(self.azimuth), math.radians(self.elevation)
        d = torch.tensor([math.sin(az) * math.cos(el), math.sin(el), math.cos(az) * math.cos(el)], dtype=torch.float64)
        r = torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), d)
        r = r / r.norm().clamp_min(1e-12) if r.norm() > 1e-9 else torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
        u = torch.linalg.cross(d, r)
        return torch.stack([r, u, d]).float().to(device)

    def resized(self, height: int, width: int) -> "Camera":
        """The same view in a frame scaled to height x width (same picture, other resolution)."""
        sy, sx = height / self.height, width / self.width
        return Camera(
            self.azimuth,
            self.elevation,
            self.fov,
            self.centre,
            self.radius,
            self.scale * sx,
            self.cx * sx,
            self.cy * sy,
            height,
            width,
        )

    def project(self, vertices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """vertices [V, 3] → (screen [V, 3]: column, row, z for `rasterize`; depth [V] view depth, mesh units)."""
        p = vertices.float() - torch.tensor(self.centre, device=vertices.device)
        cam = p @ self.axes(vertices.device).T  # [V, 3] (right, up, towards camera)
        if self.fov > 0:
            depth = self.distance - cam[:, 2]
            k = self.distance / depth.clamp_min(1e-6 * self.radius)
            z = -1.0 / depth.clamp_min(1e-6 * self.radius)  # linear in screen space; nearer = smaller
        else:
            depth = -cam[:, 2]
            k = torch.ones_like(depth)
            z = depth
        col = self.cx + self.scale * cam[:, 0] * k
        row = self.cy - self.scale * cam[:, 1] * k
        return torch.stack([col, row, z], 1), depth

    def depth_from_z(self, z: torch.Tensor) -> torch.Tensor:
        """The rasterizer's z back to view depth (inf stays inf)."""
        return -1.0 / z if self.fov > 0 else z

    def toward_camera(self, vertices: torch.Tensor) -> torch.Tensor:
        """[V, 3] unit vectors from each vertex toward the camera."""
        r, u, d = self.axes(vertices.device)
        if self.fov == 0:
            return d.expand_as(vertices)
        eye = torch.tensor(self.centre, device=vertices.device) + self.distance * d
        return F.normalize(eye - vertices.float(), dim=1)

    def describe(self) -> str:
        lens = f"perspective, fov {self.fov:.0f}°, distance {self.distance:.2f}" if self.fov > 0 else "orthographic"
        return (
            f"azimuth {self.azimuth:.1f}°, elevation {self.elevation:.1f}° ({lens}), {self.scale:.1f} px per "
            f"unit, centre at ({self.cx:.1f}, {self.cy:.1f}) in a {self.width}x{self.height} frame"
        )


def silhouette(vertices: torch.Tensor, faces: torch.Tensor, camera: Camera) -> torch.Tensor:
    """[H, W] bool: pixels covered by the mesh seen from `camera`."""
    screen, _ = camera.project(vertices)
    _, face = raster.rasterize(screen, faces, camera.height, camera.width)
    return face >= 0


def mask_box(mask: torch.Tensor) -> tuple[float, float, float, float] | None:
    """(x0, x1, y0, y1) continuous extent of mask > 0.5 in pixels, or None when empty."""
    rows, cols = torch.nonzero((mask > 0.5).any(1)), torch.nonzero((mask > 0.5).any(0))
    if rows.numel() == 0:
        return None
    return float(cols[0]), float(cols[-1]) + 1, float(rows[0]), float(rows[-1]) + 1


def fit_camera(
    vertices: torch.Tensor,
    azimuth: float,
    elevation: float,
    fov: float,
    box,
    height: int,
    width: int,
    centre,
    radius: float,
) -> tuple[Camera, torch.Tensor]:
    """(camera, its screen [V, 3] of `vertices`): the camera of this direction whose projected bounding box
    matches `box` (x0, x1, y0, y1): same centre, scale from the geometric mean of the width and height ratios."""
    unit = Camera(azimuth, elevation, fov, centre, radius, 1.0, 0.0, 0.0, height, width)
    screen, _ = unit.project(vertices)
    lo, hi = screen[:, :2].amin(0).tolist(), screen[:, :2].amax(0).tolist()
    x0, x1, y0, y1 = box
    span = [max(hi[0] - lo[0], 1e-9), max(hi[1] - lo[1], 1e-9)]
    scale = math.sqrt((x1 - x0) / span[0] * (y1 - y0) / span[1])
    cx = (x0 + x1) / 2 - scale * (lo[0] + hi[0]) / 2
    cy = (y0 + y1) / 2 - scale * (lo[1] + hi[1]) / 2
    # scale and shift act on the unit camera's screen positions: no second projection
    screen = torch.cat([screen[:, :2] * scale + torch.tensor([cx, cy], device=screen.device), screen[:, 2:]], 1)
    return Camera(azimuth, elevation, fov, centre, radius, scale, cx, cy, height, width), screen


def cluster_mesh(vertices: torch.Tensor, faces: torch.Tensor, cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in of at most ~cells² x 12 faces for silhouettes: vertices merged per cell of a cells³ grid over the
    bounding box (mean position), faces remapped, collapsed faces dropped. Its outline is within one cell of the
    mesh's, under a pixel at the search resolutions when cells = 2 x the silhouette size."""
    lo = vertices.amin(0)
    h = float((vertices.amax(0) - lo).amax().clamp_min(1e-9)) / cells
    g = ((vertices - lo) / h).floor().long().clamp(0, cells - 1)
    _, cid = torch.unique((g[:, 0] * cells + g[:, 1]) * cells + g[:, 2], return_inverse=True)
    n = int(cid.max()) + 1
    count = torch.zeros(n, device=vertices.device).index_add_(0, cid, torch.ones_like(vertices[:, 0]))
    merged = torch.zeros(n, 3, device=vertices.device).index_add_(0, cid, vertices.float()) / count[:, None]
    f = cid[faces]
    keep = (f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])
    return merged, f[keep]


def _shrink_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """[H, W] float → [size', size''] bool with the longer side = size (area average, > 0.5)."""
    h, w = mask.shape
    s = size / max(h, w)
    out = F.interpolate(mask.float()[None, None], size=(max(1, round(h * s)), max(1, round(w * s))), mode="area")
    return out[0, 0] > 0.5


def find_camera(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    mask: torch.Tensor,
    fovs=FOVS,
    callback: Callback | None = None,
    should_stop: ShouldStop | None = None,
) -> tuple[Camera, float]:
    """(camera in the frame of `mask` [H, W] (1 = object), silhouette IoU at FINE_SIZE) for one mesh.

    Deterministic: a fixed grid and a fixed refinement order; see the module docstring. `should_stop()` is
    polled and `callback(done, total)` told after every grid row and refinement round.
    """
    if faces.shape[0] == 0:
        raise ValueError("The mesh has no faces, so there is no surface to colour; connect a decoded mesh.")
    if mask_box(mask) is None:
        raise ValueError(
            "The mask is empty, so the object cannot be located in the image; connect the object's "
            "mask (or an image with transparency)."
        )
    lo, hi = vertices.amin(0), vertices.amax(0)
    centre = tuple(((lo + hi) / 2).tolist())
    radius = float((vertices - (lo + hi) / 2).norm(dim=1).amax().clamp_min(1e-6))
    targets = {s: _shrink_mask(mask, s) for s in (COARSE_SIZE, FINE_SIZE)}
    boxes = {s: mask_box(t) or (0.0, 1.0, 0.0, 1.0) for s, t in targets.items()}

    # meshes of millions of faces are searched through a clustered stand-in (sub-pixel changes of the outline)
    proxies = {
        s: (cluster_mesh(vertices, faces, 2 * s) if faces.shape[0] > PROXY_FACES else (vertices, faces))
        for s in (COARSE_SIZE, FINE_SIZE)
    }

    def score(az: float, el: float, fov: float, size: int) -> tuple[float, Camera]:
        t = targets[size]
        pv, pf = proxies[size]
        cam, screen = fit_camera(pv, az, el, fov, boxes[size], t.shape[0], t.shape[1], centre, radius)
        sil = raster.rasterize(screen, pf, cam.height, cam.width)[1] >= 0
        inter, union = (sil & t).sum(), (sil | t).sum()
        return float(inter) / max(float(union), 1.0), cam

    # grid at the first perspective strength only (the others barely change a 64 px silhouette), refinement of
    # the TOP_K best with it, then the best direction refined again with every other strength
    total = len(ELEVATIONS) + TOP_K * len(STEPS) + (len(fovs) - 1) * len(STEPS[2:])
    coarse = []
    for i, el in enumerate(ELEVATIONS):  # host loop over grid rows
        _poll(should_stop)
        for az in AZIMUTHS:
            coarse.append((score(az, el, fovs[0], COARSE_SIZE)[0], len(coarse), az, el))
        if callback is not None:
            callback(i + 1, total)
    coarse.sort(key=lambda c: (-c[0], c[1]))  # best IoU first, earlier grid point on ties
    done = [len(ELEVATIONS)]

    def refine(az: float, el: float, fov: float, steps) -> tuple[float, Camera]:
        cur, cam = score(az, el, fov, FINE_SIZE)
        for step in steps:  # compass search: move to the best of 4 neighbours until none improves, then halve
            _poll(should_stop)
            for _ in range(16):
                moves = ((az - step, el), (az + step, el), (az, min(89.0, el + step)), (az, max(-89.0, el - step)))
                trial = max(
                    ((*score(a % 360.0, e, fov, FINE_SIZE), -k) for k, (a, e) in enumerate(moves)),
                    key=lambda x: (x[0], x[2]),
                )
                if trial[0] <= cur:
                    break
                cur, cam = trial[0], trial[1]
                az, el = cam.azimuth, cam.elevation
            done[0] += 1
            if callback is not None:
                callback(done[0], total)
        return cur, cam

    best = max(
        (refine(az, el, fovs[0], STEPS) + (-k,) for k, (_, _, az, el) in enumerate(coarse[:TOP_K])),
        key=lambda x: (x[0], x[2]),
    )[:2]
    for fov in fovs[1:]:
        trial = refine(best[1].azimuth, best[1].elevation, fov, STEPS[2:])
        if trial[0] > best[0]:
            best = trial
    iou, cam = best
    # the same direction refitted to the full-resolution mask's box (sharper than the FINE_SIZE frame's)
    return fit_camera(
        vertices, cam.azimuth, cam.elevation, cam.fov, mask_box(mask), mask.shape[0], mask.shape[1], centre, radius
    )[0], iou


def _poll(should_stop: ShouldStop | None) -> None:
    poll(should_stop, "colouring")
