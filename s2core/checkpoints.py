"""Reading and checking the Direct3D-S2 weight files: a release part, the DINOv2 backbone, safetensors conversion.

`load_part(path, part, key)` is what model loading calls: it reads a release file (`s2core.release` lists
what each holds) and checks the part's names and shapes against its manifest, so a wrong file is explained
in one sentence plus a grouped diff before any model is built; a file of the other release (v1.0 / v1.1)
is named as such.

`.ckpt` files load with `torch.load(weights_only=True)`: a pickle that needs anything beyond tensors
and plain containers is refused, never executed. `.safetensors` files made by
`convert_to_safetensors` hold every part in one file with keys prefixed `<part>.`. Finding or downloading
the files is `s2core.find_weights`.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .manifest import TensorSpec, manifest
from .release import DINOV2_HUB_FILE, VARIANT_FOLDERS, manifest_key

# ---------------------------------------------------------------------------------------------
# Readable state-dict diffs


@dataclass
class StateDictDiff:
    """Difference between a loaded state dict and the expected names/shapes."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # name, expected, found

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def report(self, limit: int = 20) -> str:
        """Grouped by top-level module prefix, first `limit` entries of each kind."""
        lines = []
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if not items:
                continue
            groups: dict[str, int] = defaultdict(int)
            for k in items:
                groups[k.split(".")[0]] += 1
            summary = ", ".join(f"{g} ({n})" for g, n in sorted(groups.items()))
            lines.append(f"{len(items)} {title} key(s), by module: {summary}")
            lines += [f"  {title}: {k}" for k in items[:limit]]
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit} more")
        if self.shape_mismatch:
            lines.append(f"{len(self.shape_mismatch)} shape mismatch(es):")
            lines += [f"  {k}: expected {tuple(e)}, found {tuple(f)}" for k, e, f in self.shape_mismatch[:limit]]
            if len(self.shape_mismatch) > limit:
                lines.append(f"  ... and {len(self.shape_mismatch) - limit} more")
        return "\n".join(lines)


def diff_state_dict(
    state_dict: Mapping[str, torch.Tensor], expected: list[TensorSpec] | Mapping[str, torch.Tensor] | str
) -> StateDictDiff:
    """Compare names and shapes (not dtypes: loading casts) with a manifest key, specs or a reference dict."""
    if isinstance(expected, str):
        expected = manifest(expected)
    if isinstance(expected, Mapping):
        exp = {k: tuple(v.shape) for k, v in expected.items()}
    else:
        exp = {s.name: tuple(s.shape) for s in expected}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    return StateDictDiff(
        missing=[k for k in exp if k not in got],
        unexpected=[k for k in got if k not in exp],
        shape_mismatch=[(k, exp[k], got[k]) for k in exp if k in got and exp[k] != got[k]],
    )


def check_part(state_dict: Mapping[str, torch.Tensor], key: str, file_label: str) -> None:
    """Raise ValueError with a one-sentence summary (plus the grouped diff) unless names/shapes match."""
    d = diff_state_dict(state_dict, key)
    if d.ok:
        return
    n_exp = len(manifest(key))
    if len(d.missing) == n_exp:
        what = f"none of its {len(state_dict)} weights belong to Direct3D-S2 `{key}`, so it is a checkpoint of another model"
    elif d.missing:
        what = f"it is missing {len(d.missing)} weights (first: `{d.missing[0]}`)"
    elif d.shape_mismatch:
        k, e, f = d.shape_mismatch[0]
        what = f"{len(d.shape_mismatch)} weights have the wrong shape (first: `{k}` is {tuple(f)}, expected {tuple(e)})"
    else:
        what = f"it has {len(d.unexpected)} unknown weights (first: `{d.unexpected[0]}`)"
    raise ValueError(
        f"`{file_label}` does not match `{key}`: {what}; re-download it or choose the right "
        f"file for this stage.\n{d.report()}"
    )


# ---------------------------------------------------------------------------------------------
# Loading files


def _load_ckpt(path: Path) -> dict:
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (PK\x03\x04) or, in the legacy format, a pickle (0x80 protocol byte)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        raise ValueError(
            f"`{path}` is not a readable PyTorch checkpoint (it starts with {head!r}, not a "
            f"torch.save archive); it may be an error page or a truncated download — delete it and "
            f"download it again."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported" in msg or "global" in msg.lower():
            raise ValueError(
                f"`{path}` contains Python objects that would need unsafe unpickling to load; it "
                f"was refused and nothing in it was run — use the official checkpoint or a "
                f".safetensors file."
            ) from None
        raise ValueError(
            f"`{path}` is not a readable PyTorch checkpoint ({msg.splitlines()[0][:120]}); "
            f"it may be truncated or corrupt — delete it and download it again."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as e:
        raise ValueError(
            f"`{path}` is not a readable PyTorch checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120] if str(e) else 'no details'}); it may be truncated or "
            f"corrupt — delete it and download it again."
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(
            f"`{path}` holds a {type(obj).__name__}, not a dictionary of weights; it is not a Direct3D-S2 checkpoint."
        )
    return obj


def _read_safetensors(path: Path, fix: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"`{path}` is not a readable .safetensors file ({str(e)[:120]}); it may be truncated or corrupt — {fix}."
        ) from None


def _load_safetensors(path: Path) -> dict:
    flat = _read_safetensors(path, "delete it and convert or download it again")
    parts: dict[str, dict] = defaultdict(dict)
    for k, v in flat.items():
        part, _, rest = k.partition(".")
        parts[part][rest] = v
    return dict(parts)


def load_dinov2(path: str | Path) -> dict[str, torch.Tensor]:
    """The DINOv2 state dict of a torch-hub `.pth` (safely, as `.ckpt` files) or an HF `.safetensors`; an
    unreadable, truncated or unsafe file is named with what to do, never a raw traceback."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`{path}` does not exist; put {DINOV2_HUB_FILE} there or choose another folder.")
    if path.stat().st_size == 0:
        raise ValueError(f"`{path}` is empty (0 bytes); delete it and download it again.")
    if path.suffix == ".safetensors":
        sd = _read_safetensors(path, "delete it and download it again")
    else:
        sd = _load_ckpt(path)
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"`{path}` does not hold a DINOv2 state dict; delete it and download {DINOV2_HUB_FILE} again.")
    return sd


def load_checkpoint(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Load a release file as `{part: state_dict}` (`.ckpt` safely, or our `.safetensors`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`{path}` does not exist; put the Direct3D-S2 weights there or choose another folder.")
    if path.stat().st_size == 0:
        raise ValueError(f"`{path}` is empty (0 bytes); delete it and download it again.")
    obj = _load_safetensors(path) if path.suffix == ".safetensors" else _load_ckpt(path)
    parts = {}
    for name, sd in obj.items():
        if isinstance(sd, Mapping) and all(isinstance(v, torch.Tensor) for v in sd.values()):
            parts[str(name)] = dict(sd)
    if not parts and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"`{path}` is a flat state dict without the `vae`/`dit`/`refiner` parts of a "
            f"Direct3D-S2 release file; it is not a Direct3D-S2 checkpoint."
        )
    return parts


def load_part(path: str | Path, part: str, key: str | None = None) -> dict[str, torch.Tensor]:
    """One part of a release file, checked against its manifest when `key` (e.g. `model_dense.vae`) is given."""
    path = Path(path)
    parts = load_checkpoint(path)
    if part not in parts:
        have = ", ".join(sorted(parts)) or "none"
        raise ValueError(
            f"`{path.name}` has no `{part}` weights (it has: {have}); it is not the right "
            f"Direct3D-S2 file for this stage."
        )
    sd = parts[part]
    if key is not None:
        _check_not_other_variant(sd, key, path.name)
        check_part(sd, key, path.name)
    return sd


def _check_not_other_variant(state_dict: Mapping[str, torch.Tensor], key: str, file_label: str) -> None:
    """A file of the other release (v1.0 vs v1.1 differ in the sparse DiTs) gets its own sentence rather than
    the 'missing N weights' diff; it is recognised by its names and shapes matching the other manifest."""
    if diff_state_dict(state_dict, key).ok:
        return
    stem, _, part = key.removeprefix("v1_0/").partition(".")
    selected = "v1.0" if key.startswith("v1_0/") else "v1.1"
    for other in VARIANT_FOLDERS:
        okey = manifest_key(stem, part, other)
        if okey != key and diff_state_dict(state_dict, okey).ok:
            raise ValueError(
                f"`{file_label}` is the Direct3D-S2 {other} release of this file but {selected} is "
                f"selected: this is the {other} release; choose {other} as the variant, or put the "
                f"{selected} file there instead."
            )


# ---------------------------------------------------------------------------------------------
# Conversion


def convert_to_safetensors(
    ckpt_path: str | Path, out_path: str | Path | None = None, dtype: torch.dtype | None = torch.float16
) -> Path:
    """One-time conversion of a release `.ckpt` to `.safetensors` (fp16 by default) for memory-mapped loading.

    Refuses to overwrite an existing file with different content; writes to a temp file and renames.
    """
    from safetensors.torch import load_file, save_file

    ckpt_path = Path(ckpt_path)
    out_path = Path(out_path) if out_path else ckpt_path.with_suffix(".safetensors")
    parts = load_checkpoint(ckpt_path)
    flat = {}
    for part, sd in parts.items():
        for k, v in sd.items():
            v = v.detach()
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            flat[f"{part}.{k}"] = v.contiguous()
    if out_path.exists():
        try:
            old = load_file(str(out_path))
        except Exception:
            old = None
        same = (
            old is not None
            and old.keys() == flat.keys()
            and all(old[k].dtype == flat[k].dtype and torch.equal(old[k], flat[k]) for k in flat)
        )
        if same:
            return out_path
        raise FileExistsError(
            f"`{out_path}` already exists with different content; move it away or choose "
            f"another output name (it was not overwritten)."
        )
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    try:
        save_file(flat, str(tmp), metadata={"source": ckpt_path.name, "format": "direct3d-s2 parts"})
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path
