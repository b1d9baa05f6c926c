"""Benchmark: interior removal (SPARSE.md §8) cube by cube from sparse data vs the original's dense grids.

    python bench/bench_refiner.py                 # GPU, official sizes (512: 192³ cubes; 1024: 256³ cubes)
    python bench/bench_refiner.py --dense         # also the original's dense method (re-stated here) for memory
    python bench/bench_refiner.py --tiny          # CPU smoke run: narrow UNet, 40³/64³ grids, prints only

Input: a synthetic decoded band (voxels within 2 of a sphere's surface, SDF values and random decoder
features), official-size fp16 refiners with deterministic weights. Reports time and peak GPU memory of
`remove_interior_512/1024` + `mesh_refined_field`; `--dense` runs a dense re-statement of the original's
`run()` (full grids, 27 cubes, blend/overwrite; no CPU marching cubes) for the memory comparison.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from s2core.config import RefinerConfig, ReleaseConfig  # noqa: E402
from s2core.refiner import (
    CubeGrid,
    VoxelRefiner,
    VoxelRefinerSign,
    cube_grid,  # noqa: E402
    mesh_refined_field,
    remove_interior_512,
    remove_interior_1024,
)
from s2core.sparse.tensor import SparseTensor  # noqa: E402
from s2core.testing import deterministic_state_dict  # noqa: E402


def sphere_band(res: int, radius: float, band: float, device, dtype):
    """Voxels within `band` of a sphere (built slab by slab, never a dense res³ tensor)."""
    coords, values = [], []
    c = (res - 1) / 2
    yz = torch.stack(
        torch.meshgrid(torch.arange(res, device=device), torch.arange(res, device=device), indexing="ij"), -1
    ).float()
    for x in range(res):
        d = ((yz - c).square().sum(-1) + (x - c) ** 2).sqrt() - radius
        idx = (d.abs() < band).nonzero()
        if idx.shape[0]:
            coords.append(torch.cat([torch.zeros_like(idx[:, :1]), torch.full_like(idx[:, :1], x), idx], 1))
            values.append(d[idx[:, 0], idx[:, 1]] / band)
    return SparseTensor(torch.cat(values)[:, None].to(dtype), torch.cat(coords).int(), 1)


@torch.no_grad()
def dense_512(model, sdf, feats, grid):
    """The original's run() for the 512 refiner, dense (grids of the whole volume), without meshing."""
    R, P, S, O = grid.resolution, grid.patch, grid.stride, grid.overlap
    dt, dev = model.dtype, sdf.device
    c = sdf.coords.long()
    sd = torch.ones(1, 1, R, R, R, dtype=dt, device=dev)
    sd[0, 0, c[:, 1], c[:, 2], c[:, 3]] = sdf.feats[:, 0].to(dt)
    fe = torch.zeros(1, feats.shape[1], R, R, R, dtype=dt, device=dev)
    fe[0, :, c[:, 1], c[:, 2], c[:, 3]] = feats.to(dt).T
    patches = [
        model(
            sd[..., S * i : S * i + P, S * j : S * j + P, S * k : S * k + P],
            fe[..., S * i : S * i + P, S * j : S * j + P, S * k : S * k + P],
        )
        for i in range(3)
        for j in range(3)
        for k in range(3)
    ]
    w = torch.linspace(0, 1, O, device=dev, dtype=dt)

    def join(a, b, cc, dim):
        shape = [1] * 5
        shape[dim] = -1
        ww = w.view(shape)
        n = lambda t, lo, hi: t.narrow(dim, lo, hi - lo)  # noqa: E731
        return torch.cat(
            [
                n(a, 0, S),
                n(a, S, P) * (1 - ww) + n(b, 0, O) * ww,
                n(b, O, S),
                n(b, S, P) * (1 - ww) + n(cc, 0, O) * ww,
                n(cc, O, P),
            ],
            dim,
        )

    lines = [join(*patches[3 * q : 3 * q + 3], 4) for q in range(9)]
    layers = [join(*lines[3 * q : 3 * q + 3], 3) for q in range(3)]
    return join(*layers, 2)


@torch.no_grad()
def dense_1024(model, sdf, grid):
    """The original's run() for the sign refiner, dense, without meshing."""
    from s2core.sparse.conv import sparse_downsample

    R, P, S = grid.resolution, grid.patch, grid.stride
    dt, dev = model.dtype, sdf.device
    c = sdf.coords.long()
    fine = torch.ones(1, 1, 2 * R, 2 * R, 2 * R, dtype=dt, device=dev)
    fine[0, 0, c[:, 1], c[:, 2], c[:, 3]] = sdf.feats[:, 0].to(dt)
    co = sparse_downsample(SparseTensor(sdf.feats.to(dt), sdf.coords, 1), 2)
    cc = co.coords.long()
    coarse = torch.ones(1, 1, R, R, R, dtype=dt, device=dev)
    coarse[0, 0, cc[:, 1], cc[:, 2], cc[:, 3]] = co.feats[:, 0]
    out = torch.ones_like(coarse)
    for i in range(3):
        for j in range(3):
            for k in range(3):
                sl = (..., slice(S * i, S * i + P), slice(S * j, S * j + P), slice(S * k, S * k + P))
                out[sl] = model(coarse[sl])
    out = out.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    field = fine.abs() * out
    field[0, 0, c[:, 1], c[:, 2], c[:, 3]] = fine[0, 0, c[:, 1], c[:, 2], c[:, 3]]
    return field


def dense_probe(model, sdf, feats, grid):
    """The refiner's output on the centre cube (for picking a level random weights actually cross)."""
    P, o = grid.patch, grid.stride
    c = sdf.coords.long()
    m = ((c[:, 1:] >= o) & (c[:, 1:] < o + P)).all(1)
    sd = torch.ones(1, 1, P, P, P, dtype=model.dtype, device=sdf.device)
    fe = torch.zeros(1, feats.shape[1], P, P, P, dtype=model.dtype, device=sdf.device)
    cm = c[m] - torch.tensor([0, o, o, o], device=c.device)
    sd[0, 0, cm[:, 1], cm[:, 2], cm[:, 3]] = sdf.feats[m, 0].to(model.dtype)
    fe[0, :, cm[:, 1], cm[:, 2], cm[:, 3]] = feats[m].to(model.dtype).T
    return model(sd, fe)


def measure(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else float("nan")
    return out, time.perf_counter() - t, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--dense", action="store_true", help="also run the dense re-statement of the original")
    ap.add_argument("--only", choices=["512", "1024"], default=None)
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if args.tiny:
        widths, g512, g1024, fp16 = (4, 8, 8, 8), CubeGrid(40, 16, 12), CubeGrid(32, 16, 8), False
    else:
        release = ReleaseConfig()
        widths, fp16 = (8, 32, 128, 512), True
        g512, g1024 = cube_grid(release.refiner, 512), cube_grid(release.refiner_1024, 1024)
    dtype = torch.float16 if fp16 else torch.float32
    rows = []
    if args.only in (None, "512"):
        model = VoxelRefiner(RefinerConfig(use_fp16=fp16), widths).eval()
        model.load_state_dict(deterministic_state_dict(model, 0))
        model.to(device)
        R = g512.resolution
        sdf = sphere_band(R, 0.35 * R, 2.0, device, dtype)
        feats = torch.randn(sdf.coords.shape[0], 32, device=device, dtype=dtype)
        level = 0.4  # 2 × mc_threshold; random weights may never reach it: then the centre cube's median
        with torch.no_grad():
            probe = dense_probe(model, sdf, feats, g512)
        if not (probe.min() < level < probe.max()):
            level = float(probe.float().median())
        field, dt, peak = measure(lambda: remove_interior_512(model, sdf, feats, level, g512), device)
        rows.append((f"512 refiner, sparse glue ({sdf.coords.shape[0]} voxels)", dt, peak, field.coords.shape[0]))
        try:  # a random network's field at its own median is noise; the mesher refuses a volume-filling one
            (mesh,), dtm, peakm = measure(lambda: mesh_refined_field(field), device)
            rows.append((f"512 mesh_refined_field ({mesh[1].shape[0]} faces)", dtm, peakm, field.coords.shape[0]))
        except ValueError as e:
            rows.append(
                (
                    f"512 mesh_refined_field: refused ({str(e).split(';')[0]})",
                    float("nan"),
                    float("nan"),
                    field.coords.shape[0],
                )
            )
        if args.dense:
            _, dtd, peakd = measure(lambda: dense_512(model, sdf, feats, g512), device)
            rows.append(("512 refiner, original's dense grids", dtd, peakd, R**3))
        del model
    if args.only in (None, "1024"):
        model = VoxelRefinerSign(RefinerConfig(patch_size=g1024.patch, sign=True, use_fp16=fp16), widths).eval()
        sd = deterministic_state_dict(model, 1)
        # random signs flip cell to cell and make a volume-filling "surface" (nothing a trained model does):
        # pin the sign network's output to "outside", as bench/e2e.py does; the surface is then the band's
        sd["conv_out.weight"].mul_(0.01)
        sd["conv_out.bias"].fill_(1.0)
        model.load_state_dict(sd)
        model.to(device)
        R2 = 2 * g1024.resolution
        sdf = sphere_band(R2, 0.35 * R2, 2.0, device, dtype)
        field, dt, peak = measure(lambda: remove_interior_1024(model, sdf, 0.2, g1024), device)
        rows.append((f"1024 sign refiner, sparse glue ({sdf.coords.shape[0]} voxels)", dt, peak, field.coords.shape[0]))
        (mesh,), dtm, peakm = measure(lambda: mesh_refined_field(field), device)
        rows.append((f"1024 mesh_refined_field ({mesh[1].shape[0]} faces)", dtm, peakm, field.coords.shape[0]))
        if args.dense:
            _, dtd, peakd = measure(lambda: dense_1024(model, sdf, g1024), device)
            rows.append(("1024 sign refiner, original's dense grids", dtd, peakd, R2**3))
    table = ["| step | time (s) | peak extra GPU memory (MiB) | field voxels kept |", "|---|---|---|---|"]
    table += [f"| {n} | {t:.2f} | {p:.0f} | {k} |" for n, t, p, k in rows]
    print("\n".join(table))
    if not args.tiny and device.type == "cuda":
        gpu = torch.cuda.get_device_name().replace(" ", "-")
        out = REPO / "bench" / "results" / f"{datetime.date.today()}-{gpu}-refiner.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            f"# Interior removal, official refiner sizes, synthetic sphere band ({gpu})\n\n"
            f"Command: `python {' '.join(sys.argv)}`\n\n" + "\n".join(table) + "\n"
        )
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
