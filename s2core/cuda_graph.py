"""Replay a model's forward as a captured CUDA graph when its inputs keep their shapes (the sampling loops and
the refiners' cubes).

The dense DiT's forward over 4,096 tokens launches about a thousand small kernels; on an H100 the GPU finishes
them faster than Python issues them, so its 100 forwards a run were bound by launch overhead. A CUDA graph
records one forward's launches once and replays them with one call: the same kernels on the same addresses,
so the same numbers as the eager forward.

`GraphedModel(model, stage, copied)` is called like `model(*args)`, every argument a tensor. The first `copied`
arguments are copied into the graph's own buffers on each call (the latent, the timestep, a refiner's cube);
the others are read where they lie (a condition), so they must stay alive and unchanged while the wrapper is
used, and their addresses are part of the graph's key with every argument's shape and dtype. The first call for
a key runs the model eagerly on a side stream and returns its result: graph capture needs such a warm-up
(library handles, workspaces, compiled and tuned kernels), and it is a real forward, not a wasted one. The
second call captures the forward and replays it; later calls only replay. Graphs share one memory pool and are
freed by `close()` (or leaving the wrapper's `with` block). If capture fails (an op that cannot be captured, a
driver without graph support), the wrapper logs why once and runs the model eagerly from then on.

Warm-up and capture run on one side stream per device, reused by every wrapper: cuBLAS keeps a workspace per
stream for the life of the process, so a new stream per sampling run would leave one more allocation behind each
time (+0.06 GiB a run on an H100, 2026-12-06). `torch.cuda.graph` hands the allocator's cached blocks back
before it captures, which matters under a memory cap: while a capture is under way PyTorch cannot release them
to make room for the graph's pool. `close()` also hands cuBLAS's workspaces back, so the graphs leave no memory
behind for the stages after them (the 1024 decode's peak sets the pipeline's).

A model replayed here must not read anything back to the host inside its forward (`tests/test_host_syncs.py`
checks the sparse DiT and the refiners on the CPU).
"""

from __future__ import annotations

import functools
import logging

import torch

from ._kernels import tuning

log = logging.getLogger(__name__)

# The stages whose repeated forwards replay graphs. "dense": the coarse DiT, launch-bound (bench/results/
# dense_sampling.md). "sparse" (the 512 and 1024 DiTs with a dense condition, 60 and 30 forwards) and "refiner"
# (27 cubes each) are written and tested on the CPU, not yet timed: off until `bench/e2e.py --graphs all`
# shows them winning on a GPU.
STAGES = {"dense"}
# Without Triton (Windows without triton-windows) the sparse DiT and the refiners run their PyTorch references,
# which read counts back to the host: a graph could not capture them, so those stages stay eager.
NEEDS_TRITON = {"sparse", "refiner"}


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device)


class GraphedModel:
    """`model(*args)` through one CUDA graph per input key (see the module doc); eager off CUDA, for a stage
    not in STAGES (stage None: always), and after any failure."""

    def __init__(self, model, stage: str | None = "dense", copied: int = 2):
        self.model = model
        self.copied = copied
        self.graphs: dict[tuple, tuple] = {}
        self.warm: set[tuple] = set()
        self.pool = None
        self.eager = stage not in STAGES or (stage in NEEDS_TRITON and not tuning.HAS_TRITON)

    def __enter__(self) -> GraphedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Free the graphs and their pool (the wrapper then warms up and captures again if called)."""
        self.warm = set()
        if not self.graphs:
            return
        self.graphs, self.pool = {}, None
        torch.cuda.synchronize()
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)  # private; absent on some builds: skip
        if clear is not None:
            clear()

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.eager or not args[0].is_cuda:
            return self.model(*args)
        key = tuple((a.data_ptr() if i >= self.copied else None, tuple(a.shape), a.dtype) for i, a in enumerate(args))
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.warm:
                self.warm.add(key)
                return self._warm_up(args)
            try:
                entry = self._capture(args)
            except RuntimeError as e:
                log.warning("CUDA graph capture failed (%s); running the model without graphs.", e)
                self.eager, self.graphs = True, {}
                return self.model(*args)
            self.graphs[key] = entry
        buffers, graph, out = entry
        for buf, a in zip(buffers, args):
            buf.copy_(a)
        graph.replay()
        return out.clone()  # the next replay overwrites `out`

    def _warm_up(self, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        stream, side = torch.cuda.current_stream(args[0].device), _side_stream(args[0].device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            out = self.model(*args)
        stream.wait_stream(side)
        out.record_stream(stream)  # allocated on the side stream, used and freed on the caller's
        return out

    def _capture(self, args: tuple[torch.Tensor, ...]):
        # the buffers are contiguous whatever the layout of the first inputs (a broadcast background cube is
        # copied in like any other); the copied-in values are what the graph reads
        buffers = [torch.empty(a.shape, dtype=a.dtype, device=a.device) for a in args[: self.copied]]
        inputs = (*buffers, *args[self.copied :])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=_side_stream(args[0].device)):
            out = self.model(*inputs)
        self.pool = graph.pool()
        return buffers, graph, out
