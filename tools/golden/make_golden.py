"""Record golden fixtures from the ORIGINAL Direct3D-S2 code (run with the venv that can import it).

    UPSTREAM_VENV/bin/python tools/golden/make_golden.py --upstream UPSTREAM/Direct3D-S2 \\
        --dinov2 UPSTREAM/dinov2 [--only NAME ...] [--out tests/golden] [--list]

Generators are the modules `tools/golden/gen_*.py`; each exposes `COMPONENTS: dict[str, callable]` keyed
`<component>__<config>`. A callable returns `(tensors, meta)`: tensors named `in.*`, `out.*` or `mid.*`,
and the generator-side sidecar fields (`harness.module_meta`). This driver adds the rest of the
sidecar contract (tests/golden/README.md) and writes `<out>/<component>__<config>.safetensors` + `.json`.
`--only` takes full names or prefixes (`dense_vae` runs every `dense_vae__*`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import harness  # noqa: E402

log = logging.getLogger("make_golden")

REQUIRED = (
    "component",
    "config_name",
    "config",
    "seed",
    "weights_specs",
    "input_seed",
    "dtype",
    "device",
    "upstream_commit",
    "command",
    "date",
    "stand_ins",
    "env",
    "tensors",
    "notes",
)


def discover() -> dict:
    components = {}
    for path in sorted(HERE.glob("gen_*.py")):
        spec = importlib.util.spec_from_file_location(f"golden_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for name, fn in getattr(mod, "COMPONENTS", {}).items():
            assert "__" in name, f"{path.name}: component key {name!r} must be '<component>__<config>'"
            assert name not in components, f"{path.name}: duplicate component key {name!r}"
            components[name] = (path.name, fn)
    return components


def finish_meta(name: str, meta: dict, tensors: dict, commit: str, command: str) -> dict:
    component, config_name = name.split("__", 1)
    bad = [k for k in tensors if not k.startswith(("in.", "out.", "mid."))]
    assert not bad, f"{name}: tensor names must start with in./out./mid., got {bad}"
    missing = sorted(set(tensors) - set(meta.get("tensors", {})))
    assert not missing, f"{name}: tensors without a description in meta['tensors']: {missing}"
    extra = sorted(set(meta.get("tensors", {})) - set(tensors))
    assert not extra, f"{name}: described tensors that were not produced: {extra}"
    used = list(dict.fromkeys(list(meta.get("stand_ins", [])) + ["placeholders"]))
    out = {
        "component": component,
        "config_name": config_name,
        "config": meta["config"],
        "seed": meta.get("seed"),
        "weights_specs": meta.get("weights_specs", []),
        "input_seed": meta.get("input_seed"),
        "dtype": meta["dtype"],
        "device": "cpu",
        "upstream_commit": commit,
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "stand_ins": {k: harness.STAND_INS.get(k, k) for k in used},
        "env": dict(harness.ENV),
        "tensors": meta["tensors"],
        "notes": meta.get("notes", ""),
    }
    for k, v in meta.items():  # generator extras (e.g. "tolerance", "threshold") are kept, never override
        out.setdefault(k, v)
    assert all(k in out for k in REQUIRED)
    return out


def write_fixture(out_dir: Path, name: str, tensors: dict, meta: dict) -> int:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / name
    tmp_st, tmp_js = base.with_suffix(".safetensors.tmp"), base.with_suffix(".json.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp_st))
    tmp_js.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp_st, str(base) + ".safetensors")
    os.replace(tmp_js, str(base) + ".json")
    return (Path(str(base) + ".safetensors")).stat().st_size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, help="checkout of DreamTechAI/Direct3D-S2")
    ap.add_argument("--dinov2", default=None, help="checkout of facebookresearch/dinov2 (for the DINOv2 fixtures)")
    ap.add_argument("--only", nargs="*", default=None, help="fixture names or prefixes to (re)generate")
    ap.add_argument("--out", default=str(REPO / "tests" / "golden"))
    ap.add_argument("--list", action="store_true", help="list the generators' fixture names and exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    harness.install_stand_ins(args.upstream, args.dinov2)
    harness.ARGS = args  # generators read e.g. harness.ARGS.dinov2
    components = discover()
    if args.list:
        print("\n".join(f"{n}  ({src})" for n, (src, _) in components.items()))
        return 0
    names = [n for n in components if args.only is None or any(n == o or n.startswith(o) for o in args.only)]
    if args.only and not names:
        ap.error(f"no fixture matches {args.only}; known: {', '.join(components)}")

    commit = harness.upstream_commit(args.upstream)
    command = "python tools/golden/make_golden.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    for name in names:
        t0 = time.time()
        tensors, meta = components[name][1]()
        meta = finish_meta(name, meta, tensors, commit, command)
        size = write_fixture(Path(args.out), name, tensors, meta)
        log.info("%-40s %8.1f KB  %6.1f s", name, size / 1024, time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
