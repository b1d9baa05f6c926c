"""State-dict manifests: the expected (name, shape, dtype) of every tensor of a checkpoint part.

The truth is `tests/data/upstream/manifests/<file>.<part>.tsv` (one row per tensor: name, shape, dtype, written
from the original code's freshly built modules). `s2core/data/manifests.json` is a compact copy generated from
them by `tools/make_manifests.py`; the pack needs it at run time to explain a wrong checkpoint before any model
is built, and `tests/test_manifests.py` checks that it equals the TSVs.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_COMPACT = Path(__file__).parent / "data" / "manifests.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float16"


def read_manifest_tsv(path: str | Path) -> list[TensorSpec]:
    """Parse one manifest TSV (comment lines start with '#', then a `name shape dtype` header)."""
    specs = []
    for line in Path(path).read_text().splitlines():
        if not line or line.startswith("#") or line.startswith("name\t"):
            continue
        name, shape, dtype = line.split("\t")
        specs.append(TensorSpec(name, tuple(ast.literal_eval(shape)), dtype))
    return specs


@lru_cache(maxsize=None)
def _compact() -> dict:
    return json.loads(_COMPACT.read_text())


def known_parts() -> list[str]:
    """Every `<file>.<part>` with a manifest, e.g. `model_sparse_512.dit` (v1.1 unless prefixed `v1_0/`)."""
    return sorted(_compact())


def manifest(key: str) -> list[TensorSpec]:
    """The manifest of one checkpoint part, e.g. `manifest("model_dense.vae")`."""
    table = _compact()
    if key not in table:
        raise KeyError(f"No manifest named {key!r}; known: {', '.join(known_parts())}.")
    return [TensorSpec(n, tuple(s), d) for n, s, d in table[key]]
