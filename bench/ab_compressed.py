"""Variants of the compressed-attention kernel side by side: time, first call, and whether they pick the same blocks.

A variant is another copy of kernels/ssa_compressed.py, usually a branch's (`git show
BRANCH:kernels/ssa_compressed.py > /tmp/two.py`). It is loaded as a module of this tree's `kernels` package,
so its relative imports find the same `_common` and `tuning`. This tree's kernel is always the first
column and the baseline.

Inputs are bench_ssa.py's (the block-sorted surface band, smooth in space unless `--random-inputs`, its
compressed keys built by the official SSA module with deterministic weights). Each variant is called as the
sparse DiT calls it: gated, no lse. Reported per (tokens, top-k, variant):
- ms: the median of CUDA-event timings of whole calls (every launch of a split kernel included);
- first s: the wall time of the first call in this process (compile and autotune, less what the disk cache
  already held);
- same blocks: the share of (KV head, token) rows whose top-k equals the baseline's, and max |Δo| of the gated
  output and max |Δlse| (from a second, ungated call that returns the lse) against the baseline.

A variant can only replace the kernel if it picks the baseline's blocks (same scores, same tie rule) and is
faster on every row; the last line says whether that holds.

    git show ssa-scores-then-topk:kernels/ssa_compressed.py > /tmp/two.py
    python bench/ab_compressed.py --variant two=/tmp/two.py                       # GPU
    TRITON_INTERPRET=1 python bench/ab_compressed.py --variant two=/tmp/two.py --tiny   # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import bench_ssa as S  # noqa: E402
from profile_dit import timed  # noqa: E402

from kernels import ssa_compressed  # noqa: E402
from s2core.ssa import ssa_plan  # noqa: E402


def load_variant(name: str, path: Path):
    """The file at `path` as module `kernels._ab_<name>` (a sibling of ssa_compressed, for its relative imports)."""
    spec = importlib.util.spec_from_file_location(f"kernels._ab_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def compressed_inputs(n: int, smooth: bool, device: torch.device):
    """bench_ssa's q and gate input for n tokens, with the compressed keys/values and plan the SSA module builds."""
    m = S.ssa_module(device)
    coords = S.surface_band(n, device=device)
    q, k, v, x = S.make_inputs(coords, smooth=smooth)
    plan = ssa_plan(coords, 1, S.CBS, S.SBS, S.WIN, (0, S.SHIFT))
    with torch.no_grad():
        ck, cv = S.compress_kv(m, plan, k, v)
        gate = torch.sigmoid(m.gate(x))[:, 0]
    return q, ck, cv, gate, plan


def median_ms(fn, reps: int, device: torch.device) -> float:
    """Median ms of fn() after two warm-up calls (none on the CPU, where an interpreted call takes seconds)."""
    for _ in range(2 if device.type == "cuda" else 0):
        fn()
    return 1e3 * timed(device, fn, reps)


def compare(variants: dict, n: int, topks, smooth: bool, reps: int, device: torch.device) -> list[dict]:
    cuda = device.type == "cuda"
    backend = "auto" if cuda else "triton"  # on the CPU: the Triton interpreter (TRITON_INTERPRET=1)
    q, ck, cv, gate, plan = compressed_inputs(n, smooth, device)
    rows = []
    for topk in topks:
        base = None
        for name, module in variants.items():

            def call(module=module, topk=topk, **kw):
                return module.ssa_compressed_attention(
                    q, ck, cv, plan.cu_seqlens, plan.cu_cells, plan.max_seqlen, topk, plan.block_keys,
                    plan.cu_blocks, backend=backend, **kw,
                )  # fmt: skip

            def gated(call=call):
                return call(gate=gate, return_lse=False)

            t0 = time.perf_counter()
            gated()
            if cuda:
                torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            ms = median_ms(gated, reps, device)
            o, _, bidx = gated()
            _, lse, _ = call()
            tuned = getattr(module, "_cmp_attn_topk_tuned", None)
            row = dict(n=n, m=ck.shape[0], topk=topk, name=name, ms=ms, first_s=first_s, o=o, bidx=bidx, lse=lse)
            row["config"] = str(getattr(tuned, "best_config", "")) if cuda else "interpreter"
            base = base or row
            row["same"] = (bidx == base["bidx"]).all(-1).float().mean().item()
            row["do"] = (o.float() - base["o"].float()).abs().max().item()
            row["dlse"] = (lse - base["lse"]).abs().max().item()
            row["speedup"] = base["ms"] / ms
            rows.append(row)
        for row in rows[-len(variants) :]:
            del row["o"], row["bidx"], row["lse"]  # keep only the figures: the tensors are large at 256k
    if cuda:
        torch.cuda.empty_cache()
    return rows


def verdict(rows: list[dict], on_gpu: bool = True) -> str:
    """One line per variant: same blocks as main on every row, and (on a GPU) faster on every row."""
    others = [r for r in rows if r["name"] != "main"]
    if not others:
        return "no variant given"
    lines = []
    for name in dict.fromkeys(r["name"] for r in others):
        mine = [r for r in others if r["name"] == name]
        same = all(r["same"] == 1.0 for r in mine)
        faster = all(r["speedup"] > 1.0 for r in mine)
        worst = min(r["speedup"] for r in mine)
        speed = (
            f"{'faster on every row' if faster else 'not faster on every row'} (slowest row {worst:.2f}x main)"
            if on_gpu
            else "no speed verdict from the CPU interpreter"
        )
        blocks = "same blocks as main on every row" if same else "DIFFERENT blocks from main on some rows"
        lines.append(f"{name}: {blocks}; {speed}")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    out = [
        "| tokens | M | top-k | variant | ms | × main | first call s | rows with main's blocks | max abs Δo | max abs Δlse | config |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['n']} | {r['m']} | {r['topk']} | {r['name']} | {r['ms']:.2f} | {r['speedup']:.2f}x | "
            f"{r['first_s']:.1f} | {100 * r['same']:.2f}% | {r['do']:.1e} | {r['dlse']:.1e} | {r['config']} |"
        )
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", action="append", default=[], help="NAME=PATH of a copy of ssa_compressed.py")
    ap.add_argument("--tokens", default="65536,109000,262144")
    ap.add_argument("--topk", default="8,32", help="top-k values (the official config uses 8)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--random-inputs", action="store_true", help="i.i.d. inputs instead of spatially smooth ones")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run (TRITON_INTERPRET=1): 40 tokens, top-k 8")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = ap.parse_args()

    variants = {"main": ssa_compressed}
    for spec in args.variant:
        name, sep, path = spec.partition("=")
        if not sep or not name.isidentifier() or name == "main" or not Path(path).is_file():
            sys.exit(
                f"--variant {spec!r}: give NAME=PATH with NAME a Python identifier other than main and PATH a file."
            )
        variants[name] = load_variant(name, Path(path))
    if args.tiny and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--tiny runs the Triton kernels on the CPU: set TRITON_INTERPRET=1 first.")
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "No CUDA GPU here: run on the GPU machine, or pass --tiny (with TRITON_INTERPRET=1) for a CPU smoke run."
        )
    tokens = [40] if args.tiny else [int(t) for t in args.tokens.split(",")]
    topks = [8] if args.tiny else [int(k) for k in args.topk.split(",")]
    reps = 1 if args.tiny else args.reps

    rows = []
    for n in tokens:
        rows += compare(variants, n, topks, not args.random_inputs, reps, device)
        print(table(rows[-len(topks) * len(variants) :]).split("\n", 2)[-1], flush=True)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (interpreter: times not meaningful)"
    head = (
        f"date {datetime.date.today()}; {gpu}; torch {torch.__version__}; "
        f"{'i.i.d.' if args.random_inputs else 'smooth'} inputs; command: python bench/ab_compressed.py "
        + " ".join(sys.argv[1:])
    )
    report = f"{head}\n\n{table(rows)}\n\n{verdict(rows, on_gpu=device.type == 'cuda')}\n"
    print("\n" + report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
