"""Where a refiner cube's time goes, and what cuDNN's channels-last (NDHWC) layout would save (GPU only).

    python bench/refiner_layout.py [--only 1024|512] [--out FILE]
    python bench/refiner_layout.py --ab [--only 1024|512] [--out FILE]

For one official-size cube of each refiner (deterministic weights, random fp16 input; bench_conv3d.refiners):
1. the cube's first call in this process and its warm time, then its CUDA kernels by total time (torch.profiler):
   how much is cuDNN's own NCDHW <-> NDHWC conversion around each convolution;
2. every convolution and transposed convolution call of the cube (as the UNet issues it, depth slabs included),
   timed through cuDNN on its NCDHW input as today and on the same module and input in channels_last_3d, and
   the two sums over the cube. Speed does not depend on values.
With --ab instead: the whole cube with the UNet in NCDHW and in channels-last (`unet.CHANNELS_LAST`), each run
eagerly and replayed as a CUDA graph (`cuda_graph.GraphedModel`, as the refinement loop does with "refiner" in
`cuda_graph.STAGES`), the four arms alternated twice in one process: the time until the call returns (the CPU's
share), the synchronised wall time, three cubes back to back, the peak allocation beyond the inputs over the
arm (a graph's pool is allocated at its capture) and each arm's largest output difference from eager NCDHW.
With --count-ops (CPU, no GPU needed): the host-side work of one cube of each refiner as CUDA would issue it,
counted: the kernels' CUDA dispatch is forced for the CPU tensors, their Triton launches are stubbed out (nothing
runs; the values are garbage) and every aten op is counted, those inside the GroupNorm + SiLU apart. A 16³ cube
with the official widths: at the official edge only the depth slabs of the widest inputs add ops.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_conv3d import first_call, refiners, timed  # noqa: E402

from s2core import cuda_graph  # noqa: E402
from s2core.refiner import unet  # noqa: E402

CONVS = (torch.nn.Conv3d, torch.nn.ConvTranspose3d)


def conv_calls(model, args) -> list[tuple[torch.nn.Module, tuple, int]]:
    """(module, input shape, calls) of every convolution call in one forward, in order, repeats counted."""
    seen = {}

    def hook(mod, inp):
        seen.setdefault((id(mod), tuple(inp[0].shape)), [mod, tuple(inp[0].shape), 0])[2] += 1

    hooks = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, CONVS)]
    try:
        model(*args)
    finally:
        for h in hooks:
            h.remove()
    return [tuple(v) for v in seen.values()]


def kernel_table(model, args, rows: int = 12) -> list[str]:
    """The cube's CUDA kernels by total time, as markdown rows (name cut to 70 characters)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(*args)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events)
    out = [f"| all kernels | {total / 1e3:.1f} | 100% | |"]
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:rows]:
        t = e.self_device_time_total
        out.append(f"| `{e.key[:70]}` | {t / 1e3:.1f} | {t / total:.0%} | {e.count} |")
    return out


def layout_rows(model, args, device) -> tuple[list[str], float, float]:
    lines, ncdhw, ndhwc = [], 0.0, 0.0
    for mod, shape, n in conv_calls(model, args):
        x = torch.randn(shape, device=device, dtype=torch.float16)
        a = timed(lambda: mod(x), device)
        twin = type(mod)(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding)
        twin = twin.to(device, torch.float16, memory_format=torch.channels_last_3d)
        xc = x.contiguous(memory_format=torch.channels_last_3d)
        b = timed(lambda: twin(xc), device)
        ncdhw, ndhwc = ncdhw + n * a, ndhwc + n * b
        kind = "transposed " if isinstance(mod, torch.nn.ConvTranspose3d) else ""
        lines.append(
            f"| {kind}{mod.in_channels}→{mod.out_channels}, k{mod.kernel_size[0]} s{mod.stride[0]} | "
            f"{'×'.join(map(str, shape[2:]))} | {n} | {1e3 * a:.2f} | {1e3 * b:.2f} | {a / b:.2f}× |"
        )
    return lines, ncdhw, ndhwc


def cube_times(model, inputs, reps: int = 5) -> tuple[float, float, float, float]:
    """(returns ms, wall ms, three cubes back to back ms, peak beyond the inputs GiB) of one warm cube; the
    peak covers the warm-up calls too (a graph's capture allocates its pool)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for _ in range(2):
        model(*inputs)
    issue, wall = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(*inputs)
        issue.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(3):
        model(*inputs)
    torch.cuda.synchronize()
    three = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return 1e3 * statistics.median(issue), 1e3 * statistics.median(wall), 1e3 * three, peak


def layout_ab(model, inputs) -> list[str]:
    """The cube with the UNet in NCDHW and channels-last, each eager and as a CUDA graph, the four arms
    alternated twice (markdown rows), and each arm's largest difference from eager NCDHW."""
    lines = [
        "| UNet layout | run | call returns ms | wall ms | 3 cubes ms | peak beyond inputs GiB | largest difference |",
        "|---|---|---|---|---|---|---|",
    ]
    saved = unet.CHANNELS_LAST, cuda_graph.STAGES
    cuda_graph.STAGES = {"refiner"}
    ref = None
    try:
        for _ in range(2):
            for graph in (False, True):
                for cl in (False, True):
                    unet.CHANNELS_LAST = cl
                    with cuda_graph.GraphedModel(model, "refiner" if graph else None, copied=len(inputs)) as run:
                        a, w, t, p = cube_times(run, inputs)
                        out = run(*inputs).float()
                    ref = out if ref is None else ref
                    d = (out - ref).abs().max().item()
                    layout = "channels-last" if cl else "NCDHW"
                    lines.append(
                        f"| {layout} | {'graph' if graph else 'eager'} | {a:.1f} | {w:.1f} | {t:.1f} | {p:.2f} | {d:.3g} |"
                    )
                    del out
    finally:
        unet.CHANNELS_LAST, cuda_graph.STAGES = saved
    return lines


def count_ops() -> list[str]:
    """Markdown rows: aten ops, convolutions and Triton launches of one cube of each refiner (see --count-ops)."""
    import collections
    import importlib
    from unittest import mock

    from torch.utils._python_dispatch import TorchDispatchMode

    from kernels import _common, group_norm

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.in_norm = collections.Counter(), False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops["norm" if self.in_norm else "other"] += 1
            self.ops["convolution"] += func.__name__.startswith("convolution")
            return func(*args, **(kwargs or {}))

    launches = collections.Counter()

    def launcher(kernel, grid):
        launches[kernel.fn.__name__] += 1
        return lambda *a, **k: None

    counter = Count()
    real_norm = group_norm.group_norm_silu

    def norm(*a, **k):
        counter.in_norm = True
        try:
            return real_norm(*a, **k)
        finally:
            counter.in_norm = False

    def as_on_cuda(backend, x, dtypes=_common.HALF):
        return backend != "reference" and (dtypes is None or x.dtype in dtypes)

    # the class of every jitted kernel here: JITFunction, or the interpreter's under TRITON_INTERPRET=1
    patches = [mock.patch.object(type(group_norm._stats_kernel), "__getitem__", launcher)]
    patches.append(mock.patch.object(group_norm, "group_norm_silu", norm))
    for name in ("adaptive_filter", "conv3d", "group_norm"):
        patches.append(mock.patch.object(importlib.import_module(f"kernels.{name}"), "_use_triton", as_on_cuda))
    lines = [
        "| cube (16³, official widths) | aten ops | of them in GroupNorm + SiLU | convolutions | Triton launches |",
        "|---|---|---|---|---|",
    ]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        for name, model, inputs in refiners(torch.device("cpu"), True):
            counter.ops.clear()
            launches.clear()
            with counter:
                model(*inputs)
            ops = counter.ops
            kernels = ", ".join(f"{k} {v}" for k, v in sorted(launches.items()))
            lines.append(
                f"| {name} | {ops['norm'] + ops['other']} | {ops['norm']} | {ops['convolution']} | {kernels} |"
            )
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["512", "1024"], default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--ab", action="store_true", help="the whole cube: NCDHW vs channels-last UNet, eager vs graph (see above)"
    )
    ap.add_argument("--count-ops", action="store_true", help="the cube's host-side ops, counted on the CPU (see above)")
    args = ap.parse_args()
    if args.count_ops:
        torch.set_grad_enabled(False)
        print("\n".join(count_ops()))
        return
    if not torch.cuda.is_available():
        sys.exit("bench/refiner_layout.py times cuDNN on a CUDA GPU; none is available here.")
    device = torch.device("cuda")
    torch.set_grad_enabled(False)
    lines = [
        f"# Refiner cube: kernels and cuDNN layouts — {datetime.date.today()}, {torch.cuda.get_device_name()}",
        "",
        f"- command: `python bench/refiner_layout.py{''.join(' ' + a for a in sys.argv[1:])}`; "
        f"torch {torch.__version__}; times are medians of 5 (ms)",
    ]
    for name, model, inputs in refiners(device, False):
        if args.only and args.only not in name:
            continue
        if args.ab:
            lines += ["", f"## {name} cube: NCDHW vs channels-last UNet, eager vs CUDA graph", ""]
            lines += layout_ab(model, inputs)
            model = inputs = None
            torch.cuda.empty_cache()
            continue
        first = first_call(lambda: model(*inputs), device)
        warm = timed(lambda: model(*inputs), device)
        lines += ["", f"## {name} cube: first call {first:.2f} s, warm {1e3 * warm:.1f} ms", ""]
        lines += ["| CUDA kernel | ms | share | calls |", "|---|---|---|---|"] + kernel_table(model, inputs)
        rows, a, b = layout_rows(model, inputs, device)
        lines += ["", "| convolution | input volume | calls | NCDHW ms | channels-last ms | speed-up |"]
        lines += ["|---|---|---|---|---|---|"] + rows
        lines += ["", f"Sum over the cube: NCDHW {1e3 * a:.1f} ms, channels-last {1e3 * b:.1f} ms ({a / b:.2f}×)."]
        model = inputs = None
        torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
