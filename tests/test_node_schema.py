"""Snapshot of every node's inputs (types, defaults, ranges, options), outputs and flags.

A change to a node's interface breaks users' saved workflows, so it must be deliberate: if this test
fails and the change is intended, regenerate the snapshot with
`python tests/test_node_schema.py --update` and commit it with the change.
"""

import importlib.util
import json
import sys
from dataclasses import asdict
from pathlib import Path

SNAPSHOT = Path(__file__).parent / "data" / "node_schema.json"
_spec = importlib.util.spec_from_file_location("d3ds2_stub_loader", Path(__file__).parent / "stubs" / "pack.py")
stubs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stubs)


def _input(i) -> dict:
    """An `In` as plain data: fields left at their empty default (None, (), False) are omitted."""
    out = {}
    for k, v in asdict(i).items():
        if v is None or (isinstance(v, tuple) and not v) or (v is False and k != "default"):
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def _schema(n, category: str) -> dict:
    return {
        "display_name": n.display_name,
        "category": category,
        "output_node": n.output_node,
        "hidden_prompt": n.hidden_prompt,
        "inputs": [_input(i) for i in n.inputs],
        "outputs": [{"type": o.type, "name": o.name} for o in n.outputs],
    }


def current_schema() -> dict:
    pack = stubs.load_pack(v3=False)
    try:
        nodes = sys.modules[f"{stubs.NAME}.nodes"].NODES
        category = sys.modules[f"{stubs.NAME}.nodes._spec"].CATEGORY
        return {n.node_id: _schema(n, category) for n in nodes}
    finally:
        stubs.unload()
        del pack


def test_node_schema_unchanged():
    expected = json.loads(SNAPSHOT.read_text())
    got = json.loads(json.dumps(current_schema()))
    for node_id in sorted(set(expected) | set(got)):
        assert node_id in got, f"node {node_id} was removed"
        assert node_id in expected, f"node {node_id} is new: update tests/data/node_schema.json"
        assert got[node_id] == expected[node_id], (
            f"{node_id} changed its interface; if intended run `python tests/test_node_schema.py --update`"
        )


if __name__ == "__main__" and "--update" in sys.argv:
    SNAPSHOT.write_text(json.dumps(current_schema(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT}")
