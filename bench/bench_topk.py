"""Launch shapes of the SSA top-k kernels (kernels/ssa_topk.py: the rounds kernel and the segmented one): tokens
a program holds x warps, at the score widths of the official stages, against today's shape and the PyTorch
reference, on one GPU.

The kernel reads one launch's score scratch [2 KV heads, 1 sample, rows, W] (the rows `ssa_compressed` puts in
its 64 MiB scratch) and writes each token's top-k blocks. W is the compressed-key count of a sample: ~560 at
the 512 stage (27k tokens), ~800 at 1024 (109k), 1,046 at 256k tokens (bench/results/ssa.md). Every shape's
output must equal today's bit for bit (same rounds, same ties), and today's must equal the reference.

    python bench/bench_topk.py --out bench/results/topk.md
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_fusions import timed  # noqa: E402  (median of CUDA-event timings after one warm-up)
from kernels import ssa_compressed, ssa_topk  # noqa: E402

WIDTHS = (560, 800, 1046)
SHAPES = [(r, w) for r in (1, 2, 4, 8, 16) for w in (1, 2, 4, 8)]


def one_width(width: int, topk: int, reps: int, lines: list[str]) -> None:
    h = 2
    rows = ssa_compressed.score_rows(h, 1, width)
    g = torch.Generator(device="cuda").manual_seed(width + topk)
    scores = torch.rand(h, 1, rows, width, device="cuda", generator=g)
    cu_q = torch.tensor([0, rows], dtype=torch.int32, device="cuda")
    cu_b = torch.tensor([0, width], dtype=torch.int32, device="cuda")

    def run(r=None, w=None, seg=False):
        out = torch.full((h, rows, topk), -7, dtype=torch.int32, device="cuda")
        return ssa_topk._block_topk_triton(scores, cu_q, cu_b, 0, topk, out, rows=r, num_warps=w, segmented=seg)

    today = run()  # the rounds kernel in its default shape
    ref = ssa_topk.block_topk_reference(scores, cu_q, cu_b, 0, topk, torch.full_like(today, -7))
    t_ref = timed(lambda: ssa_topk.block_topk_reference(scores, cu_q, cu_b, 0, topk, torch.empty_like(today)), reps)
    t_today = timed(run, reps)
    chunk = min(ssa_topk.TOPK_CHUNK, 1 << (width - 1).bit_length())
    lines += [
        f"### W = {width} blocks, top-k {topk}: {rows} tokens x {h} KV heads a launch (chunk {chunk})",
        "",
        f"Today's shape ({'{} tokens, {} warps'.format(*ssa_topk.launch_shape(chunk))}): **{t_today:.3f} ms**, equal to "
        f"the reference: {bool(torch.equal(today, ref))}; the reference (torch.sort): {t_ref:.3f} ms.",
        "",
        "| kernel | tokens a program | warps | scores a thread | ms | vs today | equal to today |",
        "|---|---|---|---|---|---|---|",
    ]
    for seg in (False, True):  # the rounds kernel, then the segmented one (ssa_topk.SEGMENTED)
        kernel = "segmented" if seg else "rounds"
        for r, w in SHAPES:
            per_thread = r * chunk // (32 * w)
            if not 8 <= per_thread <= 256:
                continue
            try:
                got = run(r, w, seg)
                t = timed(lambda r=r, w=w, seg=seg: run(r, w, seg), reps)
            except Exception as e:  # noqa: BLE001 - a shape out of resources is a row, not the end of the sweep
                lines.append(f"| {kernel} | {r} | {w} | {per_thread} | failed: {type(e).__name__} | | |")
                continue
            same = bool(torch.equal(got, today))
            lines.append(f"| {kernel} | {r} | {w} | {per_thread} | {t:.3f} | {t_today / t:.2f}x | {same} |")
            print(lines[-1], flush=True)
    lines.append("")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--topk", type=int, nargs="+", default=[8])
    args = ap.parse_args()
    import triton

    lines = [
        "# SSA top-k kernel: launch shapes",
        "",
        f"- date: {datetime.date.today()}; GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, "
        f"Triton {triton.__version__}",
        f"- command: `python bench/bench_topk.py {' '.join(sys.argv[1:])}`; uniform random scores; median of "
        f"{args.reps} CUDA-event timings of one launch",
        "",
    ]
    for topk in args.topk:
        for width in WIDTHS:
            one_width(width, topk, args.reps, lines)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
