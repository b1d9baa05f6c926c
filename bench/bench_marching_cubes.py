"""Benchmark: sparse marching cubes (s2core/mesh/marching_cubes.py) on a noisy sphere band.

    python bench/bench_marching_cubes.py                        # GPU if present: R = 512 and 1024, writes bench/results/
    python bench/bench_marching_cubes.py --res 128 --device cpu # CPU run, prints only

The field is the decoder's layout: a sphere SDF (radius 0.35 R, in voxel units / 4, about the decoded
scale) on a band of +-3 voxels, with Gaussian noise (--noise voxels, default 0.3)
so that a realistic share of cells is ambiguous. Each row: faces, vertices, the cells that got a centre
vertex, median wall time of --repeat runs (after one warm-up), peak device memory, and the mesh's edge
check (non-manifold / boundary edge counts, both must be 0; the script exits 1 otherwise).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from s2core.mesh.marching_cubes import marching_cubes_sparse  # noqa: E402


def noisy_sphere_band(res: int, noise: float, device, seed: int = 0):
    """(coords [N, 3] int64, sdf [N] fp32): the band |d| < 3, built slab by slab (inactive voxels read +1
    as in the original's dense grid, so the band's inner side gives a second, inner shell)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    coords, vals = [], []
    yz = torch.stack(torch.meshgrid(torch.arange(res), torch.arange(res), indexing="ij"), -1).float()
    c = (res - 1) / 2
    for x in range(res):  # one x slab at a time: no dense R^3 grid
        d = ((x - c) ** 2 + ((yz - c) ** 2).sum(-1)).sqrt() - 0.35 * res
        d = d + noise * torch.randn(d.shape, generator=g)
        keep = d.abs() < 3
        idx = keep.nonzero()
        coords.append(torch.cat([torch.full((len(idx), 1), x), idx], 1))
        vals.append(d[keep] / 4)
    return torch.cat(coords).to(device), torch.cat(vals).to(device)


def edge_check(faces: torch.Tensor) -> tuple[int, int]:
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(1).values
    _, n = torch.unique(e, dim=0, return_counts=True)
    return int((n > 2).sum()), int((n == 1).sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, nargs="*", default=None, help="grid sizes (default 512 1024 on GPU, 128 on CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    sizes = args.res or ([512, 1024] if device.type == "cuda" else [128])
    lines = [
        f"`python bench/bench_marching_cubes.py {' '.join(sys.argv[1:])}` on "
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads",
        "",
        "| R | active voxels | faces | vertices | centre vertices | median s | peak MiB | non-manifold / boundary |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ok = True
    for res in sizes:
        coords, sdf = noisy_sphere_band(res, args.noise, device)
        times = []
        for i in range(args.repeat + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            v, f = marching_cubes_sparse(coords, sdf, res, 0.0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        centres = int(((v == v.round()).sum(1) < 2).sum())
        bad = edge_check(f)
        ok &= bad == (0, 0)
        lines.append(
            f"| {res} | {len(coords)} | {len(f)} | {len(v)} | {centres} | {statistics.median(times):.3f} | "
            f"{peak:.0f} | {bad[0]} / {bad[1]} |"
        )
        del coords, sdf, v, f
    print("\n".join(lines))
    if device.type == "cuda":
        out = (
            REPO
            / "bench"
            / "results"
            / f"{datetime.date.today()}-{torch.cuda.get_device_name().replace(' ', '_')}-marching_cubes.md"
        )
        out.write_text("\n".join(lines) + "\n")
        print(f"wrote {out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
