"""Regenerate s2core/data/manifests.json from the manifest TSVs (tests/data/upstream/manifests/*.tsv).

python tools/make_manifests.py [--manifests DIR]
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from s2core.manifest import read_manifest_tsv  # noqa: E402


def build(root: Path) -> dict:
    table = {}
    for tsv in sorted(root.rglob("*.tsv")):
        key = tsv.relative_to(root).with_suffix("").as_posix()
        table[key] = [[s.name, list(s.shape), s.dtype] for s in read_manifest_tsv(tsv)]
    return table


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifests", type=Path, default=REPO / "tests" / "data" / "upstream" / "manifests")
    args = ap.parse_args()
    out = REPO / "s2core" / "data" / "manifests.json"
    out.write_text(json.dumps(build(args.manifests), separators=(",", ":")) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes)")
