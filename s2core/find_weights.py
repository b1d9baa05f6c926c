"""Where the weight files are: an explicit folder, ComfyUI's models folder, the Hugging Face cache or a download.

`resolve_weights` returns the path of every file the chosen stages need (`s2core.release` says which), looked
for in order: an explicit folder, ComfyUI's `models/direct3d_s2/<variant>/` (the nodes pass it; this module
never imports ComfyUI), then the Hugging Face cache / a resumable download (skipped when `allow_download=False`
or `HF_HUB_OFFLINE=1`). A missing file is named with its size and where to put it. Nothing here touches the
network at import time; reading the files is `s2core.checkpoints`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .release import (
    DINOV2_HF_FILE,
    DINOV2_HF_FOLDER,
    DINOV2_HF_REPO,
    DINOV2_HUB_FILE,
    OFFICIAL_REPO,
    STAGE_FILES,
    VARIANT_FOLDERS,
    approx_file_size,
)

log = logging.getLogger(__name__)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


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
            lines.append(
                f"  {DINOV2_HUB_FILE} (about 1.22 GB; torch-hub DINOv2 ViT-L/14 reg4) — or "
                f"{DINOV2_HF_FILE} of https://huggingface.co/{DINOV2_HF_REPO} renamed to "
                f"dinov2_with_registers_large.safetensors"
            )
            continue
        h, f = approx_file_size(s, variant)
        lines.append(
            f"  {s}.ckpt ({_gb(h)} if stored in fp16, {_gb(f)} in fp32) from "
            f"https://huggingface.co/{OFFICIAL_REPO}/tree/main/{sub}"
        )
    return "\n".join(lines)


def resolve_weights(
    variant: str = "v1.1",
    stages: tuple[str, ...] = ("dense", "sparse_512", "sparse_1024"),
    local_dir: str | Path | None = None,
    models_dir: str | Path | None = None,
    allow_download: bool = True,
    with_dinov2: bool = True,
    tqdm_class=None,
) -> dict[str, Path]:
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
            raise FileNotFoundError(
                f"The weights folder `{local_dir}` does not exist; create it and put the "
                f"Direct3D-S2 files there, or choose another folder."
            )
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
    found.update(
        _from_hub(
            missing, variant, root, local_only=offline or not allow_download or unreachable, tqdm_class=tqdm_class
        )
    )
    target = root / variant if root is not None else local_dir
    still = [s for s in missing if s not in found]
    if still:
        reason = (
            "downloading is off (HF_HUB_OFFLINE=1)"
            if offline
            else "downloading was not allowed"
            if not allow_download
            else "the Hugging Face Hub cannot be reached (no network?)"
            if unreachable
            else "the download failed"
        )
        raise FileNotFoundError(missing_files_message(still, variant, target, reason))
    return found


def _make_writable_folder(target: Path) -> None:
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(
            f"Cannot create the weights folder `{target}` ({e.strerror}); make it "
            f"writable or choose another models folder."
        ) from None
    if not os.access(target, os.W_OK):
        raise PermissionError(
            f"The weights folder `{target}` is read-only; make it writable or choose another models folder."
        )


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
