"""The 1024 chain without Triton beside the Triton path, same run: per-stage time and peak memory.

Without Triton (Windows without triton-windows) every kernel runs its PyTorch reference on the GPU, chunked so
that nothing holds an [N, N] matrix or a dense 1024³ grid. This runs bench/e2e.py's chain (v1.1 configs,
deterministic weights, fp16, the bumpy icosphere's structure at 512 and 1024, the default placement: one
stage's weights on the GPU at a time) twice, each in its own subprocess so that its memory statistics and
its imports are its own: first normally, then with `import triton` blocked (tools/without_triton.py).

    python bench/no_triton.py                              # steps 50,10,5; writes bench/results/no_triton.md
    python bench/no_triton.py --steps 50,30,15 --budget-s 560   # the official step counts, if time allows
    python bench/no_triton.py --tiny                       # CPU smoke run (tiny config), prints only

Sampling time is proportional to the step count (the per-step column compares runs with other counts); the
memory peaks do not depend on it. --budget-s bounds the whole command: a run still going when the budget is
spent is stopped, and the table shows the stages it finished (each is saved as it ends).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
T0 = time.perf_counter()
TARGET_GIB = 12.0  # the fallback's peak-memory target at 1024 (issue 20)


def child(args) -> None:
    """One chain in this process; `args.mode` "no-triton" blocks the import first. Rows go to args.json."""
    sys.path.insert(0, str(REPO))
    if args.mode == "no-triton":
        from tools.without_triton import block_triton

        block_triton()
    sys.path.insert(0, str(REPO / "bench"))
    import e2e  # noqa: E402  (bench/e2e.py: mesh, models, timer)
    import torch

    from kernels import _common
    from s2core import pipeline as P
    from s2core import results
    from s2core.mesh.voxelize import mesh_to_latent_index

    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger(_common.__name__).addHandler(handler)
    device = torch.device("cpu" if args.tiny else "cuda")
    v, f = e2e.bumpy_sphere(args.subdivisions or (3 if args.tiny else 8))
    models = e2e.build_models(
        "tiny-random" if args.tiny else "v1.1", device, torch.float32 if args.tiny else torch.float16, offload=None
    )
    steps = [int(s) for s in args.steps.split(",")]
    res512 = models.config.sparse_dit_512.resolution * 8
    out = {
        "mode": args.mode,
        "triton": _common.triton.__version__ if _common.HAS_TRITON else None,
        "torch": torch.__version__,
        "rows": [],
        "info": {},
        "complete": False,
    }
    timer = e2e.Timer(device)

    def run(name, fn, note=""):
        r = timer.run(name, fn, note)
        out["rows"] = timer.rows
        out["fallback_warnings"] = warnings
        Path(args.json).write_text(json.dumps(out))
        return r

    img = torch.ones(1, 256, 256, 4)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 256), torch.linspace(-1, 1, 256), indexing="ij")
    disk = (xx**2 + yy**2 < 0.6).float()
    img[0, ..., 0], img[0, ..., 1], img[0, ..., 2] = 0.8 * disk, 0.3 + 0.2 * yy, 0.5 * disk
    with torch.inference_mode():
        cond = run("image encode", lambda: P.encode_image(models, img[..., :3], disk[None]))
        dense = run("dense sampling", lambda: P.sample_dense(models, cond, 0, steps[0]), f"{steps[0]} steps")
        run("dense decode", lambda: P.decode_dense(models, dense))
        idx512 = mesh_to_latent_index(v, f, resolution=res512, device=device).to(torch.int32).cpu()
        s512 = results.make_structure(idx512, 512, res512 // 8, models.config.sparse_dit_512.selection_block_size)
        out["info"]["tokens_512"] = s512.num_tokens
        lat = run(
            "sparse-512 sampling",
            lambda: P.sample_sparse(models, cond, s512, 0, steps[1]),
            f"{steps[1]} steps, {s512.num_tokens} tokens",
        )
        run("sparse-512 decode + refiner", lambda: e2e.decode(models, lat))
        s1024 = run(
            "mesh -> 1024 structure", lambda: P.mesh_to_structure(models, results.Mesh.from_list([(v, f)], 512, {}))
        )
        out["info"]["tokens_1024"] = s1024.num_tokens
        lat = run(
            "sparse-1024 sampling",
            lambda: P.sample_sparse(models, cond, s1024, 0, steps[2]),
            f"{steps[2]} steps, {s1024.num_tokens} tokens",
        )
        mesh = run("sparse-1024 decode + refiner", lambda: e2e.decode(models, lat))
    out["info"]["faces_1024"] = 0 if mesh is None else int(sum(mesh.face_counts))
    out["complete"] = True
    Path(args.json).write_text(json.dumps(out))


def run_child(args, mode: str, json_path: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--json", str(json_path), "--steps", args.steps]
    cmd += ["--tiny"] * args.tiny + (["--subdivisions", str(args.subdivisions)] if args.subdivisions else [])
    left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - T0) - 10
    print(f"{mode}: {' '.join(cmd)} (time left {'∞' if left is None else f'{left:.0f} s'})", flush=True)
    t = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=REPO, timeout=left).returncode if left is None or left > 0 else "no time left"
    except subprocess.TimeoutExpired:
        rc = f"stopped after {left:.0f} s (--budget-s)"
    res = json.loads(json_path.read_text()) if json_path.exists() else {"rows": [], "complete": False}
    res.update(returncode=rc, wall=time.perf_counter() - t)
    print(f"{mode}: exit status {rc} after {res['wall']:.0f} s", flush=True)
    return res


def _steps_of(note: str) -> int | None:
    return int(note.split(" steps")[0].split()[-1]) if " steps" in note else None


def report(args, runs: dict) -> str:
    import torch

    t, n = ({r[0]: r for r in runs[m].get("rows", [])} for m in ("triton", "no-triton"))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    info = runs["triton"].get("info") or runs["no-triton"].get("info", {})
    lines = [
        "# The 1024 chain without Triton (PyTorch references) beside the Triton path, same run",
        "",
        f"- date: {datetime.date.today().isoformat()}; GPU: {gpu}; torch {runs['triton'].get('torch')}; "
        f"Triton {runs['triton'].get('triton')} (blocked in the second run: "
        f"{'yes' if runs['no-triton'].get('triton') is None else 'NO'})",
        f"- command: `python bench/no_triton.py {' '.join(sys.argv[1:])}`",
        f"- chain: bench/e2e.py's (v1.1, fp16, deterministic weights, bumpy icosphere), steps {args.steps} "
        f"(dense, 512, 1024), CFG 7; tokens {info.get('tokens_512')} at 512, {info.get('tokens_1024')} at 1024; "
        "each run in its own process; peaks are per stage (reset before each), weights included",
        "- runs: "
        + "; ".join(
            f"{m}: {'complete' if runs[m].get('complete') else 'INCOMPLETE'} "
            f"(exit {runs[m].get('returncode')}, {runs[m].get('wall', math.nan):.0f} s)"
            for m in ("triton", "no-triton")
        ),
        f"- fallback log line(s) in the no-Triton run: {len(runs['no-triton'].get('fallback_warnings', []))} "
        + (f'("{runs["no-triton"]["fallback_warnings"][0]}")' if runs["no-triton"].get("fallback_warnings") else ""),
        "",
        "| stage | Triton s | Triton peak alloc GiB | no Triton s | no Triton peak alloc GiB | no Triton peak "
        "reserved GiB | slowdown | s per step (Triton / none) | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys([*t, *n]):
        a, b = t.get(name), n.get(name)
        steps = _steps_of((a or b)[4])
        per = f"{a[1] / steps:.3f} / {b[1] / steps:.3f}" if a and b and steps else "—"
        slow = f"{b[1] / a[1]:.1f}x" if a and b and a[1] > 0 else "—"
        lines.append(
            f"| {name} | {a[1] if a else math.nan:.2f} | {a[2] if a else math.nan:.2f} | "
            f"{b[1] if b else math.nan:.2f} | {b[2] if b else math.nan:.2f} | {b[3] if b else math.nan:.2f} | "
            f"{slow} | {per} | {(a or b)[4]} |"
        )
    ta, tb = (sum(r[1] for r in x.values()) for x in (t, n))
    pa, pb = (max((r[2] for r in x.values()), default=math.nan) for x in (t, n))
    lines.append(
        f"| **total** | **{ta:.2f}** | **{pa:.2f}** | **{tb:.2f}** | **{pb:.2f}** | | "
        f"**{tb / ta if ta else math.nan:.1f}x** | | |"
    )
    ok = runs["no-triton"].get("complete") and pb <= TARGET_GIB
    lines += [
        "",
        f"Target (issue 20): the chain completes at 1024 without Triton within {TARGET_GIB:.0f} GiB peak "
        f"allocated: **{'met' if ok else 'NOT met'}** (peak {pb:.2f} GiB, "
        f"{'complete' if runs['no-triton'].get('complete') else 'incomplete'}).",
    ]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="50,10,5", help="dense, sparse-512, sparse-1024 steps (official 50,30,15)")
    ap.add_argument("--subdivisions", type=int, default=None, help="icosphere subdivisions (default 8, tiny 3)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole command")
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU (smoke run, prints only)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "no_triton.md")
    ap.add_argument("--child", choices=["triton", "no-triton"], help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.mode = args.child
        return child(args)
    with tempfile.TemporaryDirectory() as d:
        runs = {m: run_child(args, m, Path(d) / f"{m}.json") for m in ("triton", "no-triton")}
    text = report(args, runs)
    print(text)
    if not args.tiny:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
