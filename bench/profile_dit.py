"""Where a sparse DiT forward spends its time, and what batching the two CFG halves would save (issue 17).

One sparse DiT (official v1.1 config, fp16, deterministic weights) on the bumpy icosphere's structure, as
bench/e2e.py builds it (109k tokens at 1024, 27k at 512). For each stage:

- the sampling step as it runs today: two forwards (cond, then uncond), CUDA-event median of `--reps`;
- the same step as ONE forward of batch 2 (the structure twice, conditions stacked), with its peak memory
  and the largest difference from the two separate forwards (fp16 GEMM rounding only: same math);
- a torch.profiler table of one batch-1 forward: CUDA time per kernel family and the top kernels.

    python bench/profile_dit.py                 # GPU; writes bench/results/<date>-<gpu>-profile_dit.md
    python bench/profile_dit.py --tiny          # CPU smoke run (tiny config), prints only
"""

from __future__ import annotations

import argparse
import collections
import datetime
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from e2e import bumpy_sphere  # noqa: E402

from s2core import loading, results  # noqa: E402
from s2core.mesh.voxelize import mesh_to_latent_index  # noqa: E402
from s2core.testing import deterministic_state_dict  # noqa: E402

GiB = 2**30
FAMILIES = (  # (family, substrings of the CUDA kernel name), first match wins
    ("SSA compressed attention + top-k", ("_cmp_attn", "_topk_kernel")),
    ("SSA selection attention", ("_selection",)),
    ("SSA window attention", ("_window",)),
    ("SSA compression (K,V pooling)", ("_compress", "scatter", "segment", "index_add")),
    ("fused residual + LayerNorm", ("_add_ln",)),
    ("cross attention (SDPA)", ("flash", "fmha", "attention", "efficient")),
    ("GEMM (Linear layers)", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90", "sm80")),
)


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "elementwise and other"


def structure_for(stage: loading.SparseStage, config, v, f, device, batch: int) -> results.Structure:
    cfg = getattr(config, stage.dit)
    if stage.resolution == 1024:
        idx = mesh_to_latent_index(v, f, resolution=cfg.resolution * 8, normalize=True, device=device)
    else:
        idx = mesh_to_latent_index(v, f, resolution=cfg.resolution * 8, device=device)
    idx = idx.to(torch.int32).cpu()
    parts = []
    for b in range(batch):  # the same shape `batch` times: the CFG halves share one structure
        p = idx.clone()
        p[:, 0] = b
        parts.append(p)
    return results.make_structure(torch.cat(parts), stage.resolution, cfg.resolution, cfg.selection_block_size)


def timed(device, fn, reps: int) -> float:
    """Median seconds of fn() over reps (CUDA events on a GPU)."""
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return sorted(out)[len(out) // 2]


def peak_of(device, fn) -> float:
    if device.type != "cuda":
        fn()
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GiB


def profile_table(device, fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    per_kernel = collections.Counter()
    calls = collections.Counter()
    for e in prof.events():
        if e.device_type.name == "CUDA":
            per_kernel[e.name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            calls[e.name] += 1
    total = sum(per_kernel.values()) or 1.0
    fams = collections.Counter()
    for name, us in per_kernel.items():
        fams[family(name)] += us
    rows = ["| kernel family | GPU ms | share |", "|---|---|---|"]
    rows += [f"| {k} | {us / 1e3:.2f} | {100 * us / total:.0f}% |" for k, us in fams.most_common()]
    rows += [f"| **all kernels** | **{total / 1e3:.2f}** | |", "", "| top kernels | calls | GPU ms |", "|---|---|---|"]
    rows += [f"| `{name[:90]}` | {calls[name]} | {us / 1e3:.2f} |" for name, us in per_kernel.most_common(15)]
    return rows


def run_stage(stage, config, v, f, device, dtype, reps, tiny) -> list[str]:
    cfg = getattr(config, stage.dit)
    dit = loading.build_part(stage.dit, config, dtype)
    dit.load_state_dict(deterministic_state_dict(dit, seed=3), strict=True)
    dit = dit.to(device)
    s1, s2 = (structure_for(stage, config, v, f, device, b).to(device) for b in (1, 2))
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(s1.num_tokens, cfg.in_channels, generator=g).to(device, dtype)
    cond = torch.randn(1, 1374 if not tiny else 16, cfg.cond_channels, generator=g).to(device, dtype)
    uncond = torch.zeros_like(cond)
    t = torch.tensor([500.0], device=device, dtype=dtype)
    dit.plan(s1.sparse(x))
    dit.plan(s2.sparse(torch.cat([x, x])))

    def two():
        a = dit(s1.sparse(x), t, cond).feats
        b = dit(s1.sparse(x), t, uncond).feats
        return a, b

    def one():
        return dit(s2.sparse(torch.cat([x, x])), t.expand(2), torch.cat([cond, uncond])).feats.chunk(2)

    with torch.inference_mode():
        for _ in range(2):  # warm-up: compile and autotune outside the timings
            two_out, one_out = two(), one()
        diff = max(float((p.float() - q.float()).abs().max()) for p, q in zip(two_out, one_out))
        scale = max(float(p.float().abs().max()) for p in two_out)
        t_two, t_one = timed(device, two, reps), timed(device, one, reps)
        m_two, m_one = peak_of(device, two), peak_of(device, one)
        prof = []
        if device.type == "cuda":
            try:
                prof = profile_table(device, lambda: dit(s1.sparse(x), t, cond))
            except Exception as e:  # the profiler's event API moves between torch versions: keep the timings
                prof = [f"(profiler failed: {type(e).__name__}: {e})"]
    dit.to("cpu")  # free the GPU for the next stage
    rows = [
        f"## {stage.resolution} stage: {s1.num_tokens:,} tokens, {cfg.num_blocks} blocks",
        "",
        "| one sampling step (CFG 7) | ms | peak beyond weights GiB |",
        "|---|---|---|",
        f"| two forwards, batch 1 (today) | {1e3 * t_two:.1f} | {m_two:.2f} |",
        f"| one forward, batch 2 | {1e3 * t_one:.1f} | {m_one:.2f} |",
        "",
        f"Batch 2 / two forwards: **{t_one / t_two:.2f}×** the time; largest difference of the velocities "
        f"{diff:.2e} (largest velocity {scale:.2f}).",
        "",
    ]
    if prof:
        rows += ["One batch-1 forward under torch.profiler (CUDA kernel time):", "", *prof, ""]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU (smoke run, prints only)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--stages", default="1024,512")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.tiny else torch.float16
    config = loading.config_for("tiny-random" if args.tiny else "v1.1")
    v, f = bumpy_sphere(3 if args.tiny else 8)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    lines = [
        "# Sparse DiT forward: where the time goes, and batched CFG",
        "",
        f"- date: {datetime.date.today()}; GPU: {gpu}; torch {torch.__version__}",
        f"- command: `python bench/profile_dit.py{''.join(' ' + a for a in sys.argv[1:])}`",
        "- official v1.1 sparse DiTs, fp16, deterministic weights; bumpy icosphere structure (bench/e2e.py)",
        "",
    ]
    for res in args.stages.split(","):
        stage = loading.sparse_stage(int(res))
        rows = run_stage(stage, config, v, f, device, dtype, 2 if args.tiny else args.reps, args.tiny)
        lines += rows
        print("\n".join(rows), flush=True)
    text = "\n".join(lines) + "\n"
    if device.type == "cuda":
        out = args.out or REPO / "bench" / "results" / f"{datetime.date.today()}-{gpu.replace(' ', '_')}-profile_dit.md"
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
