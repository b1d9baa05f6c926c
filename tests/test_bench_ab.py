"""bench/ab_compressed.py's own logic: loading a variant file, the verdict, and its refusals (no kernel runs here)."""

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
