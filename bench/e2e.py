"""End-to-end 1024³ benchmark of our pipeline: per-stage wall time and peak GPU memory (issue: e2e speed).

The full chain with the official configs and step counts (dense 50, sparse-512 30, sparse-1024 15; CFG 7 =
two DiT forwards per step), fp16, batch 1, deterministic random weights (time and memory do not depend on
the values). Random-weight decodes are meaningless, so each sparse stage is fed the structure of a real
closed mesh, as `shared/upstream/PERF.md` measured the original: a bumpy icosphere (1.3 M faces) voxelized
with our `mesh_to_latent_index` at 512 and 1024. The 512/1024 decodes and refiners still run on the
sampled (random) latents, which cost what real ones cost: their work follows the structure.

    python bench/e2e.py                     # GPU: official configs, the pipeline's default placement (one
                                            # stage's weights on the GPU at a time); writes
                                            # bench/results/<date>-<gpu>-e2e-offload.md
    python bench/e2e.py --resident          # every network kept on the GPU (as the original); -> ...-e2e.md
    python bench/e2e.py --tiny              # CPU smoke run (tiny config, small mesh), prints only
    python bench/e2e.py --resident --original .scratch [--warm]
                                            # then the ORIGINAL pipeline (bench/e2e_original.py, imported
                                            # from that folder) in a subprocess, same structure, same run;
                                            # writes bench/results/<date>-<gpu>-e2e-vs-original.md

Without --original the original is not run and its numbers come from PERF.md (same kind of H100,
2026-11-25). With it, bench/e2e_original.py times the original on stand-ins (torchsparse, flash-attn and
its CUDA voxelizer do not install on the GPU machine; the stand-ins are listed in the results file).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import oom_report  # noqa: E402

from kernels import ssa_topk  # noqa: E402
from s2core import config, cuda_graph, loading, results  # noqa: E402
from s2core import pipeline as P  # noqa: E402
from s2core.mesh.voxelize import mesh_to_latent_index  # noqa: E402
from s2core.refiner import unet  # noqa: E402
from s2core.sparse import conv as sparse_conv  # noqa: E402
from s2core.testing import deterministic_state_dict  # noqa: E402

GiB = 2**30
T0 = time.perf_counter()  # --budget-s counts from here
ORIGINAL = {  # PERF.md "The original pipeline end to end" (H100, warm run): seconds, peak allocated GiB
    "image encode": (0.07, 6.3),
    "dense sampling": (5.8, 6.4),
    "dense decode": (0.02, 6.5),
    "sparse-512 sampling": (15.4, 6.8),
    "sparse-512 decode + refiner": (17.0, 21.7),
    "mesh -> 1024 structure": (0.2, 18.3),
    "sparse-1024 sampling": (26.1, 8.9),
    "sparse-1024 decode + refiner": (50.3, 20.4),
    "total": (115.2, 21.7),
}


def switches() -> str:
    """The speed switches this run used, for the report's header."""
    return (
        f"sparse conv kernel {'on' if sparse_conv.USE_KERNEL else 'off'}, channels-last refiners "
        f"{'on' if unet.CHANNELS_LAST else 'off'}, segmented top-k {'on' if ssa_topk.SEGMENTED else 'off'}, "
        f"CUDA graphs: {', '.join(sorted(cuda_graph.STAGES))}"
    )


def bumpy_sphere(subdivisions: int):
    """A closed, watertight, genus-0 mesh with surface detail: an icosphere displaced along its normals."""
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=subdivisions)
    v = torch.tensor(m.vertices, dtype=torch.float64)
    th, ph = torch.atan2(v[:, 1], v[:, 0]), torch.acos(v[:, 2].clamp(-1, 1))
    r = 1 + 0.12 * torch.sin(5 * th) * torch.sin(4 * ph) + 0.05 * torch.cos(11 * ph)
    return (v * r[:, None]).float(), torch.tensor(m.faces, dtype=torch.int64)


def build_models(variant: str, device, dtype, offload: bool | None, seed: int = 0) -> loading.Models:
    config = loading.config_for(variant)
    parts = tuple(loading.PARTS)
    if variant == "tiny-random":
        sds = loading.tiny_state_dicts(config, parts, seed)
    else:
        sds = {}
        for i, name in enumerate(parts):
            m = loading.build_part(name, config, dtype)
            m = m.model if name == "image_encoder" else m
            sds[name] = deterministic_state_dict(m, seed=seed * 100 + i)
            del m
    # A random sign network outputs noise, so its inside/outside grid flips cell to cell and the "surface"
    # fills the whole 1024³ volume (billions of crossing cells, nothing a trained model produces). Pin its
    # output to "outside" away from the decoded band, as a trained model's is: the surface is then the
    # decoded band's boundary, about the size of a real mesh's.
    sds["refiner_1024"]["conv_out.weight"].mul_(0.01)
    sds["refiner_1024"]["conv_out.bias"].fill_(1.0)
    return loading.load_models(
        variant, loading.STAGES, device, dtype, state_dicts=sds, placement=loading.Placement(device, offload=offload)
    )


class Timer:
    def __init__(self, device):
        self.device = torch.device(device)
        self.rows: list[tuple[str, float, float, float, str]] = []

    def run(self, name: str, fn, note: str = ""):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        alloc = torch.cuda.max_memory_allocated() / GiB if cuda else float("nan")
        res = torch.cuda.max_memory_reserved() / GiB if cuda else float("nan")
        self.rows.append((name, dt, alloc, res, note() if callable(note) else note))
        print(
            f"{name:32s} {dt:8.2f} s  peak {alloc:6.2f} GiB alloc  {res:6.2f} GiB reserved  {self.rows[-1][4]}",
            flush=True,
        )
        return out


def time_substages(device) -> list[tuple[str, float]]:
    """Time every `stage_guard` block of the pipeline (decoding, refinement, surface extraction, ...) by
    wrapping the pipeline's guard: each block is synchronised at its end and its wall time appended, in order,
    to the returned list (and printed). The stage rows stay as they are; a block's time is inside its stage's."""
    rows: list[tuple[str, float]] = []
    guard = P.stage_guard

    @contextlib.contextmanager
    def timed_guard(stage: str, lower: str):
        sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        with guard(stage, lower):
            yield
            sync()
        rows.append((stage, time.perf_counter() - t))
        print(f"  · {stage:28s} {rows[-1][1]:8.2f} s", flush=True)

    P.stage_guard = timed_guard
    return rows


def decode(models: loading.Models, latent):
    """The stage's decode + refiner as the pipeline runs it. With random weights the 512 refiner's field never
    reaches its level, so the pipeline's empty-mesh check fires after all the work is done: that is the time
    we measure, and the mesh is reported as None (0 faces)."""
    try:
        return P.decode_sparse(models, latent, refine=True)
    except ValueError as e:
        if "is empty because" not in str(e):
            raise
        return None


def run_chain(models: loading.Models, v, f, device, tiny: bool, timer: Timer) -> dict:
    res512 = models.config.sparse_dit_512.resolution * 8
    steps = (2, 2, 2) if tiny else (config.DENSE_STEPS, config.SPARSE_512_STEPS, config.SPARSE_1024_STEPS)
    img = torch.ones(1, 256, 256, 4)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 256), torch.linspace(-1, 1, 256), indexing="ij")
    disk = (xx**2 + yy**2 < 0.6).float()
    img[0, ..., 0], img[0, ..., 1], img[0, ..., 2] = 0.8 * disk, 0.3 + 0.2 * yy, 0.5 * disk
    image, mask = img[..., :3], disk[None]
    info = {}

    cond = timer.run("image encode", lambda: P.encode_image(models, image, mask))
    dense = timer.run("dense sampling", lambda: P.sample_dense(models, cond, 0, steps[0]))
    timer.run("dense decode", lambda: P.decode_dense(models, dense))
    # the 512 stage gets the real shape's structure (random-weight decodes are meaningless)
    idx512 = mesh_to_latent_index(v, f, resolution=res512, device=device).to(torch.int32).cpu()
    s512 = results.make_structure(idx512, 512, res512 // 8, models.config.sparse_dit_512.selection_block_size)
    info["tokens_512"] = s512.num_tokens
    lat512 = timer.run(
        "sparse-512 sampling", lambda: P.sample_sparse(models, cond, s512, 0, steps[1]), f"{s512.num_tokens} tokens"
    )
    mesh512 = timer.run("sparse-512 decode + refiner", lambda: decode(models, lat512))
    info["faces_512"] = 0 if mesh512 is None else int(sum(mesh512.face_counts))
    real = results.Mesh.from_list([(v, f)], 512, {})
    s1024 = timer.run("mesh -> 1024 structure", lambda: P.mesh_to_structure(models, real))
    info["tokens_1024"] = s1024.num_tokens
    lat1024 = timer.run(
        "sparse-1024 sampling", lambda: P.sample_sparse(models, cond, s1024, 0, steps[2]), f"{s1024.num_tokens} tokens"
    )
    mesh1024 = timer.run("sparse-1024 decode + refiner", lambda: decode(models, lat1024))
    info["faces_1024"] = 0 if mesh1024 is None else int(sum(mesh1024.face_counts))
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke run, prints only)")
    ap.add_argument("--offload", action="store_true", help="one stage's weights on the GPU at a time (the default)")
    ap.add_argument("--resident", action="store_true", help="keep every network on the GPU, as the original")
    ap.add_argument("--subdivisions", type=int, default=None, help="icosphere subdivisions (default 8, tiny 3)")
    ap.add_argument("--warm", action="store_true", help="run the chain twice and report the second (warm) run")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--sparse-conv-kernel",
        choices=["on", "off"],
        default=None,
        help="the sparse decoders' few-channel convolutions as the Triton kernel (on) or gather + GEMM (off); "
        "default: the code's (s2core.sparse.conv.USE_KERNEL)",
    )
    ap.add_argument(
        "--channels-last",
        choices=["on", "off"],
        default=None,
        help="the refiner UNets in channels-last on CUDA (on) or NCDHW (off); default: the code's "
        "(s2core.refiner.unet.CHANNELS_LAST)",
    )
    ap.add_argument(
        "--segmented-topk",
        choices=["on", "off"],
        default=None,
        help="the SSA top-k by segment heads (on) or by rounds over whole rows (off); default: the code's "
        "(kernels.ssa_topk.SEGMENTED)",
    )
    ap.add_argument(
        "--graphs",
        choices=["dense", "all"],
        default=None,
        help="stages whose forwards replay CUDA graphs: the coarse DiT only (dense), or also the sparse "
        "samplers and the refiners' cubes (all); default: the code's (s2core.cuda_graph.STAGES)",
    )
    ap.add_argument(
        "--substages",
        action="store_true",
        help="also time each guarded block inside a stage (VAE decoding, refinement, surface extraction), "
        "synchronised at its end, and print them",
    )
    ap.add_argument(
        "--cap-gib",
        type=float,
        default=None,
        help="cap PyTorch's allocator at this many GiB (set_per_process_memory_fraction): an 8 GB card's budget",
    )
    ap.add_argument(
        "--oom-report",
        action="store_true",
        help="at an out-of-memory error, print what is allocated by repository line (bench/oom_report.py)",
    )
    ap.add_argument(
        "--original",
        metavar="UPSTREAM",
        default=None,
        help="also time the original pipeline (folder holding its direct3d_s2 package, e.g. .scratch) "
        "in a subprocess after ours, and write the combined table",
    )
    ap.add_argument(
        "--original-python",
        default=sys.executable,
        help="interpreter for the original's subprocess (default: this one)",
    )
    ap.add_argument(
        "--original-json",
        type=Path,
        default=None,
        help="keep the original's per-stage JSON here (default: a temporary file)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall-clock budget of this whole command: the original's subprocess is stopped in time to "
        "write the table with the stages it finished (each is saved as it ends)",
    )
    args = ap.parse_args()

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if args.sparse_conv_kernel:
        sparse_conv.USE_KERNEL = args.sparse_conv_kernel == "on"
    if args.channels_last:
        unet.CHANNELS_LAST = args.channels_last == "on"
    if args.segmented_topk:
        ssa_topk.SEGMENTED = args.segmented_topk == "on"
    if args.graphs:
        cuda_graph.STAGES = {"dense"} if args.graphs == "dense" else {"dense", "sparse", "refiner"}
    print(switches(), flush=True)
    if args.cap_gib and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * 2**30 / total, torch.cuda.current_device())
    if args.oom_report and device.type == "cuda":
        oom_report.attach()
    if args.offload and args.resident:
        ap.error("--offload and --resident contradict each other; pass one.")
    args.offload = loading.Placement(device, offload=False if args.resident else None).offload
    variant = "tiny-random" if args.tiny else "v1.1"
    dtype = torch.float32 if args.tiny else torch.float16
    v, f = bumpy_sphere(args.subdivisions or (3 if args.tiny else 8))
    print(f"mesh: {v.shape[0]} vertices, {f.shape[0]} faces; device {device}; offload {args.offload}", flush=True)
    t0 = time.perf_counter()
    models = build_models(variant, device, dtype, args.offload)
    print(f"models built in {time.perf_counter() - t0:.1f} s", flush=True)
    if device.type == "cuda" and not args.offload:
        for m in models.loaded_parts().values():
            m.to(device)  # everything resident, as the original keeps it
        torch.cuda.synchronize()
    substages = time_substages(device) if args.substages else None
    runs = 2 if args.warm else 1
    chains = []  # one Timer per chain: with --warm the first one is the process's first-run cost
    for _ in range(runs):
        if substages is not None:
            substages.clear()  # the report keeps the last chain's
        timer = Timer(device)
        with torch.inference_mode():
            info = run_chain(models, v, f, device, args.tiny, timer)
        chains.append(timer)
        print(f"{'chain total':32s} {sum(r[1] for r in timer.rows):8.2f} s", flush=True)
    total = sum(r[1] for r in timer.rows)
    peak_alloc = max(r[2] for r in timer.rows)
    peak_res = max(r[3] for r in timer.rows)
    print(f"{'total':32s} {total:8.2f} s  peak {peak_alloc:6.2f} GiB alloc  {peak_res:6.2f} GiB reserved")
    if args.original:
        del models
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        orig = run_original(args, f.shape[0])
        first = chains[0].rows if args.warm else None
        write_comparison(args, timer.rows, info, orig, f.shape[0], device, first)
        return
    if args.tiny or device.type != "cuda":
        return
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    date = datetime.date.today().isoformat()
    out = args.out or REPO / "bench" / "results" / f"{date}-{gpu}-e2e{'-offload' if args.offload else ''}.md"
    lines = [
        f"# End-to-end 1024³ ({'offload: one stage on the GPU' if args.offload else 'all weights resident'})",
        "",
        f"- date: {date}; GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}",
        f"- command: `python bench/e2e.py {' '.join(sys.argv[1:])}`; {switches()}",
        f"- mesh: bumpy icosphere, {f.shape[0]} faces; tokens: {info['tokens_512']} at 512, "
        f"{info['tokens_1024']} at 1024; {'warm (second) run' if args.warm else 'first run'}"
        + (f"; allocator capped at {args.cap_gib} GiB" if args.cap_gib else ""),
        "- original: PERF.md (same kind of H100, not this run; 18,872 / 91,538 tokens)",
        "",
        "| stage | ours s | ours peak alloc GiB | ours peak reserved GiB | original s | original peak GiB | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, dt, a, rsv, note in timer.rows:
        o = ORIGINAL.get(name, (math.nan, math.nan))
        lines.append(f"| {name} | {dt:.2f} | {a:.2f} | {rsv:.2f} | {o[0]} | {o[1]} | {note} |")
    o = ORIGINAL["total"]
    lines.append(f"| **total** | **{total:.2f}** | **{peak_alloc:.2f}** | **{peak_res:.2f}** | {o[0]} | {o[1]} | |")
    if args.warm:
        first = chains[0].rows
        lines += ["", f"First chain of this process: {sum(r[1] for r in first):.2f} s, per stage:", ""]
        lines += [f"- {name}: {dt:.2f} s" for name, dt, *_ in first]
    if substages:
        lines += ["", "Guarded blocks inside the stages (last chain, `--substages`):", ""]
        lines += [f"- {name}: {dt:.2f} s" for name, dt in substages]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


def run_original(args, faces: int) -> dict:
    """bench/e2e_original.py in a subprocess (its own CUDA context: clean memory statistics); its JSON, or as much
    of it as was written before it failed (each stage is saved as it ends)."""
    out = args.original_json or Path(tempfile.mkdtemp(prefix="e2e_original_")) / "original.json"
    cmd = [
        args.original_python,
        str(REPO / "bench" / "e2e_original.py"),
        "--upstream",
        args.original,
        "--json",
        str(out),
        "--subdivisions",
        str(args.subdivisions or (3 if args.tiny else 8)),
    ]
    if args.warm:
        cmd.append("--warm")
    if args.tiny:
        cmd.append("--cpu-smoke")
    print("original:", " ".join(cmd), flush=True)
    t = time.perf_counter()
    timeout = None if args.budget_s is None else max(1.0, args.budget_s - (t - T0) - 15)
    try:
        rc = subprocess.run(cmd, cwd=REPO, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = f"stopped after {timeout:.0f} s (--budget-s)"
    print(f"original finished with exit status {rc} after {time.perf_counter() - t:.0f} s", flush=True)
    res = json.loads(out.read_text()) if out.exists() else {"rows": [], "stand_ins": [], "complete": False}
    res["returncode"] = rc
    return res


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 and math.isfinite(a) and math.isfinite(b) else "—"


def _table(rows, o_rows: dict, complete: bool) -> list[str]:
    """Markdown rows: ours per stage beside the original's stage of the same name, then the totals."""
    lines = [
        "| stage | ours s | ours peak alloc GiB | ours peak reserved GiB | original s | original peak alloc GiB "
        "| original peak reserved GiB | speedup | memory ratio | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, dt, a, rsv, note in rows:
        o = o_rows.get(name)
        if o is None:
            lines.append(f"| {name} | {dt:.2f} | {a:.2f} | {rsv:.2f} | — | — | — | — | — | {note} |")
            continue
        both = "; ".join(x for x in (f"ours: {note}" if note else "", f"original: {o[4]}" if o[4] else "") if x)
        lines.append(
            f"| {name} | {dt:.2f} | {a:.2f} | {rsv:.2f} | {o[1]:.2f} | {o[2]:.2f} | {o[3]:.2f} | "
            f"{_ratio(o[1], dt)} | {_ratio(o[2], a)} | {both} |"
        )
    total = sum(r[1] for r in rows)
    pa, pr = max(r[2] for r in rows), max(r[3] for r in rows)
    if o_rows:
        ot = sum(r[1] for r in o_rows.values())
        oa, orr = max(r[2] for r in o_rows.values()), max(r[3] for r in o_rows.values())
        lines.append(
            f"| **total** | **{total:.2f}** | **{pa:.2f}** | **{pr:.2f}** | **{ot:.2f}** | **{oa:.2f}** | "
            f"**{orr:.2f}** | **{_ratio(ot, total)}** | **{_ratio(oa, pa)}** | "
            f"{'' if complete else 'original incomplete: its total covers only the stages shown'} |"
        )
    return lines


def write_comparison(args, rows, info: dict, orig: dict, faces: int, device, first=None) -> None:
    """One table, ours vs the original, same run, same structure: per stage and total, time and peak memory,
    speedup (original s / ours s) and memory ratio (original peak allocated / ours); with `first` (the first
    chain's rows of a --warm run) a second table for the first chains."""
    import triton

    o_rows = {r[0]: r for r in orig.get("rows", [])}
    cuda = device.type == "cuda"
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    date = datetime.date.today().isoformat()
    complete = orig.get("complete", False)
    lines = [
        f"# End-to-end 1024³: ours vs the original Direct3D-S2, same run "
        f"({'all weights resident' if not args.offload else 'ours: offload, one stage on the GPU'})",
        "",
        f"- date: {date}; GPU: {gpu}; torch {torch.__version__}; triton {triton.__version__}"
        + (
            f" (original's subprocess: torch {orig.get('torch')}, triton {orig.get('triton')}, {orig.get('device')})"
            if orig.get("torch")
            else ""
        ),
        f"- command: `python bench/e2e.py {' '.join(sys.argv[1:])}`; {switches()}",
        f"- structure (both): bumpy icosphere, {faces} faces; {'warm (second) run' if args.warm else 'first run'}"
        f" of each chain; "
        + (
            "TINY CPU SMOKE (tiny configs, 2 steps ours / 1 step original, original's sparse "
            "structures cropped): times mean nothing"
            if args.tiny
            else "official steps (50 / 30 / 15), CFG 7, fp16, deterministic weights (same values, "
            "same names); the 1024 sign refiner pinned to 'outside' in both"
        ),
        f"- tokens: ours {info.get('tokens_512')} at 512, {info.get('tokens_1024')} at 1024; original "
        f"{orig.get('tokens_512')} at 512, {orig.get('tokens_1024')} at 1024",
        f"- faces meshed: ours {info.get('faces_512')} at 512, {info.get('faces_1024')} at 1024; original "
        f"{orig.get('faces_512')} at 512, {orig.get('faces_1024')} at 1024",
        f"- original: models built in {orig.get('build_s', math.nan):.0f} s, resident weights "
        f"{orig.get('resident_weights_gib', math.nan):.2f} GiB; "
        + ("complete" if complete else f"INCOMPLETE (exit status {orig.get('returncode')}): missing stages show —"),
        "",
    ]
    if first:
        o_first = {r[0]: r for r in orig.get("first_rows", [])}
        lines += ["## Warm (second) chain of each process", ""]
        lines += _table(rows, o_rows, complete)
        lines += [
            "",
            "## First chain of each process (ours: Triton compiles and autotunes here unless its cache is warm)",
            "",
        ]
        lines += _table(first, o_first, bool(o_first))
    else:
        lines += _table(rows, o_rows, complete)
    lines += [
        "",
        "speedup = original s / ours s; memory ratio = original peak allocated / ours. Peaks are per "
        "stage (reset before each), including resident weights.",
        "",
        "Stand-ins used for the original (its numbers measure the original's code on these, not the real packages):",
        "",
    ]
    lines += [f"* {s}" for s in orig.get("stand_ins", [])]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.tiny or not cuda:
        return
    out = args.out or REPO / "bench" / "results" / f"{date}-{gpu.replace(' ', '_')}-e2e-vs-original.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
