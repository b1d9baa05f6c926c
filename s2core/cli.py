"""Command line: `python -m s2core IMAGE [--mask MASK] -o OUT.glb [--resolution 512|1024] [--seed N] ...`.

Runs `pipeline.image_to_mesh` with the official defaults and writes one mesh file (.glb .obj .ply .stl).
Progress goes to stderr as a plain line per stage. `--demo` uses the `tiny-random` model: no download,
runs on a CPU in seconds, and its meshes are meaningless (random weights) — it only shows that the
chain works.

Failures are one line on stderr, never a traceback (`--debug` shows it): everything the command line can
get wrong (output name, settings, device, image and mask files) is checked before any weights load.
Exit status: 0 done, 1 error, 2 weights missing (the message lists which files to put where), 130
Ctrl-C, 143 SIGTERM — at any moment, start-up included (`__main__.py`). The file is written by
`files.write_atomic`: never half a file, never over an existing one unless --overwrite, and then the old
file stays whole until the complete new one replaces it; SIGINT/SIGTERM remove the temp file.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from . import checks, config, files, image_file, loading, pipeline

EXIT_ERROR = 1
EXIT_MISSING_WEIGHTS = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same clean-up runs (library code never catches KeyboardInterrupt)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m s2core", description="Direct3D-S2: one image in, one mesh out.")
    p.add_argument("image", type=Path, help="picture of one object (PNG with transparency, or give --mask)")
    p.add_argument("--mask", type=Path, help="object mask image (white = object); default: the image's alpha")
    p.add_argument("-o", "--output", type=Path, required=True, help="output mesh: .glb, .obj, .ply or .stl")
    p.add_argument(
        "--resolution",
        type=int,
        choices=(512, 1024),
        default=None,
        help="1024 (default; measured peak 4.2 GiB of GPU memory) or 512 (faster, 4.1 GiB); --demo defaults to 512",
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument(
        "--steps",
        type=str,
        default=None,
        metavar="D,S512,S1024",
        help=f"sampling steps per stage (default {config.DENSE_STEPS},{config.SPARSE_512_STEPS},"
        f"{config.SPARSE_1024_STEPS})",
    )
    p.add_argument("--guidance", type=float, default=config.GUIDANCE, help="classifier-free guidance (default 7)")
    p.add_argument("--mc-threshold", type=float, default=config.MC_THRESHOLD, help="surface iso-level (0.2)")
    p.add_argument("--no-remove-interior", action="store_true", help="skip the 1024 interior-removal refiner")
    p.add_argument("--remesh", action="store_true", help="simplify the mesh (removes 95%% of the faces)")
    p.add_argument(
        "--colour",
        "--color",
        action="store_true",
        help="paint vertex colours from the image (camera found from the silhouette; .glb/.ply/.obj keep them)",
    )
    p.add_argument("--weights", type=Path, help="folder holding the Direct3D-S2 files (default: HF cache/download)")
    p.add_argument("--variant", choices=("v1.1", "v1.0"), default="v1.1", help="official release (default v1.1)")
    p.add_argument("--no-download", action="store_true", help="never download; only use files on disk")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument(
        "--keep-weights-on-gpu",
        action="store_true",
        help="keep every network on the GPU once used (faster; needs ~6.4 GB more VRAM). Default: "
        "only the running stage's networks are on the GPU",
    )
    p.add_argument(
        "--max-vram-gb",
        type=float,
        default=None,
        metavar="GIB",
        help="keep networks on the GPU while their weights fit in GIB (least recently used ones go "
        "back to the CPU); activations need room on top",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="tiny random model: no download, seconds on a CPU, meaningless mesh (smoke test); "
        "defaults to 512, refiners on",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (default: refuse)")
    p.add_argument(
        "--no-refine-512",
        action="store_true",
        help="skip the 512 refiner (faster on a CPU; the mesh keeps an inner shell)",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="repeatable GPU results: deterministic PyTorch algorithms (a little slower; "
        "tests/RELIABILITY.md lists what changes)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error (for bug reports)")
    return p


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
        return config.DENSE_STEPS, config.SPARSE_512_STEPS, config.SPARSE_1024_STEPS
    try:
        d, s5, s10 = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--steps takes three whole numbers like 50,30,15 (dense, 512, 1024), got {text!r}.") from None
    return d, s5, s10


def _finished_output(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of the file at `path`, or None: tells after an interruption whether it was written."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _check_output(path: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output the final write would refuse anyway: wrong suffix, a folder, a name
    too long, an existing file without --overwrite, a folder path through a file, or a read-only place."""
    if path.suffix.lower() not in (".glb", ".obj", ".ply", ".stl"):
        raise ValueError(f"The output must end in .glb, .obj, .ply or .stl, got {path.name}.")
    try:
        if len(os.fsencode(path.name)) > files.NAME_MAX:
            raise OSError(errno.ENAMETOOLONG, "file name too long")
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder")
        if os.path.lexists(path) and not overwrite:
            raise FileExistsError(f"{path} already exists; pass --overwrite or choose another name.")
        folder = path.absolute().parent
        while not folder.exists():  # the write creates missing folders: check the first existing one
            folder = folder.parent
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder")
        if hasattr(os, "statvfs") and os.statvfs(folder).f_flag & os.ST_RDONLY:
            raise OSError(errno.EROFS, "read-only file system")
        if not os.access(folder, os.W_OK):
            raise PermissionError(errno.EACCES, "permission denied")
    except OSError as e:
        raise (e if e.errno is None else files.explain_os_error(e, path)) from None


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """While the CLI runs, SIGINT raises KeyboardInterrupt and SIGTERM raises _Terminated, so the clean-up in
    `finally`/`except` blocks (temp files above all) runs; the previous handlers come back afterwards. A
    signal the parent set to be ignored stays ignored. Only the main thread can set handlers: elsewhere this
    does nothing. (Inside ComfyUI no handler is ever installed: the nodes never call this.)"""

    def terminate(signum, frame):
        raise _Terminated()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig, handler in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, terminate)):
            old = signal.getsignal(sig)
            if old is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def _stopped(e: KeyboardInterrupt, output: Path | None, before) -> int:
    """Ctrl-C / SIGTERM: remove any temp file, say in one line what happened, exit 130 / 143."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut this clean-up short
        if threading.current_thread() is threading.main_thread():
            signal.signal(sig, signal.SIG_IGN)
    files.remove_temp_files()
    after = None if output is None else _finished_output(output)
    outcome = f"{output} was written" if after is not None and after != before else "nothing was written"
    if isinstance(e, _Terminated):
        print(f"\nTerminated; {outcome}.", file=sys.stderr)
        return EXIT_TERMINATED
    print(f"\nInterrupted; {outcome}.", file=sys.stderr)
    return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 1 error, 2 missing weights, 130 Ctrl-C, 143 SIGTERM)."""
    output, before = None, None
    with _signals_interrupt():
        try:
            args = _parser().parse_args(argv)
            output, before = args.output, _finished_output(args.output)
            return _run(args)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM at any moment, start-up included
            return _stopped(e, output, before)


def _error(e: BaseException | str, code: int = EXIT_ERROR) -> int:
    print(f"error: {e}", file=sys.stderr)
    return code


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    progress = _Progress(args.quiet)
    if args.deterministic:
        # cuBLAS needs this before its first handle is made to be deterministic; set before any CUDA work
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    variant = "tiny-random" if args.demo else args.variant
    resolution = args.resolution or (512 if args.demo else 1024)
    refine = True  # the demo too: its tiny refiners pass the SDF through (s2core/tiny_weights.py)
    stages = ("dense", "sparse_512") + (("sparse_1024",) if resolution == 1024 else ())
    try:  # everything a user can get wrong on the command line, before any weights load
        _check_output(args.output, args.overwrite)
        dense, s512, s1024 = _steps(args.steps)
        pipeline.check_chain_settings(resolution, dense, s512, s1024, args.guidance, args.mc_threshold)
        device = (
            checks.device(args.device, "--device")
            if args.device
            else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        placement = loading.Placement(device, offload=not args.keep_weights_on_gpu, max_vram_gb=args.max_vram_gb)
        pixels, alpha = image_file.read_image_and_mask(args.image, args.mask)
        image = torch.from_numpy(pixels).float().div_(255)[None]  # IMAGE [1, H, W, 3|4], at most 4096 px a side
        mask = None if alpha is None else torch.from_numpy(alpha).float().div_(255)[None]  # [1, H, W], 1 = object
    except (ValueError, OSError) as e:
        return _error(e)
    try:
        if args.demo:
            progress.note("Demo mode: a tiny model with random weights; the mesh is meaningless.")
        models = loading.load_models(
            variant, stages, device, weights_dir=args.weights, allow_download=not args.no_download, placement=placement
        )
        mesh = pipeline.image_to_mesh(
            models,
            image,
            mask,
            args.seed,
            resolution,
            dense,
            s512,
            s1024,
            args.guidance,
            args.mc_threshold,
            refine and not args.no_remove_interior,
            args.remesh,
            refine_512=refine and not args.no_refine_512,
            callback=progress,
        )
        if args.colour:
            from .colour import colour_mesh

            mesh, reports = colour_mesh(mesh, image, mask, callback=progress)
            progress.note(f"Colours: {reports[0].describe()}.")
        pipeline.save(mesh, args.output, {"source_image": args.image.name}, overwrite=args.overwrite)
    except FileNotFoundError as e:  # weights missing (offline): the message lists what to put where
        return _error(e, EXIT_MISSING_WEIGHTS)
    except torch.OutOfMemoryError:  # outside a stage (loading weights); stages name their own setting
        return _error(
            "Out of GPU memory while moving the weights to the GPU; use --resolution 512, leave out "
            "--keep-weights-on-gpu, or close other programs using the GPU."
        )
    except (ValueError, RuntimeError, OSError) as e:
        if args.debug:
            raise
        return _error(e)
    except Exception as e:  # a bug: one line, the traceback with --debug
        if args.debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return _error(
            f"unexpected {type(e).__name__}: {first} (a bug: run again with --debug and report the traceback)."
        )
    progress.note(f"Wrote {args.output} ({mesh.vertex_counts[0]} vertices, {mesh.face_counts[0]} faces).")
    return 0
