"""Compile every Triton kernel with every autotune config for the consumer and datacenter NVIDIA architectures,
and record what each needs: shared memory (Triton's figure), registers and spills (ptxas), whether it fits.

Triton compiles for a target it is not running on (`triton.compile(ASTSource(...), target=GPUTarget(...))`), so
one machine, with or without a GPU, checks sm_80 (A100), sm_86 (RTX 30), sm_89 (RTX 40), sm_90 (H100) and
sm_120 (RTX 50). "fits" means: shared memory within the architecture's per-block opt-in maximum, registers x
threads within the 64 K registers of a block, and no spills. The runtime pruning's estimate (`_smem` of each
SSA module, used by `kernels._common.fitting` against the running GPU's own limit) is listed beside the
compiled figure: it must not be below it, or a config could be kept on a GPU it does not fit.

    python bench/archs.py                       # all kernels, all configs, the five architectures
    python bench/archs.py --archs 86,120 --jobs 2 --out /tmp/archs.md

Writes bench/results/archs.md (date, GPU, torch/Triton versions, command). The sizes are the released
models': G = HQ / H = 16, D = 32; v1.1 (both DiTs): CELLS 1, top-k 8; v1.0: CELLS 8 (compression block 4 inside
selection block 8), top-k 32 (512) and 8 (1024) (the top-k kernel's only size); C = 1024 rows
for the LayerNorm kernel; 8³ voxelization cells.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARCHS = (80, 86, 89, 90, 120)
REGISTERS_PER_BLOCK = 65536


@dataclass
class Case:
    """One kernel at one set of sizes: the argument types of its signature and its constexprs."""

    module: str
    kernel: str
    label: str
    types: dict  # argument name -> Triton type string ("*fp16", "i32", ...); absent: constexpr or "i32"
    constexprs: dict
    configs: list = field(default_factory=list)  # [(name, {meta}, num_warps, num_stages)]
    options: dict = field(default_factory=dict)  # extra compile options (enable_fp_fusion)
    smem_estimate: object = None  # (module, meta, num_warps, num_stages) -> bytes, or None


def _autotuned(module, name: str) -> list:
    out = []
    for c in getattr(module, name)():
        meta = ", ".join(f"{k}={v}" for k, v in c.kwargs.items())
        out.append((f"{meta}, w{c.num_warps}, s{c.num_stages}", dict(c.kwargs), c.num_warps, c.num_stages))
    return out


def cases() -> list[Case]:
    from kernels import ssa_compressed, ssa_selection, ssa_topk, ssa_window

    f16, i32, f32 = "*fp16", "*i32", "*fp32"
    out = []
    for label, cells in [("v1.0: CELLS 8", 8), ("v1.1: CELLS 1", 1)]:
        out.append(
            Case(
                "ssa_compressed",
                "_cmp_attn_topk_kernel",
                label,
                dict(
                    q=f16,
                    ck=f16,
                    cv=f16,
                    o=f16,
                    lse=f32,
                    sc=f32,
                    cu_q=i32,
                    cu_k=i32,
                    cu_blk=i32,
                    blk_keys=i32,
                    gate=f16,
                    scale_log2="fp32",
                ),
                dict(
                    G=16,
                    HEAD_DIM=32,
                    CELLS=cells,
                    HAS_BLOCK_KEYS=cells > 1,
                    HAS_GATE=True,
                    ACCUMULATE=False,
                    STORE_LSE=False,
                    UPCAST=False,
                ),
                _autotuned(ssa_compressed, "_configs"),
                smem_estimate=lambda m, meta, w, s: m._smem(_cfg(meta, w, s), 32),
            )
        )
    for topk in (32, 8):
        shapes = []
        for chunk in (1024, ssa_topk.TOPK_CHUNK):  # the official stages' chunk, the widest one; default shapes
            rows, warps = ssa_topk.launch_shape(chunk)
            shapes.append((f"ROWS={rows}, CHUNK={chunk}, w{warps}", dict(ROWS=rows, CHUNK=chunk), warps, 3))
        out.append(
            Case(
                "ssa_topk",
                "_topk_kernel",
                f"top-k {topk}, one chunk of scores",
                dict(sc=f32, bidx=i32, cu_q=i32, cu_blk=i32),
                dict(TOPK=topk, TOPK_P=topk, ONE_CHUNK=True, SEG=0),
                shapes,
            )
        )
        out.append(
            Case(
                "ssa_topk",
                "_topk_kernel",
                f"top-k {topk}, one chunk of scores, by segment heads of {ssa_topk.SEG}",
                dict(sc=f32, bidx=i32, cu_q=i32, cu_blk=i32),
                dict(TOPK=topk, TOPK_P=topk, ONE_CHUNK=True, SEG=ssa_topk.SEG),
                shapes,
            )
        )
    for label, topk in [("top-k 32", 32), ("top-k 8", 8)]:
        out.append(
            Case(
                "ssa_selection",
                "_selection_kernel",
                label,
                dict(
                    q=f16,
                    k=f16,
                    v=f16,
                    o=f16,
                    bidx=i32,
                    cu_q=i32,
                    cu_blk=i32,
                    cu_blk_tok=i32,
                    gate=f16,
                    scale_log2="fp32",
                ),
                dict(
                    G=16,
                    GP=16,
                    HEAD_DIM=32,
                    TOPK=topk,
                    TOPK_P=topk,
                    UNION_MAX=2 * topk,
                    HAS_GATE=True,
                    ACCUMULATE=True,
                    UPCAST=False,
                ),
                _autotuned(ssa_selection, "_configs"),
                smem_estimate=lambda m, meta, w, s: m._smem(_cfg(meta, w, s), 32),
            )
        )
    out.append(
        Case(
            "ssa_window",
            "_window_kernel",
            "8³ windows",
            dict(q=f16, k=f16, v=f16, o=f16, perm=i32, cu_win=i32, tiles=i32, gate=f16, scale_log2="fp32"),
            dict(G=16, HEAD_DIM=32, TILE_Q=ssa_window.WINDOW_TILE_Q, HAS_GATE=True, ACCUMULATE=True, UPCAST=False),
            _autotuned(ssa_window, "_configs"),
            smem_estimate=lambda m, meta, w, s: m._smem(_cfg(meta, w, s), 32, m.WINDOW_TILE_Q * 16),
        )
    )
    # fixed launches (no autotuning): the configs their launchers use
    from kernels import conv3d, group_norm, sparse_conv, voxelize
    from kernels._common import dot_width

    for cin, cout, ks in [(1, 8, 3), (8, 1, 3), (16, 8, 1), (40, 8, 1)]:  # the refiners' shapes `conv3d.suits` takes
        for cl in (False, True) if cin > 1 else (False,):  # NCDHW, and channels-last (the UNets on CUDA)
            out.append(
                Case(
                    "conv3d",
                    "_conv3d_kernel",
                    f"{cin}→{cout} channels, {ks}³{', channels-last' if cl else ''}",
                    dict(x=f16, w=f16, bias=f16, y=f16),
                    dict(
                        KS=ks,
                        CIN_P=dot_width(cin),
                        COUT_P=dot_width(cout),
                        HAS_BIAS=True,
                        X_CL=cl,
                        Y_CL=cl,
                    ),
                    [(f"BW={conv3d.BLOCK_W}, w{conv3d.NUM_WARPS}", dict(BW=conv3d.BLOCK_W), conv3d.NUM_WARPS, 3)],
                )
            )
    for mode, cin, cout in [("copied", 64, 64), ("derived", 64, 32), ("copied", 32, 32)]:  # the decoders' convs
        out.append(
            Case(
                "sparse_conv",
                "_sparse_conv_kernel",
                f"{mode}, {cin}→{cout} channels",
                dict(x=f16, nmap=i32, ptap=i32, child=i32, w=f16, bias=f16, y=f16),
                dict(
                    ROWS_PER_PARENT=8,
                    CHILD_ROWS=mode == "derived",
                    CIN_P=cin,
                    COUT_P=cout,
                    HAS_BIAS=True,
                ),
                [
                    (
                        f"BM={sparse_conv.BLOCK_M}, w{sparse_conv.NUM_WARPS}",
                        dict(BM=sparse_conv.BLOCK_M),
                        sparse_conv.NUM_WARPS,
                        3,
                    )
                ],
            )
        )

    out.append(
        Case(
            "group_norm",
            "_stats_kernel",
            "fp16",
            dict(x=f16, partial=f32, L="i32", n_tiles="i32"),
            {},
            [(f"TILE={group_norm.STATS_TILE}, w8", dict(TILE=group_norm.STATS_TILE), 8, 3)],
        )
    )
    out.append(
        Case(
            "group_norm",
            "_apply_kernel",
            "fp16",
            dict(x=f16, out=f16, scale=f32, shift=f32, S="i32"),
            {},
            [(f"BLOCK={group_norm.APPLY_BLOCK}, w4", dict(BLOCK=group_norm.APPLY_BLOCK), 4, 3)],
        )
    )
    for c in (8, 40, 1024):  # channels-last: the first level, a concatenation, the widest concatenation
        c_p = 1 << (c - 1).bit_length()
        tile_s = max(1, group_norm.STATS_TILE // c_p)
        out.append(
            Case(
                "group_norm",
                "_stats_cl_kernel",
                f"channels-last, C={c}",
                dict(x=f16, partial=f32, S="i32", C="i32", CPG="i32", G="i32", n_tiles="i32"),
                dict(C_P=c_p, G_P=4),
                [(f"TILE_S={tile_s}, w4", dict(TILE_S=tile_s), 4, 3)],
            )
        )
    out.append(
        Case(
            "group_norm",
            "_apply_cl_kernel",
            "channels-last, fp16",
            dict(x=f16, out=f16, scale=f32, shift=f32, SC="i32", C="i32"),
            {},
            [(f"BLOCK={group_norm.APPLY_BLOCK}, w4", dict(BLOCK=group_norm.APPLY_BLOCK), 4, 3)],
        )
    )
    for c in (1024, 16384):  # the DiT's width, and the largest row the launcher accepts
        w = 4 if c <= 2048 else 8
        out.append(
            Case(
                "layer_norm",
                "_add_ln_kernel",
                f"C={c}, gated residual+affine+modulation per sample",
                dict(
                    x=f16,
                    r=f16,
                    g=f16,
                    w=f16,
                    b=f16,
                    s=f16,
                    t=f16,
                    rb="*i64",
                    x_out=f16,
                    y_out=f16,
                    C="i32",
                    eps="fp32",
                    stride_m="i32",
                    stride_r="i32",
                ),
                dict(HAS_RES=True, HAS_GATE=True, AFFINE=True, MODULATE=True, PER_ROW=True),
                [(f"BLOCK_C={c}, w{w}", dict(BLOCK_C=c), w, 3)],
                dict(enable_fp_fusion=False),
            )
        )
    out.append(
        Case(
            "voxelize",
            "_mark_kernel",
            "factor 8",
            dict(
                occ="*u8",
                tris=f32,
                coord=f32,
                lo="*i64",
                hi="*i64",
                pair_tri="*i64",
                pair_cell="*i64",
                n_pairs="i32",
                L="i32",
                limit="fp32",
            ),
            dict(FACTOR=8, TINY=voxelize._TINY),
            [
                (
                    f"PAIRS={voxelize.PAIRS}, BLOCK={voxelize.BLOCK}, w4",
                    dict(PAIRS=voxelize.PAIRS, BLOCK=voxelize.BLOCK),
                    4,
                    3,
                )
            ],
            dict(enable_fp_fusion=False),
        )
    )
    return out


def _cfg(meta, num_warps, num_stages):
    import triton

    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def _ptxas(cc: int) -> str:
    """Path of the ptxas Triton itself uses for this architecture (the API moved between Triton versions)."""
    from triton.backends.nvidia import compiler as nv

    try:
        return nv.get_ptxas(cc).path
    except TypeError:  # get_ptxas() without the architecture
        return nv.get_ptxas().path
    except AttributeError:
        return nv._path_to_binary("ptxas")[0]


def ptxas_usage(text: str) -> tuple[int, int]:
    """(registers, spill bytes) from `ptxas -v` output."""
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", text)
    return int(regs.group(1)) if regs else -1, sum(int(s) for s in spills)


def compile_one(job) -> dict:
    """Compile one (kernel, sizes, config, arch) in a worker process; returns a row of the table (errors are
    rows too). `job` is plain data: (module, kernel, label, types, constexprs, options, config, arch)."""
    module, kernel, label, types, constexprs, options, (name, meta, warps, stages), cc = job
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"kernels.{module}"), kernel)
    consts = dict(constexprs, **meta)
    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    row = dict(kernel=f"{module}.{kernel}", case=label, config=name, arch=cc, threads=32 * warps)
    t = time.perf_counter()
    try:
        k = triton.compile(
            ASTSource(fn, sig, constexprs=consts),
            target=GPUTarget("cuda", cc, 32),
            options=dict(num_warps=warps, num_stages=stages, **options),
        )
        row["shared"] = int(k.metadata.shared)
        ptx = k.asm["ptx"]
        target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "k.ptx")
            Path(src).write_text(ptx)
            r = subprocess.run(
                [_ptxas(cc), "-v", f"--gpu-name={target}", src, "-o", os.path.join(d, "k.cubin")],
                capture_output=True,
                text=True,
            )
        row["registers"], row["spills"] = ptxas_usage(r.stdout + r.stderr)
        row["error"] = None if r.returncode == 0 else f"ptxas: {(r.stderr or r.stdout).strip()[-200:]}"
    except Exception as e:  # a config that does not compile for an architecture is a finding, not a crash
        row.update(shared=None, registers=None, spills=None, error=f"{type(e).__name__}: {str(e)[:200]}")
    row["seconds"] = time.perf_counter() - t
    return row


def verdict(row: dict, smem_limits: dict) -> str:
    """'yes', or why not: compile error, shared memory over the limit, too many registers, spills."""
    if row["error"]:
        return "no: does not compile"
    why = []
    if row["shared"] > smem_limits[row["arch"]]:
        why.append(f"shared {row['shared']} > {smem_limits[row['arch']]}")
    if row["registers"] * row["threads"] > REGISTERS_PER_BLOCK:
        why.append(f"{row['registers']} registers x {row['threads']} threads > 64K")
    if row["spills"]:
        why.append(f"spills {row['spills']} B")
    return "no: " + "; ".join(why) if why else "yes"


def table(rows: list[dict], smem_limits: dict) -> list[str]:
    """Markdown: one line per (kernel, case, config), one column group per architecture."""
    archs = sorted({r["arch"] for r in rows})
    head = (
        "| kernel | sizes | config | estimate B | "
        + " | ".join(f"sm_{a}: fits / shared B / regs" for a in archs)
        + " |"
    )
    lines = [head, "|" + "---|" * (4 + len(archs))]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["case"], r["config"]), {})[r["arch"]] = r
    for (kernel, case, config), by_arch in groups.items():
        est = next(iter(by_arch.values()))["estimate"]
        cells = []
        for a in archs:
            r = by_arch.get(a)
            if r is None:
                cells.append("—")
            elif r["error"]:
                cells.append(f"**no**: {r['error'][:80]}")
            else:
                v = verdict(r, smem_limits)
                low = est is not None and est < r["shared"]
                cells.append(
                    f"{'yes' if v == 'yes' else '**' + v + '**'} / {r['shared']}"
                    f"{' (**above the estimate**)' if low else ''} / {r['registers']}"
                )
        lines.append(f"| {kernel} | {case} | {config} | {'—' if est is None else est} | " + " | ".join(cells) + " |")
    return lines


def summary(rows: list[dict], smem_limits: dict) -> list[str]:
    bad = [r for r in rows if verdict(r, smem_limits) != "yes"]
    under = [r for r in rows if r["estimate"] is not None and r["shared"] is not None and r["estimate"] < r["shared"]]
    return [
        f"- {len(rows)} compilations ({len({(r['kernel'], r['case'], r['config']) for r in rows})} kernel configs "
        f"x {len({r['arch'] for r in rows})} architectures): {len(rows) - len(bad)} fit, {len(bad)} do not"
        + ("" if not bad else ": " + "; ".join(f"{r['kernel']} {r['config']} sm_{r['arch']}" for r in bad[:12])),
        f"- runtime estimate below the compiled shared memory: {len(under)} "
        + (
            "(none: pruning by the estimate never keeps a config that does not fit)"
            if not under
            else "(the estimate must be raised): "
            + "; ".join(f"{r['kernel']} {r['config']} sm_{r['arch']}" for r in under[:12])
        ),
        f"- largest shared memory: {max((r['shared'] or 0) for r in rows)} B; most registers: "
        f"{max((r['registers'] or 0) for r in rows)}; spills: {sum((r['spills'] or 0) for r in rows)} B in all",
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 80,86,89,90,120")
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="parallel compilations")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "archs.md")
    args = ap.parse_args(argv)
    import torch
    import triton

    from kernels._common import SMEM_LIMIT

    archs = [int(a) for a in args.archs.split(",")]
    import importlib

    jobs, estimates = [], []
    for c in cases():
        mod = importlib.import_module(f"kernels.{c.module}")
        for cfg in c.configs:
            est = c.smem_estimate(mod, *cfg[1:]) if c.smem_estimate else None
            for a in archs:
                jobs.append((c.module, c.kernel, c.label, c.types, c.constexprs, c.options, cfg, a))
                estimates.append(est)
    t = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as ex:
        rows = list(ex.map(compile_one, jobs))
    for r, est in zip(rows, estimates):
        r["estimate"] = est
    wall = time.perf_counter() - t
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (compiled on the CPU)"
    lines = [
        "# Every Triton kernel x every config x architecture: compiles? shared memory, registers",
        "",
        f"- date: {datetime.date.today().isoformat()}; machine GPU: {gpu}; torch {torch.__version__}; "
        f"Triton {triton.__version__}",
        f"- command: `python bench/archs.py {' '.join(sys.argv[1:] if argv is None else argv)}` "
        f"({len(jobs)} compilations in {wall:.0f} s, {args.jobs} processes)",
        "- limits (shared memory per block, opt-in): "
        + ", ".join(f"sm_{a} {SMEM_LIMIT[a]} B" for a in archs)
        + "; 64K registers a block; `fits` also needs no spills",
        "- estimate B: the shared memory the runtime pruning assumes for the config (SSA kernels; it must not be "
        "below the compiled figure)",
        "",
    ]
    lines += summary(rows, SMEM_LIMIT) + [""] + table(rows, SMEM_LIMIT)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(args.out)
    print("\n".join(lines[:8]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
