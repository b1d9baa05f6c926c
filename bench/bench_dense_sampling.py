"""Dense (coarse-stage) sampling: the eager DiT forward vs its CUDA-graph replay (s2core/cuda_graph.py).

The official v1.1 dense DiT in fp16 with deterministic weights, one image's 1,374 condition tokens, the official
50 steps with CFG 7 (100 forwards), as `pipeline.sample_dense` runs them. Both paths run in the same process,
alternating, and must give bitwise the same latent.

    python bench/bench_dense_sampling.py --out bench/results/dense_sampling.md
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

from s2core.config import official_v1_1  # noqa: E402
from s2core.cuda_graph import GraphedModel  # noqa: E402
from s2core.dense_dit import DenseDiT  # noqa: E402
from s2core.flow_sampler import sample_flow  # noqa: E402
from s2core.testing import deterministic_state_dict  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rel = official_v1_1()
    cfg = rel.dense_dit
    dit = DenseDiT(cfg, dtype=torch.float16)
    dit.load_state_dict(deterministic_state_dict(dit, 0), strict=True)
    dit = dit.set_dtype(torch.float16).cuda().eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    noise = torch.randn(1, cfg.in_channels, *[cfg.resolution] * 3, device="cuda", generator=g).half()
    cond = torch.randn(1, 1374, cfg.cond_channels, device="cuda", generator=g).half()
    uncond = torch.zeros_like(cond)
    kw = dict(num_steps=args.steps, shift=rel.dense_scheduler.shift, guidance=7.0)
    times = {"eager": [], "CUDA graph": []}
    out = {}
    with torch.inference_mode():
        for rep in range(args.reps + 1):  # the first round warms both paths (and captures the graphs)
            for name in times:
                model = dit if name == "eager" else GraphedModel(dit)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out[name] = sample_flow(model, noise, cond, uncond, **kw)
                torch.cuda.synchronize()
                if rep:
                    times[name].append(time.perf_counter() - t0)
    same = torch.equal(out["eager"], out["CUDA graph"])
    diff = (out["eager"].float() - out["CUDA graph"].float()).abs().max().item()
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        f"# Dense sampling: eager vs CUDA graph — {datetime.date.today()}, {torch.cuda.get_device_name()}",
        "",
        f"- command: `python bench/bench_dense_sampling.py {' '.join(sys.argv[1:])}`; torch {torch.__version__}",
        f"- official v1.1 dense DiT, fp16, deterministic weights; {args.steps} steps, CFG 7 (two forwards a step); "
        f"median of {args.reps} runs after one warm-up run each (a graphed run includes its capture)",
        "",
        "| path | s a run | ms a forward |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v:.3f} | {v / (2 * args.steps) * 1e3:.2f} |" for k, v in med.items()]
    lines += [
        "",
        f"CUDA graph / eager: **{med['eager'] / med['CUDA graph']:.2f}x** faster; latents bitwise equal: "
        f"**{same}** (max abs diff {diff:.3g}).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
