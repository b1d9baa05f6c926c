"""Benchmark: the few-channel 'same' convolutions of the refiner UNets, cuDNN vs the Triton kernel (kernels/conv3d.py).

    python bench/bench_conv3d.py --out bench/results/conv3d.md     # GPU, official sizes
    python bench/bench_conv3d.py --tiny                             # CPU smoke run (interpreter), prints only

1. Every distinct convolution the kernel takes over in one official-size cube of each refiner (1024 sign:
   256³, 512: 192³; shapes collected from a forward), timed as cuDNN runs it today (the module, on depth slabs
   above `unet.SLAB_BYTES`, and in one call) and as the kernel with a few patch shapes.
2. One whole cube of each refiner with the kernel off and on: time, peak memory above the inputs, and how
   far the outputs move (the sign refiner: voxels whose sign flips; the 512 refiner: largest difference).
3. With `--variant PATH` (another copy of kernels/conv3d.py, e.g. main's: `git show main:kernels/conv3d.py >
   /tmp/conv3d_main.py`), instead of 1 and 2: each shape `suits` sends to the kernel, this tree's kernel beside
   the variant at the default block: the first call's wall time (its compile, where the Triton cache is empty:
   run it with a fresh TRITON_CACHE_DIR), the warm time, and the largest difference between the two outputs.
fp16, deterministic weights, random inputs (speed does not depend on values).

    TRITON_CACHE_DIR=$(mktemp -d) python bench/bench_conv3d.py --variant /tmp/conv3d_main.py
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from profile_dit import peak_of  # noqa: E402

from kernels import conv3d as K  # noqa: E402
from s2core.config import ReleaseConfig  # noqa: E402
from s2core.refiner import VoxelRefiner, VoxelRefinerSign, unet  # noqa: E402
from s2core.testing import deterministic_state_dict  # noqa: E402

PATCHES = [(64, 2), (128, 4), (256, 8)]  # (voxels a program, warps)


def first_call(fn, device) -> float:
    """Wall seconds of one call of fn(), synchronised (the first call: its compile included)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def timed(fn, device, reps: int = 5) -> float:
    """Median seconds of fn()."""
    return sorted(first_call(fn, device) for _ in range(reps))[reps // 2]


def refiners(device, tiny: bool):
    rel = ReleaseConfig()
    for name, cls, cfg in (("1024 sign", VoxelRefinerSign, rel.refiner_1024), ("512", VoxelRefiner, rel.refiner)):
        m = cls(cfg)
        m.load_state_dict(deterministic_state_dict(m, seed=1), strict=True)
        m = m.to(device).eval()
        P = 16 if tiny else cfg.patch_size
        g = torch.Generator().manual_seed(0)
        sdf = torch.randn(1, 1, P, P, P, generator=g).to(device, m.dtype)
        args = (sdf,) if cfg.sign else (sdf, torch.randn(1, 32, P, P, P, generator=g).to(device, m.dtype))
        yield name, m, args


def conv_shapes(model, args) -> list[tuple]:
    """(Cin, Cout, k, spatial) of every convolution in one forward that the kernel takes over (`suits`)."""
    seen = []

    def hook(mod, inp):
        key = (mod.in_channels, mod.out_channels, mod.kernel_size[0], tuple(inp[0].shape[2:]))
        if K.shape_suits(mod) and mod.out_channels <= K.DISPATCH_MAX_COUT and key not in seen:  # what `suits` may take
            seen.append(key)

    hooks = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    use, slab = unet.USE_CONV_KERNEL, unet.SLAB_BYTES
    unet.USE_CONV_KERNEL, unet.SLAB_BYTES = False, 2**62  # module calls, one per convolution
    try:
        with torch.inference_mode():
            model(*args)
    finally:
        unet.USE_CONV_KERNEL, unet.SLAB_BYTES = use, slab
        for h in hooks:
            h.remove()
    return seen


def side_by_side(variant, device, tiny: bool) -> list[str]:
    """Table 3: this tree's kernel and `variant`'s (a module like kernels.conv3d) on every shape `suits` takes."""
    lines = [
        "## 3. This tree's kernel beside a variant (default block)",
        "",
        "| refiner | Cin→Cout, k | volume | this tree: first call s | variant: first call s | this tree ms | "
        "variant ms | variant / this tree | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, model, inputs in refiners(device, tiny):
        for cin, cout, k, vol in conv_shapes(model, inputs)[: 2 if tiny else None]:
            if not (cin == 1 or cout == 1 or k == 1):
                continue  # `suits` leaves it to cuDNN
            conv = torch.nn.Conv3d(cin, cout, k, padding=(k - 1) // 2).to(device, torch.float16)
            x = torch.randn(1, cin, *vol, device=device, dtype=torch.float16)
            runs = [lambda mod=mod: mod._conv3d_same_triton(x, conv.weight, conv.bias) for mod in (K, variant)]
            first = [first_call(fn, device) for fn in runs]
            warm = [timed(fn, device, 2 if tiny else 5) for fn in runs]
            diff = float((runs[0]().float() - runs[1]().float()).abs().max())
            lines.append(
                f"| {name} | {cin}→{cout}, {k} | {'×'.join(map(str, vol))} | {first[0]:.2f} | {first[1]:.2f} | "
                f"{1e3 * warm[0]:.2f} | {1e3 * warm[1]:.2f} | {warm[1] / warm[0]:.2f}× | {diff:.1e} |"
            )
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="16³ cubes on the CPU (interpreter), prints only")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--variant", type=Path, default=None, help="another copy of kernels/conv3d.py: table 3 only")
    args = ap.parse_args()
    if args.variant is not None and not args.variant.is_file():
        sys.exit(f"--variant {str(args.variant)!r}: no such file; give a copy of kernels/conv3d.py.")
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    torch.set_grad_enabled(False)
    if args.variant is not None:
        from ab_compressed import load_variant

        head = [f"# Refiner conv kernel: this tree vs {args.variant.name} — {datetime.date.today()}, {gpu}", ""]
        head += [f"- command: `python bench/bench_conv3d.py{''.join(' ' + a for a in sys.argv[1:])}`", ""]
        text = "\n".join(head + side_by_side(load_variant("conv3d", args.variant), device, args.tiny)) + "\n"
        print(text)
        if args.out is not None:
            args.out.write_text(text)
        return
    lines = [
        f"# Refiner convolutions: cuDNN vs the Triton kernel — {datetime.date.today()}, {gpu}",
        "",
        f"- command: `python bench/bench_conv3d.py{''.join(' ' + a for a in sys.argv[1:])}`; torch {torch.__version__}",
        "- fp16, official refiner sizes, deterministic weights, random inputs; median of 5 (ms)",
        "",
        "## 1. Each convolution the kernel takes over",
        "",
        "| refiner | Cin→Cout, k | volume | cuDNN as today | cuDNN one call | "
        + " | ".join(f"kernel {bw} w{w}" for bw, w in PATCHES)
        + " | best kernel / today |",
        "|---|---|---|---|---|" + "---|" * len(PATCHES) + "---|",
    ]
    cubes = [
        "",
        "## 2. One cube",
        "",
        "| refiner | kernel off ms | kernel on ms | speed-up | peak off GiB | peak on GiB | outputs |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, model, inputs in refiners(device, args.tiny):
        for cin, cout, k, vol in conv_shapes(model, inputs)[: 2 if args.tiny else None]:
            conv = torch.nn.Conv3d(cin, cout, k, padding=(k - 1) // 2).to(device, torch.float16)
            x = torch.randn(1, cin, *vol, device=device, dtype=torch.float16)
            use = unet.USE_CONV_KERNEL
            unet.USE_CONV_KERNEL = False
            today = timed(lambda: unet.conv3d_slabs(conv, x), device)
            unet.USE_CONV_KERNEL = use
            one = timed(lambda: conv(x), device)
            ours = []
            for patch in PATCHES[1:2] if args.tiny else PATCHES:
                K._conv3d_same_triton(x, conv.weight, conv.bias, patch)  # compile outside the timing
                ours.append(timed(lambda: K._conv3d_same_triton(x, conv.weight, conv.bias, patch), device))
            lines.append(
                f"| {name} | {cin}→{cout}, {k} | {'×'.join(map(str, vol))} | {1e3 * today:.2f} | {1e3 * one:.2f} | "
                + " | ".join(f"{1e3 * t:.2f}" for t in ours)
                + " |" * (len(PATCHES) - len(ours))
                + f" | {today / min(ours):.2f}× |"
            )
        outs, times, peaks = [], [], []
        for on in (False, True):
            unet.USE_CONV_KERNEL = on
            outs.append(model(*inputs).float())
            times.append(timed(lambda: model(*inputs), device, 3))
            peaks.append(peak_of(device, lambda: model(*inputs)))
        unet.USE_CONV_KERNEL = True
        if "sign" in name:
            moved = f"{int((outs[0] != outs[1]).sum())} of {outs[0].numel():,} signs flip"
        else:
            moved = f"largest difference {float((outs[0] - outs[1]).abs().max()):.2e} (values in ±1)"
        cubes.append(
            f"| {name} | {1e3 * times[0]:.1f} | {1e3 * times[1]:.1f} | {times[0] / times[1]:.2f}× | "
            f"{peaks[0]:.2f} | {peaks[1]:.2f} | {moved} |"
        )
        model = inputs = outs = None  # free the cube before the next refiner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    text = "\n".join(lines + cubes) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
