"""Two candidate speed-ups measured before either is built (issue 17), each against today's path in one run:

1. The sparse DiT MLP's GELU in the first GEMM's epilogue (`torch._addmm_activation(..., use_gelu=True)`, the
   cuBLASLt GELU-bias epilogue, tanh approximation as the model's GELU) instead of Linear then GELU: the 1024
   stage's shape, 108,862 tokens x 1024 -> 4096 channels, fp16.
2. The refiner UNets' 3x3x3 convolutions in channels-last (NDHWC) memory instead of NCDHW: cuDNN transposes
   NCDHW fp16 inputs around its kernels. The 1024 sign refiner's levels: 256^3 x 8, 128^3 x 32, 64^3 x 128,
   32^3 x 512 channels (the 512 refiner's first level is 192^3 x 8).

Times are medians of CUDA-event timings; differences are reported against today's path.

    python bench/bench_fusions.py --out bench/results/fusions.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def timed(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def gelu_epilogue(lines: list[str]) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    n, c, hid = 108862, 1024, 4096
    x = torch.randn(n, c, device="cuda", generator=g).half()
    w = (torch.randn(hid, c, device="cuda", generator=g) / c**0.5).half()
    b = (0.1 * torch.randn(hid, device="cuda", generator=g)).half()

    def separate():
        return F.gelu(F.linear(x, w, b), approximate="tanh")

    def fused():
        return torch._addmm_activation(b, x, w.t(), use_gelu=True)

    ref, got = separate(), fused()
    d = (ref.float() - got.float()).abs()
    t_sep, t_fused = timed(separate), timed(fused)
    lines += [
        "## 1. GELU in the GEMM epilogue (108,862 x 1024 -> 4096, fp16)",
        "",
        "| path | ms | vs Linear + GELU |",
        "|---|---|---|",
        f"| Linear, then GELU (today) | {t_sep:.3f} | 1.00x |",
        f"| `_addmm_activation(use_gelu=True)` | {t_fused:.3f} | {t_sep / t_fused:.2f}x |",
        "",
        f"Elements that differ: {(d > 0).float().mean().item():.2%}; max abs difference {d.max().item():.3g} "
        f"(largest |value| {ref.float().abs().max().item():.3g}).",
        "",
    ]


def conv_channels_last(lines: list[str]) -> None:
    lines += [
        "## 2. Refiner 3x3x3 convolutions: NCDHW vs channels-last (fp16, cuDNN)",
        "",
        "| cube edge x channels | NCDHW ms | channels-last ms | speed-up | max abs diff |",
        "|---|---|---|---|---|",
    ]
    g = torch.Generator(device="cuda").manual_seed(1)
    for p, c in [(256, 8), (128, 32), (64, 128), (32, 512), (192, 8), (96, 32)]:
        x = torch.randn(1, c, p, p, p, device="cuda", generator=g).half()
        conv = torch.nn.Conv3d(c, c, 3, padding=1).cuda().half()
        xl = x.to(memory_format=torch.channels_last_3d)
        conv_l = torch.nn.Conv3d(c, c, 3, padding=1).cuda().half().to(memory_format=torch.channels_last_3d)
        conv_l.load_state_dict(conv.state_dict())
        with torch.no_grad():
            ref, got = conv(x), conv_l(xl)
            d = (ref.float() - got.float()).abs().max().item()
            t0, t1 = timed(lambda: conv(x), 5), timed(lambda: conv_l(xl), 5)
        lines.append(f"| {p}³ x {c} | {t0:.2f} | {t1:.2f} | {t0 / t1:.2f}x | {d:.3g} |")
        x = xl = ref = got = None  # free this size's tensors before the next
        torch.cuda.empty_cache()
    lines.append("")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    lines = [
        f"# Candidate fusions — {datetime.date.today()}, {torch.cuda.get_device_name()}",
        "",
        f"- command: `python bench/bench_fusions.py {' '.join(sys.argv[1:])}`; torch {torch.__version__}",
        "",
    ]
    gelu_epilogue(lines)
    torch.cuda.empty_cache()
    conv_channels_last(lines)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
