"""bench/archs.py's table logic on hand-made rows, and one real cross-compilation (an sm_86 target on this
CPU-only machine: Triton compiles for a GPU it is not running on)."""

import importlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ARCHS_PY = Path(__file__).resolve().parents[2] / "bench" / "archs.py"
_spec = importlib.util.spec_from_file_location("bench_archs", ARCHS_PY)
archs = importlib.util.module_from_spec(_spec)
sys.modules["bench_archs"] = archs  # dataclasses look their module up there
_spec.loader.exec_module(archs)

LIMITS = {86: 101376, 90: 232448}


def _row(arch, shared, regs, spills=0, threads=128, estimate=None, error=None, config="c"):
    return dict(
        kernel="k",
        case="s",
        config=config,
        arch=arch,
        shared=shared,
        registers=regs,
        spills=spills,
        threads=threads,
        estimate=estimate,
        error=error,
    )


def test_ptxas_usage_parsing():
    text = (
        "ptxas info    : Function properties for _window_kernel\n"
        "    0 bytes stack frame, 24 bytes spill stores, 16 bytes spill loads\n"
        "ptxas info    : Used 168 registers, used 1 barriers, 472 bytes cmem[0]\n"
    )
    assert archs.ptxas_usage(text) == (168, 40)
    assert archs.ptxas_usage("nothing") == (-1, 0)


def test_verdicts():
    assert archs.verdict(_row(86, 101376, 255, threads=256), LIMITS) == "yes"  # 255 x 256 = 65280 registers
    assert archs.verdict(_row(86, 101377, 100), LIMITS).startswith("no: shared 101377 > 101376")
    assert archs.verdict(_row(90, 101377, 100), LIMITS) == "yes"
    assert "registers" in archs.verdict(_row(86, 0, 255, threads=512), LIMITS)
    assert "spills 8 B" in archs.verdict(_row(86, 0, 64, spills=8), LIMITS)
    assert archs.verdict(_row(86, None, None, error="PTXASError: x"), LIMITS) == "no: does not compile"


def test_table_and_summary_flag_what_does_not_fit():
    rows = [
        _row(86, 120000, 128, estimate=130000),
        _row(90, 120000, 128, estimate=130000),
        _row(86, 40000, 96, estimate=30000, config="d"),
        _row(90, 40000, 96, estimate=30000, config="d"),
    ]
    lines = archs.table(rows, LIMITS)
    assert lines[0].count("sm_") == 2 and len(lines) == 4  # header, rule, one line per config
    assert "**no: shared 120000 > 101376** / 120000 / 128" in lines[2] and "| yes / 120000 / 128 |" in lines[2]
    assert lines[3].count("above the estimate") == 2
    text = "\n".join(archs.summary(rows, LIMITS))
    assert "3 fit, 1 do not" in text and "estimate below the compiled shared memory: 2" in text


@pytest.mark.triton
def test_cross_compiles_for_a_consumer_gpu():
    """In a fresh process without TRITON_INTERPRET (CI sets it, and interpreted kernels cannot be compiled)."""
    code = f"""
import json, sys, importlib.util
spec = importlib.util.spec_from_file_location("bench_archs", {str(ARCHS_PY)!r})
archs = importlib.util.module_from_spec(spec); sys.modules["bench_archs"] = archs; spec.loader.exec_module(archs)
case = next(c for c in archs.cases() if c.kernel == "_apply_kernel")
row = archs.compile_one((case.module, case.kernel, case.label, case.types, case.constexprs, case.options,
                         case.configs[0], 86))
print(json.dumps(row))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["error"] is None, row["error"]
    assert row["shared"] >= 0 and 0 < row["registers"] <= 255 and archs.verdict(row, LIMITS) == "yes"


@pytest.mark.triton
def test_every_case_matches_its_kernel_s_signature():
    """A case written for an older signature compiles nothing useful: `_add_ln_kernel` gained a gate pointer and
    HAS_GATE, its case kept the old names, and every architecture reported a compilation error that was the
    table's, not the kernel's (2026-12-07). Each case must set exactly the kernel's constexprs and name only its
    arguments."""
    for case in archs.cases():
        fn = getattr(importlib.import_module(f"kernels.{case.module}"), case.kernel)
        # the Python function under the JIT (or interpreter, TRITON_INTERPRET=1) wrapper; annotations may be strings
        params = inspect.signature(fn.fn).parameters.values()
        constexprs = {p.name for p in params if "constexpr" in str(p.annotation)}
        others = {p.name for p in params} - constexprs
        where = f"{case.module}.{case.kernel} ({case.label})"
        assert set(case.types) <= others, f"{where}: not arguments: {set(case.types) - others}"
        for name, meta, _, _ in case.configs:
            given = set(case.constexprs) | set(meta)
            assert given == constexprs, f"{where} {name}: missing {constexprs - given}, extra {given - constexprs}"
