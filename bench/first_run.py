"""What a new install's first SSA forwards spend: Triton's setup, each kernel's compile + autotune, each config.

Run in a fresh process with an empty Triton cache (the state of a new ComfyUI install):

    TRITON_CACHE_DIR=$(mktemp -d) python bench/first_run.py --out first_run.md
    TRITON_CACHE_DIR=$(mktemp -d) python bench/first_run.py --sequential --out first_run_sequential.md

It times, with a CUDA sync around each: the first launch of a small Triton kernel (driver helpers, launcher
build, one compile), then one SSA forward of the sparse-512 stage's shape (27,126 tokens) and one of the
1024 stage's (108,862), each twice (first = compile + autotune, second = warm), per branch. The table of
autotune results gives every config's time at each size, so configs that never win can be dropped.
By default each forward's first call compiles every config of its three tuned kernels together first, as
the product does (`tuning.compile_ahead`); `--no-ahead` leaves each tuning round to compile its own configs in
parallel, and `--sequential` compiles them one by one: the side-by-side rows.

    TRITON_CACHE_DIR=$(mktemp -d) python bench/first_run.py --no-ahead --out first_run_rounds.md
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
sys.path.insert(0, str(REPO / "bench"))

from bench_ssa import CBS, HK, SBS, SHIFT, TOPK, WIN, H, make_inputs, ours_forward, surface_band  # noqa: E402

from kernels import layer_norm, ssa_compressed, ssa_selection, ssa_window, tuning  # noqa: E402
from s2core.ssa import SpatialSparseAttention, ssa_plan  # noqa: E402
from s2core.testing import deterministic_state_dict  # noqa: E402

BRANCHES = ("compress K,V", "gate", "compressed + top-k", "selection", "window")


def tuners():
    """Every autotuned SSA kernel (module attribute names ending in `_tuned`)."""
    out = {}
    for mod in (ssa_compressed, ssa_selection, ssa_window):
        for name, obj in vars(mod).items():
            if name.endswith("_tuned") and hasattr(obj, "configs"):
                out[f"{mod.__name__.split('.')[-1]}.{name}"] = obj
    return out


def one_forward(m, plan, inputs, ahead: bool):
    """Wall seconds of one SSA forward (with the product's compile-ahead dry run first, when `ahead`) and the
    CUDA-event seconds of its branches (the dry run's compiles are in the wall time only)."""
    marks = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if ahead:  # as SpatialSparseAttention.forward does (its key, less what is constant here)
        tuning.compile_ahead(
            ("first_run", tuning.tune_size(inputs[0].shape[0])), lambda: ours_forward(m, plan, *inputs)
        )
    ours_forward(m, plan, *inputs, marks=marks)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return wall, [marks[i].elapsed_time(marks[i + 1]) / 1e3 for i in range(len(marks) - 1)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--sequential", action="store_true", help="compile autotune configs one by one (implies --no-ahead)"
    )
    ap.add_argument(
        "--no-ahead", action="store_true", help="no compile-ahead dry run (each tuning round compiles its own configs)"
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    t_start = time.perf_counter()
    if args.sequential:
        tuning.PARALLEL_COMPILE = False
    lines = [
        f"# First SSA forwards in a fresh process — {datetime.date.today()}, {torch.cuda.get_device_name()}",
        "",
        f"- command: `{' '.join(sys.argv)}` (TRITON_CACHE_DIR empty at start); torch {torch.__version__}, "
        f"Triton {__import__('triton').__version__}",
        "",
    ]
    x = torch.randn(4, 1024, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    layer_norm.add_layer_norm(x, x.clone())
    torch.cuda.synchronize()
    lines += [f"First Triton launch (add_layer_norm, 4 rows): **{time.perf_counter() - t0:.2f} s**", ""]
    lines += ["| stage shape | call | wall s | " + " | ".join(BRANCHES) + " |", "|---" * (3 + len(BRANCHES)) + "|"]
    m = SpatialSparseAttention(1024, H, HK, CBS, SBS, TOPK, WIN, SHIFT, "v1")
    m.load_state_dict(deterministic_state_dict(m, 0), strict=True)
    m = m.cuda()
    for mod in m.modules():  # fp16 projections, fp32 intra-block PE (as bench_ssa.py)
        if isinstance(mod, torch.nn.Linear) or mod.__class__.__name__ == "SparseConv":
            mod.half()
    chosen = []
    for name, n, grid in (("512", 27126, 64), ("1024", 108862, 128)):
        coords = surface_band(n, grid)
        plan = ssa_plan(coords, 1, CBS, SBS, WIN, (0, SHIFT))
        inputs = make_inputs(coords, smooth=True)
        for call in ("first", "second"):
            with torch.no_grad():
                wall, parts = one_forward(m, plan, inputs, not args.no_ahead)
            lines.append(
                f"| {name}: {n} tokens | {call} | {wall:.2f} | " + " | ".join(f"{p:.3f}" for p in parts) + " |"
            )
        for tname, tuner in tuners().items():
            timings = getattr(tuner, "configs_timings", None) or {}
            for cfg, ms in sorted(timings.items(), key=lambda kv: kv[1][0] if isinstance(kv[1], list) else kv[1]):
                t = ms[0] if isinstance(ms, list) else ms
                chosen.append(f"| {name} | {tname} | {cfg} | {t:.3f} |")
            tuner.configs_timings = {}
    lines += ["", f"Whole script: {time.perf_counter() - t_start:.1f} s", ""]
    lines += [
        "## Autotune timings (ms, per config, best first)",
        "",
        "| size | kernel | config | ms |",
        "|---|---|---|---|",
    ]
    lines += chosen or ["| - | - | (cached results: no benchmarking ran) | - |"]
    text = "\n".join(lines) + "\n"
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
