"""The variant A/B logic of bench/ab_compressed.py and bench/bench_conv3d.py: loading a variant file, the
verdict, the side-by-side rows, refusals (tiny sizes; no GPU)."""

from pathlib import Path

import pytest

from bench import ab_compressed as ab

REPO = Path(__file__).resolve().parents[1]


def test_a_variant_file_loads_as_a_sibling_of_the_kernels():
    module = ab.load_variant("copy", REPO / "kernels" / "ssa_compressed.py")
    assert module.__name__ == "kernels._ab_copy" and module.__package__ == "kernels"
    assert module is not ab.ssa_compressed
    # its relative imports resolved to this tree's package, not to a second copy of it
    assert module._autotune is ab.ssa_compressed._autotune


def _row(name, ms, same, speedup):
    return dict(name=name, ms=ms, same=same, speedup=speedup)


def test_the_verdict_needs_main_s_blocks_and_a_win_on_every_row():
    rows = [_row("main", 2.0, 1.0, 1.0), _row("two", 1.0, 1.0, 2.0), _row("main", 4.0, 1.0, 1.0)]
    rows += [_row("two", 5.0, 1.0, 0.8), _row("wide", 1.0, 0.97, 4.0)]
    lines = ab.verdict(rows).splitlines()
    assert lines[0] == "two: same blocks as main on every row; not faster on every row (slowest row 0.80x main)"
    assert lines[1].startswith("wide: DIFFERENT blocks from main on some rows; faster on every row")
    assert "no speed verdict" in ab.verdict(rows, on_gpu=False)


@pytest.mark.parametrize("spec", ["two", "main=" + __file__, "two=does/not/exist.py", "2x=" + __file__])
def test_a_bad_variant_is_refused_in_one_sentence(monkeypatch, spec):
    monkeypatch.setattr("sys.argv", ["ab_compressed.py", "--variant", spec, "--tiny"])
    with pytest.raises(SystemExit) as e:
        ab.main()
    assert str(e.value).startswith(f"--variant {spec!r}: give NAME=PATH")


@pytest.mark.triton
def test_conv3d_side_by_side_rows(monkeypatch):
    # table 3 of bench_conv3d.py on a small volume in the interpreter: one row per shape the kernel takes (a
    # 1×1×1 shortcut; 8→8 3×3×3 stays with cuDNN), this tree's kernel against a copy of itself
    from bench import bench_conv3d as bc

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(bc, "refiners", lambda device, tiny: [("toy", None, None)])
    monkeypatch.setattr(bc, "conv_shapes", lambda model, inputs: [(16, 8, 1, (2, 2, 4)), (8, 8, 3, (4, 4, 4))])
    variant = ab.load_variant("conv3d_copy", REPO / "kernels" / "conv3d.py")
    rows = [r for r in bc.side_by_side(variant, bc.torch.device("cpu"), tiny=True) if r.startswith("| toy")]
    assert len(rows) == 1 and rows[0].startswith("| toy | 16→8, 1 | 2×2×4 |")
    assert rows[0].endswith("| 0.0e+00 |")  # the same kernel: the same outputs


def test_conv3d_variant_must_exist(monkeypatch, tmp_path):
    from bench import bench_conv3d as bc

    monkeypatch.setattr("sys.argv", ["bench_conv3d.py", "--variant", str(tmp_path / "none.py")])
    with pytest.raises(SystemExit) as e:
        bc.main()
    assert "no such file; give a copy of kernels/conv3d.py" in str(e.value)


@pytest.mark.triton
def test_refiner_count_ops_counts_each_cube_on_the_cpu():
    """bench/refiner_layout.py --count-ops: one row a refiner; the official UNet's 47 GroupNorms each launch
    the stats and apply kernels once, and the ops inside them are counted apart from the rest."""
    import re

    from bench import refiner_layout

    rows = [r for r in refiner_layout.count_ops() if r.startswith("| 1024") or r.startswith("| 512")]
    assert [r.split(" | ")[0] for r in rows] == ["| 1024 sign", "| 512"]
    for r in rows:
        total, norm, convs = (int(x) for x in r.split(" | ")[1:4])
        assert total > norm > 0 and convs > 0
        assert re.search(r"_stats_kernel 47\b", r) and re.search(r"_apply_kernel 47\b", r)
    assert "_adaptive_filter_kernel 9" in rows[1]
