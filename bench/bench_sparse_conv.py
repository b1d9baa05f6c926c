"""Benchmark: submanifold 3x3x3 sparse conv (s2core/sparse/conv.py) at the sizes the decoders meet.

Voxel sets are 3-voxel-thick spherical shells (like a latent structure), either as is ("shell") or
shrunk 4x and subdivided twice ("subdiv2": 8x8-voxel-ish dense blocks, like the decoder's fine levels),
sized to hit each target N; every row reports the kernel-map build once and the conv forward (map cached, as in a model).
Ours (one [rows, 27*Cin] GEMM per block) beside spconv's SubMConv3d on the same set and weights when spconv is
importable. The per-offset variant (27 GEMMs + index_add) was measured here too and removed: see
bench/results/sparse_conv.md.

    python bench/bench_sparse_conv.py              # GPU, fp16, writes bench/results/<date>-<gpu>-sparse_conv.md
    python bench/bench_sparse_conv.py --tiny       # CPU smoke run (small sizes, fp32), no results file
    python bench/bench_sparse_conv.py --kernel [--out FILE]
        # GPU: the implicit-GEMM kernel (kernels/sparse_conv.py) beside the gather + GEMM path on the decoders'
        # few-channel convolutions, each in the form the decoder runs it, and the kernel's block sizes
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
from kernels import sparse_conv as K  # noqa: E402
from s2core.sparse import SparseTensor  # noqa: E402
from s2core.sparse import conv as C  # noqa: E402
from s2core.sparse.conv import (  # noqa: E402
    build_kernel_map,
    kernel_map,
    sparse_conv3d,
    sparse_subdivide,
    sparse_subdivide_conv3d,
)


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


# The decoders' convolutions the kernel takes, in the form each runs in: (mode, Cin, Cout). Per subdivide block
# (SparseSubdivideBlock3d) the conv after the subdivision reads the parents' features ("copied"); the next
# block's first conv runs on that subdivided set ("derived"); "direct" is a set with its own searched map.
KERNEL_CASES = [("copied", 64, 64), ("derived", 64, 32), ("copied", 32, 32), ("direct", 32, 32)]
BLOCKS = [(32, 4), (64, 4), (64, 8), (128, 4)]


def kernel_rows(device, sizes, reps: int) -> list[str]:
    """The kernel beside the gather + GEMM path (`C.USE_KERNEL` off) through the decoder's own entry points,
    the largest difference between them, and the kernel's time at each block size (rows, warps)."""
    lines = [
        "| mode | output rows | Cin->Cout | gather + GEMM ms | kernel ms | speed-up | max abs diff | "
        + " | ".join(f"{bm}x{w} ms" for bm, w in BLOCKS)
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(BLOCKS),
    ]
    g = torch.Generator().manual_seed(0)
    for n_target in sizes:
        parents = voxel_set(n_target // 8, "subdiv2", device)
        for mode, cin, cout in KERNEL_CASES:
            kernel = (torch.randn(27, cin, cout, generator=g) / math.sqrt(27 * cin)).to(device, torch.float16)
            bias = (0.02 * torch.randn(cout, generator=g)).to(device, torch.float16)
            x = SparseTensor(torch.randn(len(parents), cin, generator=g).to(device, torch.float16), parents, 1)
            kernel_map(x)  # cached, as the decoder's coarser level has it
            if mode == "copied":
                run = partial(sparse_subdivide_conv3d, x, kernel, bias)
                args = (x.feats, kernel_map(x), "copied")
            else:
                sub = sparse_subdivide(x)
                sub = sub.replace(torch.randn(sub.feats.shape, generator=g).to(device, torch.float16))
                if mode == "direct":
                    sub = SparseTensor(sub.feats, sub.coords, 1)
                    kernel_map(sub)
                run = partial(sparse_conv3d, sub, kernel, bias)
                args = (sub.feats, kernel_map(sub) if mode == "direct" else kernel_map(x), mode)
            n_out = 8 * len(parents)
            C.USE_KERNEL = False
            slow = timeit(run, device, reps)
            ref = run()
            C.USE_KERNEL = True
            fast = timeit(run, device, reps)
            out = run()
            diff = (out.feats if mode == "copied" else out).float() - (ref.feats if mode == "copied" else ref).float()
            sweep = []
            for bm, w in BLOCKS:
                f = partial(K._sparse_conv3d_triton, *args[:2], kernel, bias, args[2], n_out, (bm, w))
                sweep.append(f"{timeit(f, device, reps):.2f}")
            row = (
                f"| {mode} | {n_out} | {cin}->{cout} | {slow:.2f} | {fast:.2f} | {slow / fast:.1f}x | "
                f"{diff.abs().max().item():.2e} | " + " | ".join(sweep) + " |"
            )
            print(row, flush=True)
            lines.append(row)
            del x, ref, out, diff
        torch.cuda.empty_cache()
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small CPU run (smoke test)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--kernel", action="store_true", help="the implicit-GEMM kernel vs gather + GEMM (GPU)")
    ap.add_argument("--out", type=Path, default=None, help="with --kernel: write the table here")
    args = ap.parse_args()
    if args.kernel:
        if not torch.cuda.is_available():
            ap.error("--kernel times the Triton kernel and needs a CUDA GPU")
        device = torch.device("cuda")
        head = [
            "# sparse conv kernel vs gather + GEMM "
            f"({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
            "",
            f"device: {torch.cuda.get_device_name()}, fp16, torch {torch.__version__}; "
            f"command: `python {' '.join(sys.argv)}`; default block {K.BLOCK_M}x{K.NUM_WARPS}",
            "",
        ]
        lines = head + kernel_rows(device, [1_000_000, 4_000_000], args.reps)
        print("\n".join(lines))
        if args.out:
            args.out.write_text("\n".join(lines) + "\n")
        return
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
