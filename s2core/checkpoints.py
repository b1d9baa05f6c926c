"""Finding, downloading, loading and checking the official Direct3D-S2 weights.

The release (SPEC.md §1) is the HF model repo `wushuang98/Direct3D-S2`, sub-folder
`direct3d-s2-v-1-1` (or `-v-1-0`), holding five `torch.save` pickles of `{part: state_dict}`:

| file                      | parts        | manifest keys                               |
|---------------------------|--------------|---------------------------------------------|
| `model_dense.ckpt`        | `vae`, `dit` | `model_dense.vae`, `model_dense.dit`        |
| `model_sparse_512.ckpt`   | `vae`, `dit` | `model_sparse_512.vae`, `model_sparse_512.dit` |
| `model_sparse_1024.ckpt`  | `vae`, `dit` | `model_sparse_1024.vae`, `model_sparse_1024.dit` |
| `model_refiner.ckpt`      | `refiner`    | `model_refiner.refiner`                     |
| `model_refiner_1024.ckpt` | `refiner`    | `model_refiner_1024.refiner`                |

The image encoder (DINOv2 ViT-L/14 + 4 registers) is not in the release: we take the torch-hub file
`dinov2_vitl14_reg4_pretrain.pth` when the user has it, else download HF
`facebook/dinov2-with-registers-large` (`model.safetensors`, the HF key layout `dinov2.py` also reads).

Where weights are looked for, in order: an explicit folder, ComfyUI's `models/direct3d_s2/<variant>/`
(the nodes pass it; this module never imports ComfyUI), then the Hugging Face cache / a resumable
download (skipped when `allow_download=False` or `HF_HUB_OFFLINE=1`). Nothing here touches the network
at import time.

`.ckpt` files load with `torch.load(weights_only=True)`: a pickle that needs anything beyond tensors
and plain containers is refused, never executed. `.safetensors` files made by
`convert_to_safetensors` hold every part in one file with keys prefixed `<part>.`.
"""
from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .manifest import TensorSpec, manifest

log = logging.getLogger(__name__)

OFFICIAL_REPO = "wushuang98/Direct3D-S2"
VARIANT_FOLDERS = {"v1.1": "direct3d-s2-v-1-1", "v1.0": "direct3d-s2-v-1-0"}
FILE_PARTS: dict[str, tuple[str, ...]] = {
    "model_dense": ("vae", "dit"),
    "model_sparse_512": ("vae", "dit"),
    "model_sparse_1024": ("vae", "dit"),
    "model_refiner": ("refiner",),
    "model_refiner_1024": ("refiner",),
}
# Which release files each pipeline stage needs.
STAGE_FILES: dict[str, tuple[str, ...]] = {
    "dense": ("model_dense",),
    "sparse_512": ("model_sparse_512", "model_refiner"),
    "sparse_1024": ("model_sparse_1024", "model_refiner_1024"),
}
DINOV2_HUB_FILE = "dinov2_vitl14_reg4_pretrain.pth"
DINOV2_HF_REPO = "facebook/dinov2-with-registers-large"
DINOV2_HF_FILE = "model.safetensors"
DINOV2_HF_FOLDER = "dinov2-with-registers-large"  # downloads land in models_dir/<this>/model.safetensors


def manifest_key(stem: str, part: str, variant: str = "v1.1") -> str:
    """`model_sparse_512`, `dit`, `v1.0` -> `v1_0/model_sparse_512.dit` (v1.0 differs only in the sparse DiTs)."""
    key = f"{stem}.{part}"
    if variant == "v1.0" and stem.startswith("model_sparse") and part == "dit":
        return "v1_0/" + key
    return key


def _numel(specs: list[TensorSpec]) -> int:
    n = 0
    for s in specs:
        k = 1
        for d in s.shape:
            k *= d
        n += k
    return n


def approx_file_size(stem: str, variant: str = "v1.1") -> tuple[int, int]:
    """(fp16, fp32) byte sizes of a release file's tensors; the hub's storage dtype is not known here."""
    n = sum(_numel(manifest(manifest_key(stem, p, variant))) for p in FILE_PARTS[stem])
    return 2 * n, 4 * n


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


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


def diff_state_dict(state_dict: Mapping[str, torch.Tensor],
                    expected: list[TensorSpec] | Mapping[str, torch.Tensor] | str) -> StateDictDiff:
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
    raise ValueError(f"`{file_label}` does not match `{key}`: {what}; re-download it or choose the right "
                     f"file for this stage.\n{d.report()}")


# ---------------------------------------------------------------------------------------------
# Loading files

def _load_ckpt(path: Path) -> dict:
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (PK\x03\x04) or, in the legacy format, a pickle (0x80 protocol byte)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        raise ValueError(f"`{path}` is not a readable PyTorch checkpoint (it starts with {head!r}, not a "
                         f"torch.save archive); it may be an error page or a truncated download — delete it and "
                         f"download it again.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported" in msg or "global" in msg.lower():
            raise ValueError(f"`{path}` contains Python objects that would need unsafe unpickling to load; it "
                             f"was refused and nothing in it was run — use the official checkpoint or a "
                             f".safetensors file.") from None
        raise ValueError(f"`{path}` is not a readable PyTorch checkpoint ({msg.splitlines()[0][:120]}); "
                         f"it may be truncated or corrupt — delete it and download it again.") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as e:
        raise ValueError(f"`{path}` is not a readable PyTorch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else 'no details'}); it may be truncated or "
                         f"corrupt — delete it and download it again.") from None
    if not isinstance(obj, dict):
        raise ValueError(f"`{path}` holds a {type(obj).__name__}, not a dictionary of weights; it is not a "
                         f"Direct3D-S2 checkpoint.")
    return obj


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        flat = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"`{path}` is not a readable .safetensors file ({str(e)[:120]}); it may be truncated "
                         f"or corrupt — delete it and convert or download it again.") from None
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
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"`{path}` is not a readable .safetensors file ({str(e)[:120]}); it may be truncated "
                             f"or corrupt — delete it and download it again.") from None
    else:
        sd = _load_ckpt(path)
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"`{path}` does not hold a DINOv2 state dict; delete it and download "
                         f"{DINOV2_HUB_FILE} again.")
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
        raise ValueError(f"`{path}` is a flat state dict without the `vae`/`dit`/`refiner` parts of a "
                         f"Direct3D-S2 release file; it is not a Direct3D-S2 checkpoint.")
    return parts


def load_part(path: str | Path, part: str, key: str | None = None) -> dict[str, torch.Tensor]:
    """One part of a release file, checked against its manifest when `key` (e.g. `model_dense.vae`) is given."""
    path = Path(path)
    parts = load_checkpoint(path)
    if part not in parts:
        have = ", ".join(sorted(parts)) or "none"
        raise ValueError(f"`{path.name}` has no `{part}` weights (it has: {have}); it is not the right "
                         f"Direct3D-S2 file for this stage.")
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
            raise ValueError(f"`{file_label}` is the Direct3D-S2 {other} release of this file but {selected} is "
                             f"selected: this is the {other} release; choose {other} as the variant, or put the "
                             f"{selected} file there instead.")


def load_release_file(path: str | Path, variant: str = "v1.1") -> dict[str, dict[str, torch.Tensor]]:
    """Load and check every part of an official file, named as released (`model_dense.ckpt`, ...)."""
    path = Path(path)
    stem = path.name.split(".")[0]
    if stem not in FILE_PARTS:
        raise ValueError(f"`{path.name}` is not a Direct3D-S2 release file name (expected one of "
                         f"{', '.join(s + '.ckpt' for s in FILE_PARTS)}).")
    parts = load_checkpoint(path)
    out = {}
    for part in FILE_PARTS[stem]:
        if part not in parts:
            raise ValueError(f"`{path.name}` has no `{part}` weights (it has: {', '.join(sorted(parts)) or 'none'});"
                             f" it is incomplete — download it again.")
        key = manifest_key(stem, part, variant)
        _check_not_other_variant(parts[part], key, path.name)
        check_part(parts[part], key, path.name)
        out[part] = parts[part]
    return out


# ---------------------------------------------------------------------------------------------
# Conversion

def convert_to_safetensors(ckpt_path: str | Path, out_path: str | Path | None = None,
                           dtype: torch.dtype | None = torch.float16) -> Path:
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
        same = old is not None and old.keys() == flat.keys() and all(
            old[k].dtype == flat[k].dtype and torch.equal(old[k], flat[k]) for k in flat)
        if same:
            return out_path
        raise FileExistsError(f"`{out_path}` already exists with different content; move it away or choose "
                              f"another output name (it was not overwritten).")
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    try:
        save_file(flat, str(tmp), metadata={"source": ckpt_path.name, "format": "direct3d-s2 parts"})
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


# ---------------------------------------------------------------------------------------------
# Finding and downloading

def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _find_local(stem: str, folders: list[Path]) -> Path | None:
    for d in folders:
        for name in (f"{stem}.safetensors", f"{stem}.ckpt"):
            p = d / name
            if p.is_file():
                return p
    return None


def missing_files_message(stems: list[str], variant: str, folder: Path | None, reason: str) -> str:
    """Tell the user exactly which files to put where (names, approximate sizes, source)."""
    where = str(folder) if folder else f"a folder passed as --weights (or ComfyUI's models/direct3d_s2/{variant}/)"
    lines = [f"The Direct3D-S2 {variant} weights are not on this machine and {reason}; put these files in {where}:"]
    sub = VARIANT_FOLDERS[variant]
    for s in stems:
        if s == "dinov2":
            lines.append(f"  {DINOV2_HUB_FILE} (about 1.22 GB; torch-hub DINOv2 ViT-L/14 reg4) — or "
                         f"{DINOV2_HF_FILE} of https://huggingface.co/{DINOV2_HF_REPO} renamed to "
                         f"dinov2_with_registers_large.safetensors")
            continue
        h, f = approx_file_size(s, variant)
        lines.append(f"  {s}.ckpt ({_gb(h)} if stored in fp16, {_gb(f)} in fp32) from "
                     f"https://huggingface.co/{OFFICIAL_REPO}/tree/main/{sub}")
    return "\n".join(lines)


def resolve_weights(variant: str = "v1.1", stages: tuple[str, ...] = ("dense", "sparse_512", "sparse_1024"),
                    local_dir: str | Path | None = None, models_dir: str | Path | None = None,
                    allow_download: bool = True, with_dinov2: bool = True,
                    tqdm_class=None) -> dict[str, Path]:
    """Paths of every file the stages need: `{"model_dense": Path, ..., "dinov2": Path}`.

    `local_dir` wins; then `models_dir/<variant>/` and `models_dir/` (ComfyUI's models/direct3d_s2);
    then the Hugging Face cache or a resumable download into `models_dir/<variant>` (or the HF cache).
    Raises FileNotFoundError naming every missing file, its size and where to put it.
    """
    if variant not in VARIANT_FOLDERS:
        raise ValueError(f"Unknown Direct3D-S2 variant {variant!r}; choose one of {', '.join(VARIANT_FOLDERS)}.")
    unknown = [s for s in stages if s not in STAGE_FILES]
    if unknown:
        raise ValueError(f"Unknown stage(s) {unknown}; choose from {', '.join(STAGE_FILES)}.")
    stems = [s for st in stages for s in STAGE_FILES[st]]
    stems = list(dict.fromkeys(stems))
    folders = []
    if local_dir is not None:
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise FileNotFoundError(f"The weights folder `{local_dir}` does not exist; create it and put the "
                                    f"Direct3D-S2 files there, or choose another folder.")
        folders += [local_dir, local_dir / variant]
    if models_dir is not None:
        m = Path(models_dir)
        folders += [m / variant, m / VARIANT_FOLDERS[variant], m, m / DINOV2_HF_FOLDER]
    found: dict[str, Path] = {}
    for s in stems:
        p = _find_local(s, folders)
        if p is not None:
            found[s] = p
    if with_dinov2:
        for d in folders:
            for name in (DINOV2_HUB_FILE, "dinov2_with_registers_large.safetensors", DINOV2_HF_FILE):
                if (d / name).is_file() and "dinov2" not in found:
                    found["dinov2"] = d / name
    missing = [s for s in stems if s not in found] + (["dinov2"] if with_dinov2 and "dinov2" not in found else [])
    if not missing:
        return found
    offline = _offline()
    root = Path(models_dir) if models_dir is not None else None
    # no network: one quick request says so, instead of huggingface_hub's retries per file (minutes, dozens of
    # log lines); the cache is still searched
    if allow_download and not offline and root is not None:  # a folder problem is worth saying with or without network
        _make_writable_folder(root)
    unreachable = allow_download and not offline and not hub_reachable()
    found.update(_from_hub(missing, variant, root, local_only=offline or not allow_download or unreachable,
                           tqdm_class=tqdm_class))
    target = root / variant if root is not None else local_dir
    still = [s for s in missing if s not in found]
    if still:
        reason = ("downloading is off (HF_HUB_OFFLINE=1)" if offline else
                  "downloading was not allowed" if not allow_download else
                  "the Hugging Face Hub cannot be reached (no network?)" if unreachable else "the download failed")
        raise FileNotFoundError(missing_files_message(still, variant, target, reason))
    return found


def _make_writable_folder(target: Path) -> None:
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"Cannot create the weights folder `{target}` ({e.strerror}); make it "
                              f"writable or choose another models folder.") from None
    if not os.access(target, os.W_OK):
        raise PermissionError(f"The weights folder `{target}` is read-only; make it writable or choose "
                              f"another models folder.")


def hub_reachable(timeout: float = 5.0) -> bool:
    """One request to the Hub's endpoint, no retries: False when it cannot be connected to in `timeout` s.
    Any HTTP answer (even an error status) counts as reachable; proxies are honoured (its own HTTP client)."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session
    except ImportError:  # pragma: no cover
        return True
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as e:  # connection refused, DNS failure, timeout: the same for the user
        log.info("Hugging Face Hub not reachable: %s", e)
        return False
    return True


# raised by a progress class that polls Cancel (ComfyUI's, the pipeline's); matched by name because this
# module never imports ComfyUI
_CANCEL_ERRORS = ("InterruptProcessingException", "Cancelled")


def _from_hub(stems: list[str], variant: str, root: Path | None, local_only: bool, tqdm_class=None) -> dict[str, Path]:
    """Hugging Face cache lookup (local_only) or resumable download; failures leave the stem out.

    With a models folder `root`, files land in `root/direct3d-s2-v-1-1/` (the hub's sub-folder) and
    `root/dinov2-with-registers-large/`; huggingface_hub downloads to a temp name first and resumes
    interrupted downloads, so a complete-looking partial file is never left behind.
    """
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - a requirement, but keep the message clear
        return {}
    out = {}
    for s in stems:
        if s == "dinov2":
            repo, sub, fname = DINOV2_HF_REPO, None, DINOV2_HF_FILE
        else:
            repo, sub, fname = OFFICIAL_REPO, VARIANT_FOLDERS[variant], f"{s}.ckpt"
        kwargs = dict(subfolder=sub, local_files_only=local_only)
        target = None if root is None else (root / DINOV2_HF_FOLDER if s == "dinov2" else root)
        if target is not None and not local_only:
            _make_writable_folder(target)
            kwargs["local_dir"] = target
        if tqdm_class is not None:
            kwargs["tqdm_class"] = tqdm_class
        try:
            p = Path(hf_hub_download(repo, fname, **kwargs))
        except Exception as e:  # offline, not cached, network error: reported by the caller as missing files
            if type(e).__name__ in _CANCEL_ERRORS:  # the progress hook's Cancel must stop the load, not skip a file
                raise
            log.info("could not get %s from %s: %s", fname, repo, e)
            continue
        out[s] = p
    return out
