"""The compact manifest copy the pack ships equals the manifest TSVs, and the configs equal the release's config.json.

The TSVs and config files are data from the original release, kept in tests/data/upstream/ (see docs/TESTING.md).
"""

import json
from dataclasses import fields, replace
from pathlib import Path

import pytest

from s2core.config import ReleaseConfig, official_v1_0, tiny_release
from s2core.manifest import known_parts, manifest, read_manifest_tsv

IGNORED_PARAMS = {"use_checkpoint"}  # original constructor arguments that do not change inference results


def release_from_json(path: Path, name: str | None = None) -> ReleaseConfig:
    """An official-format config (`{component: {target, params}}`) as a ReleaseConfig; a parameter our
    config classes lack is a failure, so a renamed or new field cannot slip past the comparison."""
    raw = json.loads(Path(path).read_text())
    base = ReleaseConfig()
    comps = {}
    for comp in (f.name for f in fields(ReleaseConfig) if f.name != "name" and f.name in raw):
        default = getattr(base, comp)
        params = dict(raw[comp].get("params", {}))
        if comp == "refiner_1024" or raw[comp].get("target", "").endswith("_sign"):
            params.setdefault("sign", True)
        known = {f.name for f in fields(default)}
        unknown = set(params) - known - IGNORED_PARAMS
        assert not unknown, f"{type(default).__name__} has no field(s) {sorted(unknown)}"
        comps[comp] = replace(
            default, **{k: tuple(v) if isinstance(v, list) else v for k, v in params.items() if k in known}
        )
    return replace(base, name=name or Path(path).stem, **comps)


def test_compact_manifests_equal_tsvs(manifests_dir):
    tsvs = sorted(manifests_dir.rglob("*.tsv"))
    assert len(tsvs) == 11
    keys = [t.relative_to(manifests_dir).with_suffix("").as_posix() for t in tsvs]
    assert known_parts() == sorted(keys)
    for t, k in zip(tsvs, keys):
        assert manifest(k) == read_manifest_tsv(t), k


def test_manifest_entry_counts_match_headers(manifests_dir):
    # every TSV header states "entries: N"; the parser must see exactly N rows
    for t in manifests_dir.rglob("*.tsv"):
        header = t.read_text().splitlines()[0]
        n = int(header.rsplit("entries:", 1)[1].split()[0])
        assert len(read_manifest_tsv(t)) == n, t.name


def test_release_config_equals_official_json(upstream_dir):
    up = upstream_dir
    assert release_from_json(up / "config.json", name="v1.1") == ReleaseConfig()
    assert replace(release_from_json(up / "config_v1_0.json"), name="v1.0") == official_v1_0()
    raw = json.loads((up / "config.json").read_text())
    cfg = ReleaseConfig()
    assert cfg.sparse_dit_1024.factor == raw["sparse_dit_1024"]["params"]["factor"] == 0.5
    assert cfg.sparse_scheduler_1024.shift == 8.0 and cfg.dense_scheduler.shift == 6.0
    assert cfg.sparse_vae_1024.chunk_size == 4 and cfg.refiner_1024.sign and not cfg.refiner.sign


def test_unknown_config_field_fails_the_comparison(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"dense_dit": {"target": "x", "params": {"num_blocks": 2, "warp_factor": 9}}}))
    with pytest.raises(AssertionError, match="warp_factor"):
        release_from_json(p)


def test_tiny_release_keeps_the_code_paths():
    t = tiny_release()
    assert t.sparse_dit_512.num_heads % t.sparse_dit_512.num_kv_heads == 0
    assert t.sparse_vae_1024.chunk_size > 1 and t.refiner_1024.sign
    assert t.dense_dit.model_channels == t.dense_dit.cond_channels == t.dense_image_encoder.embed_dim
