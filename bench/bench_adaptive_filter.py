"""Benchmark: the refiner's adaptive filter (3 steps) as 27 PyTorch passes a step vs one Triton kernel a step.

    python bench/bench_adaptive_filter.py --out bench/results/adaptive_filter.md     # GPU
    python bench/bench_adaptive_filter.py --sizes 8x192,1x192,8x256 --tiles 256,1024,2048 --out FILE

One `adaptive_filter` of the 512 refiner (`s2core/refiner/remesh_512.py`) without the weight head: x [1, C, P³]
fp16 and L1-normalised tap weights w [1, 27, P³] fp16, three steps. C = 8 (the first two filters of a cube) and
C = 1 (the third), P = 192 (the 512 refiner's cube edge). "PyTorch, 27 passes" is the loop the kernel replaced,
restated here; the Triton rows are `kernels/adaptive_filter.py` at its default tile and, with `--tiles`, other
tile sizes (elements a program accumulates) for choosing the default. Every Triton output is checked bitwise
against the PyTorch one (the run stops if one differs); the table also gives the max abs difference.

Times: median of `--reps` runs after 3 warm-up runs, CUDA events around the three steps.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kernels import adaptive_filter as AF  # noqa: E402

MiB = 2**20


def pytorch_27_passes(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The filter as the refiner ran it before the kernel (and as the original writes it): 27 passes a step."""
    P0, P1, P2 = x.shape[-3:]
    for _ in range(3):
        xp = F.pad(x, (1, 1, 1, 1, 1, 1))
        out = torch.zeros_like(x)
        for t in range(27):
            a, b, c = t // 9, t // 3 % 3, t % 3
            out = out + xp[:, :, a : a + P0, b : b + P1, c : c + P2] * w[:, t : t + 1]
        x = out
    return x


def triton_steps(x: torch.Tensor, w: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    for _ in range(3):
        x = AF.adaptive_filter_step(x, w) if tile is None else AF._adaptive_filter_triton(x, w, tile=tile)
    return x


def timed(fn, reps: int) -> tuple[float, float]:
    """(median ms, peak MiB allocated above what was allocated before) of fn()."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / MiB


def bench_cube(C: int, P: int, tiles: list[int], reps: int, g: torch.Generator) -> list[tuple]:
    """Rows (x, variant, ms, speed-up, extra MiB, max abs diff) for x [1, C, P³]; asserts bitwise equality."""
    dev = g.device
    x = torch.randn(1, C, P, P, P, device=dev, generator=g).half()
    w = F.normalize(torch.randn(1, 27, P, P, P, device=dev, generator=g).half(), p=1, dim=1).contiguous()
    want = pytorch_27_passes(x, w)
    variants = [("PyTorch, 27 passes", lambda: pytorch_27_passes(x, w))]
    variants.append((f"Triton, one pass (tile {AF.TILE})", lambda: triton_steps(x, w)))
    variants += [(f"Triton, tile {t}", lambda t=t: triton_steps(x, w, t)) for t in tiles if t != AF.TILE]
    rows, base_ms = [], None
    for name, fn in variants:
        got = fn()
        diff = (got.float() - want.float()).abs().max().item()
        same = torch.equal(got.view(torch.int16), want.view(torch.int16))
        print(f"[1, {C}, {P}³] {name}: max abs diff {diff:.3g}, bitwise equal: {same}", flush=True)
        assert same, f"{name} differs from the PyTorch loop at [1, {C}, {P}³] (max abs {diff:.3g})"
        del got
        ms, mib = timed(fn, reps)
        base_ms = ms if base_ms is None else base_ms
        rows.append((f"[1, {C}, {P}³]", name, ms, base_ms / ms, mib, diff))
        print(f"  {ms:.3f} ms, {base_ms / ms:.1f}x, +{mib:.0f} MiB", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="8x192,1x192", help="comma-separated CxP cubes, e.g. 8x192,1x192,8x256")
    ap.add_argument("--tiles", default="", help="extra kernel tile sizes to time, e.g. 1024,2048,8192")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="markdown file to write")
    args = ap.parse_args()
    import triton

    dev = torch.device("cuda")
    tiles = [int(t) for t in args.tiles.split(",") if t]
    g = torch.Generator(device=dev).manual_seed(args.seed)
    rows = []
    for size in args.sizes.split(","):
        C, P = (int(v) for v in size.lower().split("x"))
        rows += bench_cube(C, P, tiles, args.reps, g)
        torch.cuda.empty_cache()
    lines = [
        f"# Adaptive filter (3 steps): PyTorch 27 passes vs Triton ({datetime.date.today().isoformat()})",
        "",
        f"- GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, Triton {triton.__version__}",
        f"- command: `python bench/bench_adaptive_filter.py {' '.join(sys.argv[1:])}`",
        f"- fp16, median of {args.reps} runs of one whole `adaptive_filter` (3 steps, weight head excluded); "
        "every Triton output bitwise equal to the PyTorch loop's",
        "",
        "| x | variant | ms | speed-up | extra MiB | max abs diff |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {s} | {n} | {ms:.3f} | {sp:.1f}× | {mib:.0f} | {d:.3g} |" for s, n, ms, sp, mib, d in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)


if __name__ == "__main__":
    main()
