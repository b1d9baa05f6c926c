"""Benchmark: mesh → latent index at 1024³ (SPEC.md §10.2), sparse (ours) vs the original's dense method.

    python bench/bench_voxelize.py                  # GPU: ≥500k-face mesh at 1024³, writes bench/results/
    python bench/bench_voxelize.py --tiny           # CPU smoke run (small mesh, 128³), prints only
    python bench/bench_voxelize.py --upstream /path/to/Direct3D-S2   # also time the original's CUDA kernel

"dense" re-states the original's approach in torch: a D³ int32 distance grid (4 GiB at 1024) updated
with an atomic-min scatter from every triangle's grown box, thresholded, nonzero, // factor, unique.
"sparse" is `s2core.mesh.voxelize.mesh_to_latent_index`: backend="reference" (level 2 in PyTorch windows)
and backend="triton" (level 2 in `kernels/voxelize.py`, one program per tile of (triangle, cell) pairs,
timed per tile shape PAIRSxBLOCK). Every index set must equal the first reference row's; the script
prints the table, writes it (GPU runs), and exits with status 1 if any row disagrees.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import torch
import trimesh

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kernels import voxelize as K  # noqa: E402
from s2core.mesh.voxelize import GROW, mesh_to_latent_index, normalize_vertices, point_triangle_distance  # noqa: E402


def make_mesh(subdivisions: int) -> trimesh.Trimesh:
    """A bumpy sphere with a thin fin: many small triangles plus a few long ones."""
    m = trimesh.creation.icosphere(subdivisions=subdivisions)
    v = m.vertices
    r = 1 + 0.08 * np.sin(7 * v[:, 0]) * np.cos(5 * v[:, 1]) + 0.05 * np.sin(11 * v[:, 2])
    sphere = trimesh.Trimesh(v * r[:, None], m.faces, process=False)
    fin = trimesh.creation.box(extents=(2.4, 0.01, 0.6))
    return trimesh.util.concatenate([sphere, fin])


@torch.no_grad()
def dense_mesh_to_latent_index(
    vertices, faces, resolution=1024, factor=8, threshold=4.0, device="cuda", window=1 << 22
):
    """The original's dense algorithm (int32 D³ grid of distances × 1e7, atomic min), in torch."""
    verts = normalize_vertices(torch.as_tensor(np.asarray(vertices), dtype=torch.float64, device=device)).float() * 0.5
    tris = verts[torch.as_tensor(np.asarray(faces), dtype=torch.int64, device=device)]
    D = resolution
    lo = (torch.floor((tris.min(1).values.double() + 0.5) * (D - 1)).long() - GROW).clamp(0, D - 1)
    hi = (torch.floor((tris.max(1).values.double() + 0.5) * (D - 1)).long() + GROW).clamp(0, D - 1)
    dims = hi - lo + 1
    counts = dims.prod(1)
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    udf = torch.full((D**3,), 10_000_000, dtype=torch.int32, device=device)
    coord = K.lattice_coordinates(D, device)  # the same lattice coordinates as ours (i/(D-1) - 0.5 in float32)
    for first in range(0, int(ends[-1]), window):
        flat = torch.arange(first, min(first + window, int(ends[-1])), device=device)
        t = torch.searchsorted(ends, flat, right=True)
        local = flat - starts[t]
        ny, nz = dims[t, 1], dims[t, 2]
        ijk = torch.stack([local // (ny * nz), local // nz % ny, local % nz], 1) + lo[t]
        tri = tris[t]
        d = point_triangle_distance(coord[ijk], tri[:, 0], tri[:, 1], tri[:, 2])
        ok = d < threshold / D
        idx = (ijk[ok, 0] * D + ijk[ok, 1]) * D + ijk[ok, 2]
        udf.scatter_reduce_(0, idx, (d[ok] * 10_000_000).int(), "amin")
    grid = (udf.float() / 10_000_000).view(1, D, D, D)
    del udf
    index = (grid < threshold / D).nonzero()
    del grid
    index[:, 1:] //= factor
    return torch.unique(index, dim=0).int()


def upstream_mesh_to_latent_index(upstream: Path, vertices, faces, resolution=1024, factor=8):
    """The original's own CUDA kernel (built on the fly from its third_party/voxelize sources)."""
    from torch.utils.cpp_extension import load

    src = upstream / "third_party" / "voxelize" / "src"
    ext = load("udf_ext", [str(src / "udf_cuda.cpp"), str(src / "udf_kernel.cu")], verbose=False)
    v = normalize_vertices(torch.as_tensor(np.asarray(vertices), dtype=torch.float64)).float().cuda() * 0.5
    f = torch.as_tensor(np.asarray(faces)).int().cuda()
    udf = torch.zeros(resolution**3, device="cuda").int() + 10_000_000
    ext.compute_valid_udf(v, f, udf, f.shape[0], resolution, 4.0)
    sdf = (udf.float() / 10_000_000).reshape(1, resolution, resolution, resolution)
    index = (sdf < 4 / resolution).nonzero()
    index[:, 1:] //= factor
    return torch.unique(index, dim=0).int()


def measure(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else float("nan")
    return out, dt, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="CPU smoke run: small mesh at 128³, no results file (the kernel rows need TRITON_INTERPRET=1 on a CPU)",
    )
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--subdivisions", type=int, default=None, help="icosphere level (7 → 328k faces, 8 → 1.3M)")
    ap.add_argument(
        "--windows",
        type=str,
        default=None,
        help="log2 candidate-window sizes of the reference path (default 18,20,21,22; --tiny 18)",
    )
    ap.add_argument(
        "--kernel-windows",
        type=str,
        default=None,
        help="log2 pair-window sizes of the kernel path (default 21,23; --tiny 18)",
    )
    ap.add_argument(
        "--tiles",
        type=str,
        default=None,
        help="kernel tiles PAIRSxBLOCK to time (default 1x128,1x64,2x64,4x32; --tiny 1024x128)",
    )
    ap.add_argument("--upstream", type=Path, default=None, help="checkout of DreamTechAI/Direct3D-S2 to also time")
    ap.add_argument("--skip-dense", action="store_true")
    args = ap.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    res = args.resolution or (128 if args.tiny else 1024)
    sub = args.subdivisions if args.subdivisions is not None else (3 if args.tiny else 8)
    mesh = make_mesh(sub)
    rows = []  # (method, seconds, peak MiB, tokens, same as the reference)
    print(f"mesh: {len(mesh.faces)} faces, resolution {res}, device {device}")

    def run(backend, w):
        return mesh_to_latent_index(
            mesh.vertices, mesh.faces, res, device=device, max_candidates=1 << w, backend=backend
        )

    ref = None
    for w in [int(x) for x in (args.windows or ("18" if args.tiny else "18,20,21,22")).split(",")]:
        run("reference", w)  # warm-up
        out, dt, peak = measure(lambda: run("reference", w), device)
        ref = out.cpu() if ref is None else ref
        rows.append((f"sparse reference (PyTorch), window 2^{w}", dt, peak, out.shape[0], torch.equal(out.cpu(), ref)))
        print(rows[-1])
    defaults = K.PAIRS, K.BLOCK, K.PAIRS_INTERPRETED
    tiles = args.tiles or ("1024x128" if args.tiny else "1x128,1x64,2x64,4x32")
    for tile in tiles.split(","):
        K.PAIRS, K.BLOCK = (int(x) for x in tile.split("x"))  # the dispatcher's defaults on CUDA
        K.PAIRS_INTERPRETED = K.PAIRS
        for w in [int(x) for x in (args.kernel_windows or ("18" if args.tiny else "21,23")).split(",")]:
            run("triton", w)  # warm-up (compiles once per tile)
            out, dt, peak = measure(lambda: run("triton", w), device)
            rows.append(
                (
                    f"sparse Triton kernel, tile {tile}, window 2^{w}",
                    dt,
                    peak,
                    out.shape[0],
                    torch.equal(out.cpu(), ref),
                )
            )
            print(rows[-1])
    K.PAIRS, K.BLOCK, K.PAIRS_INTERPRETED = defaults
    if not args.skip_dense:
        out, dt, peak = measure(
            lambda: dense_mesh_to_latent_index(mesh.vertices, mesh.faces, res, device=device), device
        )
        rows.append(("dense (original's method in torch)", dt, peak, out.shape[0], torch.equal(out.cpu(), ref)))
        print(rows[-1])
    if args.upstream is not None and device == "cuda":
        try:
            out, dt, peak = measure(
                lambda: upstream_mesh_to_latent_index(args.upstream, mesh.vertices, mesh.faces, res), device
            )
            diff = len(set(map(tuple, out.cpu().tolist())) ^ set(map(tuple, ref.tolist())))
            rows.append(("original CUDA kernel (udf_ext)", dt, peak, out.shape[0], f"{diff} cells differ"))
            print(rows[-1])
        except Exception as e:  # the extension may not build here
            print(f"original kernel not timed: {e}")

    table = [
        "| method | time (s) | peak extra GPU memory (MiB) | latent tokens | same cells as the reference |",
        "|---|---|---|---|---|",
    ]
    table += [
        f"| {n} | {t:.3f} | {p:.0f} | {k} | {'yes' if same is True else 'NO' if same is False else same} |"
        for n, t, p, k, same in rows
    ]
    print("\n".join(table))
    if not args.tiny and device == "cuda":
        gpu = torch.cuda.get_device_name().replace(" ", "-")
        out_path = REPO / "bench" / "results" / f"{datetime.date.today()}-{gpu}-voxelize.md"
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(
            f"# mesh → latent index, {len(mesh.faces)} faces at {res}³ ({gpu})\n\n"
            f"Command: `python {' '.join(sys.argv)}`\n\n" + "\n".join(table) + "\n"
        )
        print(f"wrote {out_path}")
    bad = [n for n, *_, same in rows if same is False]
    if bad:
        print("DISAGREE with the first reference row: " + "; ".join(bad), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
