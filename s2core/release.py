"""What the official Direct3D-S2 release holds, and which manifest describes each of its parts.

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

`s2core.find_weights` finds or downloads these files; `s2core.checkpoints` reads and checks them.
"""

from __future__ import annotations

from .manifest import TensorSpec, manifest

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
