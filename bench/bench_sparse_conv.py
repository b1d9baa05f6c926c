"""Benchmark: submanifold 3x3x3 sparse conv (s2core/sparse/conv.py) at the sizes the decoders meet.

Voxel sets are 3-voxel-thick spherical shells (like a latent structure), either as is ("shell") or
shrunk 4x and subdivided twice ("subdiv2": 8x8-voxel-ish dense blocks, like the decoder's fine levels),
sized to hit each target N; every row reports the kernel-map build once and the conv forward (map cached, as in a model).
Ours (one [rows, 27*Cin] GEMM per block) beside spconv's SubMConv3d on the same set and weights when spconv is
importable. The per-offset variant (27 GEMMs + index_add) was measured here too and removed: see
bench/results/sparse_conv.md.

    python bench/bench_sparse_conv.py              # GPU, fp16, writes bench/results/<date>-<gpu>-sparse_conv.md
    python bench/bench_sparse_conv.py --tiny       # CPU smoke run (small sizes, fp32), no results file
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from s2core.sparse import SparseTensor  # noqa: E402
from s2core.sparse.conv import build_kernel_map, sparse_conv3d, sparse_subdivide  # noqa: E402


def shell_coords(n_target: int, device) -> torch.Tensor:
    """[~n_target, 4] int32 coords of a 3-voxel-thick sphere shell (batch 0)."""
    radius = max(4, int(math.sqrt(n_target / (4 * math.pi * 3))))
    r = 2 * radius + 4
    ax = torch.arange(r, device=device, dtype=torch.float32) - r / 2
    rows = []
    for x in range(r):  # a slab at a time: no dense r^3 grid
        d = (ax[x] ** 2 + ax[:, None] ** 2 + ax[None, :] ** 2).sqrt()
        yz = torch.nonzero((d - radius).abs() < 1.5)
        rows.append(torch.cat([torch.full((len(yz), 1), x, device=device), yz], 1))
    xyz = torch.cat(rows)
    return torch.cat([torch.zeros(len(xyz), 1, device=device, dtype=xyz.dtype), xyz], 1).int()


def voxel_set(n_target: int, kind: str, device) -> torch.Tensor:
    if kind == "shell":
        return shell_coords(n_target, device)
    coords = shell_coords(max(64, n_target // 64), device)
    x = SparseTensor(torch.zeros(len(coords), 1, device=device), coords, 1)
    return sparse_subdivide(sparse_subdivide(x)).coords


def timeit(fn, device, reps: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def spconv_runner(coords, feats, kernel, bias):
    try:
        import spconv.pytorch as spconv
    except Exception as e:  # not installed: the row says so
        return None, f"spconv unavailable ({type(e).__name__})"
    cin, cout = kernel.shape[1], kernel.shape[2]
    conv = spconv.SubMConv3d(cin, cout, 3, bias=True, indice_key="b").to(feats.device, feats.dtype)
    with torch.no_grad():  # torchsparse layout -> spconv [Cout, kx, ky, kz, Cin] (ORIGINAL_ON_CPU.md)
        conv.weight.copy_(kernel.reshape(3, 3, 3, cin, cout).permute(4, 2, 1, 0, 3))
        conv.bias.copy_(bias)
    shape = (coords[:, 1:].max(0).values + 2).tolist()

    def run():
        x = spconv.SparseConvTensor(feats, coords, shape, 1)
        return conv(x).features

    return run, "spconv SubMConv3d"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small CPU run (smoke test)")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.tiny:
        sizes, chans, reps = [2000], [(16, 16), (32, 8)], 2
    else:
        sizes = [50_000, 200_000, 1_000_000]
        chans = [(512, 128), (128, 128), (128, 64), (64, 64), (64, 32), (32, 32), (256, 256)]
        reps = args.reps
    lines = [
        f"# sparse conv 3x3x3 benchmark ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, dtype {dtype}, "
        f"torch {torch.__version__}",
        f"command: `python {' '.join(sys.argv)}`",
        "",
        "| set | N | Cin->Cout | avg nbrs | kmap ms | gather ms | spconv ms | gather TFLOP/s (dense 27-tap) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines))
    g = torch.Generator(device="cpu").manual_seed(0)
    for n_target, kind in [(n, k) for n in sizes for k in ("shell", "subdiv2")]:
        coords = voxel_set(n_target, kind, device)
        n = coords.shape[0]
        kmap_ms = timeit(lambda: build_kernel_map(coords), device, reps)
        nbrs = (build_kernel_map(coords) < n).sum(1).float().mean().item()
        for cin, cout in chans:
            feats = torch.randn(n, cin, generator=g).to(device, dtype)
            kernel = (torch.randn(27, cin, cout, generator=g) / math.sqrt(27 * cin)).to(device, dtype)
            bias = torch.randn(cout, generator=g).to(device, dtype) * 0.02
            x = SparseTensor(feats, coords, 1)
            gather_ms = timeit(partial(sparse_conv3d, x, kernel, bias), device, reps)
            run, _ = spconv_runner(coords, feats, kernel, bias)
            sp_ms = f"{timeit(run, device, reps):.2f}" if run is not None else "n/a"
            tflops = 2 * n * 27 * cin * cout / (gather_ms * 1e-3) / 1e12
            row = f"| {kind} | {n} | {cin}->{cout} | {nbrs:.1f} | {kmap_ms:.2f} | {gather_ms:.2f} | {sp_ms} | {tflops:.1f} |"
            print(row, flush=True)
            lines.append(row)
            del feats, kernel, x
        if device.type == "cuda":
            torch.cuda.empty_cache()  # between problem sizes only, so each size starts clean
    if not args.tiny:
        out = Path(__file__).resolve().parent / "results"
        gpu = torch.cuda.get_device_name().replace(" ", "-") if device.type == "cuda" else "cpu"
        path = out / f"{datetime.date.today()}-{gpu}-sparse_conv.md"
        path.write_text("\n".join(lines) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
