"""Benchmark: colouring a 1024-scale mesh (millions of faces) from its picture, and the rasterizer alone.

    python bench/bench_colour.py            # GPU: 4.2 M-face shape, writes bench/results/<date>-<gpu>-colour.md
    python bench/bench_colour.py --tiny     # CPU smoke run (small shape), prints only

The scene is s2core/colour/scene.py's bumpy shape at n = 1024 (2.1 M vertices, 4.2 M faces, the size of a
1024 decode), coloured by its smooth field and rendered flat at 1024² from azimuth 35°, elevation 20°, fov 30°
(our rasterizer). `colour_mesh` then runs as the node runs it: preprocessing, camera search, projection,
mirror test, fill. Reported: wall time of each part (CUDA synchronised), peak allocated memory, the camera
error and the seen-colour error; the same with the optional UV texture baked (2048², lat-long UVs standing in
for core Unwrap Mesh's atlas); plus the rasterizer's time per call at the search and projection sizes.
The rasterizer has no Triton kernel (see kernels/raster.py): these rows are what a kernel would have to beat.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kernels.raster import rasterize  # noqa: E402
from s2core import results  # noqa: E402
from s2core.colour import Camera, colour_mesh, paint, render_preview  # noqa: E402
from s2core.colour import camera as camera_mod
from s2core.colour.scene import bumpy_shape, shape_colours  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn, *args, **kw):
    sync(device)
    t = time.perf_counter()
    out = fn(*args, **kw)
    sync(device)
    return out, time.perf_counter() - t


def latlong_uvs(v: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Per-corner UVs [F, 3, 2] of a lat-long shape (u from the azimuth, v = 0 at the top), with the corners
    of faces that cross the u = 0 / 1 seam moved past 1 so no face spans the atlas: a stand-in for core
    Unwrap Mesh's atlas, enough to time the bake."""
    d = v / v.norm(dim=1, keepdim=True)
    uv = torch.stack(
        [torch.atan2(d[:, 2], d[:, 0]) / (2 * math.pi) + 0.5, torch.acos(d[:, 1].clamp(-1, 1)) / math.pi], 1
    )
    c = uv[f]  # [F, 3, 2]
    wrap = (c[..., 0].amax(1) - c[..., 0].amin(1)) > 0.5
    c[..., 0] = torch.where(wrap[:, None] & (c[..., 0] < 0.5), c[..., 0] + 1, c[..., 0])
    return c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on a small shape; no results file")
    ap.add_argument("--n", type=int, default=None, help="latitude rows of the shape (faces ≈ 4 n²; default 1024)")
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    n = args.n or (48 if args.tiny else 1024)
    v, f = bumpy_shape(n, device=device)
    truth = shape_colours(v)
    camera = Camera(35.0, 20.0, 30.0, (0.0, 0.0, 0.0), float(v.norm(dim=1).max()), 480.0, 512.0, 512.0, 1024, 1024)
    image = render_preview(v, f, camera, truth, shade=False)[None].cpu()
    mask = (rasterize(camera.project(v)[0], f, 1024, 1024)[1] >= 0).float()[None].cpu()
    mesh = results.Mesh.from_list([(v, f)]).to(device)
    rows = []

    # the parts, as colour_mesh runs them
    parts = {}
    orig = {
        k: getattr(m, k)
        for m, k in (
            (camera_mod, "find_camera"),
            (paint, "project_colours"),
            (paint, "mirror_seeds"),
            (paint, "fill_colours"),
        )
    }
    import s2core.colour as colour_pkg

    def wrap(name, fn):
        def inner(*a, **k):
            out, dt = timed(device, fn, *a, **k)
            parts[name] = parts.get(name, 0.0) + dt
            return out

        return inner

    for name, fn in orig.items():
        setattr(colour_pkg, name, wrap(name, fn))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    (out, (report,)), total = timed(device, colour_mesh, mesh, image, mask)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else float("nan")
    for name, fn in orig.items():
        setattr(colour_pkg, name, fn)
    cam = report.camera
    d_az = abs((cam.azimuth - 35.0 + 180) % 360 - 180)
    d_el = abs(cam.elevation - 20.0)
    _, conf = paint.project_colours(v, f, camera, image[0].permute(2, 0, 1).to(device), mask[0].to(device))
    err = (out.vertex_colors.to(device) - truth).abs().amax(1)[conf > 0.5]
    rows.append(f"| colour_mesh, total | {total:.2f} s | peak {peak:.2f} GiB beyond the mesh |")
    for name in orig:
        rows.append(f"| {name} | {parts.get(name, 0.0):.2f} s | |")
    rows.append(f"| camera error | az {d_az:.1f}°, el {d_el:.1f}° | IoU {report.iou:.3f} |")
    rows.append(f"| seen-colour error (conf > 0.5) | mean {float(err.mean()):.4f}, max {float(err.max()):.4f} | |")

    # the optional UV texture, as the node bakes it when the mesh has UVs (Colour From Image, texture_size)
    size = 256 if args.tiny else 2048
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # the bake timed on its own (a difference of two colour_mesh totals is below their run-to-run noise on a GPU)
    colour_pkg.bake_texture = wrap("bake_texture", orig_bake := colour_pkg.bake_texture)
    (_, (rep_t,)), total_t = timed(device, colour_mesh, mesh, image, mask, uvs=[latlong_uvs(v, f)], texture_size=size)
    colour_pkg.bake_texture = orig_bake
    peak_t = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else float("nan")
    rows.append(
        f"| colour_mesh with a {size}² texture | {total_t:.2f} s ({parts['bake_texture']:.2f} s of it the bake) | "
        f"peak {peak_t:.2f} GiB beyond the mesh; {tuple(rep_t.texture.shape)} |"
    )

    # the rasterizer alone at the search and projection sizes (full mesh and the search's clustered stand-in)
    for size in (64, 128, 1024):
        cam_s = camera.resized(size, size)
        screen = cam_s.project(v)[0]
        rasterize(screen, f, size, size)  # warm-up
        reps = 5
        _, dt = timed(device, lambda: [rasterize(screen, f, size, size) for _ in range(reps)])
        pv, pf = camera_mod.cluster_mesh(v, f, 2 * size) if size <= 128 else (v, f)
        ps = cam_s.project(pv)[0]
        _, dtp = timed(device, lambda: [rasterize(ps, pf, size, size) for _ in range(reps)])
        rows.append(
            f"| rasterize {size}² | {1e3 * dt / reps:.1f} ms ({f.shape[0]:,} faces) | "
            f"{1e3 * dtp / reps:.1f} ms ({pf.shape[0]:,} faces, stand-in) |"
        )

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    head = (
        f"# colour from image, {v.shape[0]:,} vertices / {f.shape[0]:,} faces\n\n{datetime.date.today()}, {gpu}, "
        f"torch {torch.__version__}, `python bench/bench_colour.py{''.join(' ' + a for a in sys.argv[1:])}`\n\n"
        "| what | time | note |\n|---|---|---|\n"
    )
    text = head + "\n".join(rows) + "\n\n" + report.describe() + "\n"
    print(text)
    if device.type == "cuda" and not args.tiny:
        tag = gpu.replace(" ", "-").replace("/", "-")
        path = REPO / "bench" / "results" / f"{datetime.date.today()}-{tag}-colour.md"
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
