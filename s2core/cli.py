"""Command line: `python -m s2core IMAGE [--mask MASK] -o OUT.glb [--resolution 512|1024] [--seed N] ...`.

Runs `pipeline.image_to_mesh` with the official defaults and writes one mesh file (.glb .obj .ply .stl,
written to a temporary name and renamed, so Ctrl-C or an error never leaves a partial file). Progress
goes to stderr as a plain line per stage. `--demo` uses the `tiny-random` model: no download, runs on a
CPU in seconds, and its meshes are meaningless (random weights) — it only shows that the chain works.
Without the weights and without network it prints which files to put where and exits with status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

from . import pipeline

EXIT_MISSING_WEIGHTS = 2
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m s2core", description="Direct3D-S2: one image in, one mesh out.")
    p.add_argument("image", type=Path, help="picture of one object (PNG with transparency, or give --mask)")
    p.add_argument("--mask", type=Path, help="object mask image (white = object); default: the image's alpha")
    p.add_argument("-o", "--output", type=Path, required=True, help="output mesh: .glb, .obj, .ply or .stl")
    p.add_argument("--resolution", type=int, choices=(512, 1024), default=None,
                   help="1024 (default, about 16 GB of GPU memory) or 512 (faster, about 10 GB); --demo defaults to 512")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--steps", type=str, default=None, metavar="D,S512,S1024",
                   help=f"sampling steps per stage (default {pipeline.DENSE_STEPS},{pipeline.SPARSE_512_STEPS},"
                        f"{pipeline.SPARSE_1024_STEPS})")
    p.add_argument("--guidance", type=float, default=pipeline.GUIDANCE, help="classifier-free guidance (default 7)")
    p.add_argument("--mc-threshold", type=float, default=pipeline.MC_THRESHOLD, help="surface iso-level (0.2)")
    p.add_argument("--no-remove-interior", action="store_true", help="skip the 1024 interior-removal refiner")
    p.add_argument("--remesh", action="store_true", help="simplify the mesh (removes 95%% of the faces)")
    p.add_argument("--colour", "--color", action="store_true",
                   help="paint vertex colours from the image (camera found from the silhouette; .glb/.ply/.obj keep them)")
    p.add_argument("--weights", type=Path, help="folder holding the Direct3D-S2 files (default: HF cache/download)")
    p.add_argument("--variant", choices=("v1.1", "v1.0"), default="v1.1", help="official release (default v1.1)")
    p.add_argument("--no-download", action="store_true", help="never download; only use files on disk")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--keep-weights-on-gpu", action="store_true",
                   help="keep every network on the GPU once used (faster; needs ~6.4 GB more VRAM). Default: "
                        "only the running stage's networks are on the GPU")
    p.add_argument("--max-vram-gb", type=float, default=None, metavar="GIB",
                   help="keep networks on the GPU while their weights fit in GIB (least recently used ones go "
                        "back to the CPU); activations need room on top")
    p.add_argument("--demo", action="store_true",
                   help="tiny random model: no download, seconds on a CPU, meaningless mesh (smoke test); "
                        "defaults to 512 without the refiners, which are slow on a CPU even when tiny")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (default: refuse)")
    p.add_argument("--no-refine-512", action="store_true",
                   help="skip the 512 refiner (faster on a CPU; the mesh keeps an inner shell)")
    p.add_argument("--deterministic", action="store_true",
                   help="repeatable GPU results: deterministic PyTorch algorithms (a little slower; "
                        "tests/RELIABILITY.md lists what changes)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return p


def _load_image(path: Path, mask_path: Path | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """IMAGE `[1, H, W, 3|4]` float 0..1 (alpha kept) and the mask `[1, H, W]` (1 = object) if given."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    def read(p: Path, mode: str | None):
        if not p.is_file():
            raise FileNotFoundError(f"`{p}` does not exist; give the path of an image file.")
        try:
            with Image.open(p) as im:
                im.load()
                if mode is None:
                    mode = "RGBA" if ("A" in im.getbands() or "transparency" in im.info) else "RGB"
                return np.asarray(im.convert(mode), dtype=np.float32) / 255.0
        except UnidentifiedImageError:
            raise ValueError(f"`{p}` is not an image PIL can read; use a PNG or JPEG.") from None

    image = torch.from_numpy(read(path, None))[None]
    mask = torch.from_numpy(read(mask_path, "L"))[None] if mask_path is not None else None
    return image, mask


class _Progress:
    """A plain one-line progress display on stderr (no tqdm)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.start = time.monotonic()

    def __call__(self, step: int, total: int) -> None:
        if self.quiet:
            return
        width = 30
        done = int(width * step / max(total, 1))
        elapsed = time.monotonic() - self.start
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} steps  {elapsed:6.1f}s")
        if step >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def note(self, text: str) -> None:
        if not self.quiet:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()


def _steps(text: str | None) -> tuple[int, int, int]:
    if text is None:
        return pipeline.DENSE_STEPS, pipeline.SPARSE_512_STEPS, pipeline.SPARSE_1024_STEPS
    try:
        d, s5, s10 = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--steps takes three whole numbers like 50,30,15 (dense, 512, 1024), got {text!r}.") from None
    return d, s5, s10


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    progress = _Progress(args.quiet)
    if args.deterministic:
        # cuBLAS needs this before its first handle is made to be deterministic; set before any CUDA work
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    suffix = args.output.suffix.lower()
    if suffix not in (".glb", ".obj", ".ply", ".stl"):
        print(f"error: the output must end in .glb, .obj, .ply or .stl, got `{args.output.name}`.", file=sys.stderr)
        return 1
    if args.output.exists() and not args.overwrite:
        print(f"error: `{args.output}` already exists; pass --overwrite or choose another name.", file=sys.stderr)
        return 1
    try:
        dense, s512, s1024 = _steps(args.steps)
        image, mask = _load_image(args.image, args.mask)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        variant = "tiny-random" if args.demo else args.variant
        if args.resolution is None:
            args.resolution = 512 if args.demo else 1024
        refine = not args.demo  # the tiny refiners take minutes on a CPU and give an empty field
        stages = ("dense", "sparse_512") + (("sparse_1024",) if args.resolution == 1024 else ())
        if args.demo:
            progress.note("Demo mode: a tiny model with random weights; the mesh is meaningless.")
        models = pipeline.load_models(variant, stages, device, weights_dir=args.weights,
                                      allow_download=not args.no_download,
                                      placement=pipeline.Placement(device, offload=not args.keep_weights_on_gpu,
                                                                   max_vram_gb=args.max_vram_gb))
        mesh = pipeline.image_to_mesh(models, image, mask, args.seed, args.resolution, dense, s512, s1024,
                                      args.guidance, args.mc_threshold, refine and not args.no_remove_interior,
                                      args.remesh, refine_512=refine and not args.no_refine_512, callback=progress)
        if args.colour:
            from .colour import colour_mesh

            mesh, reports = colour_mesh(mesh, image, mask, callback=progress)
            progress.note(f"Colours: {reports[0].describe()}.")
        if args.overwrite:
            args.output.unlink(missing_ok=True)
        pipeline.save(mesh, args.output, {"source_image": args.image.name})
    except KeyboardInterrupt:
        print("\nInterrupted; nothing was written.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_MISSING_WEIGHTS
    except (ValueError, RuntimeError, PermissionError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    progress.note(f"Wrote {args.output} ({mesh.vertex_counts[0]} vertices, {mesh.face_counts[0]} faces).")
    return 0
