"""At a CUDA out-of-memory error, print what is allocated, grouped by the line of this repository that allocated it.

`bench/e2e.py --oom-report` turns it on: the pipeline turns an out-of-memory error into one sentence naming
the stage, which says nothing about what filled the memory. This records the allocator's history (a few
percent slower) and, at the moment an allocation fails (before anything is freed by the unwinding), prints
the failed request and the live blocks by their innermost frame in this repository. Uses PyTorch's private
`_record_memory_history` / `_cuda_attach_out_of_memory_observer`; without them it says so and does nothing.
"""

from __future__ import annotations

import collections
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30


def _site(frames: list[dict]) -> str:
    for fr in frames:
        name = fr.get("filename", "")
        if name.startswith(str(REPO)) and "/bench/" not in name:
            return f"{Path(name).relative_to(REPO)}:{fr.get('line')} {fr.get('name')}"
    return "(outside the repository)"


def report(top: int = 12) -> list[str]:
    """The live blocks of the allocator's snapshot, largest allocation sites first."""
    by_site, total, reserved = collections.Counter(), 0, 0
    for seg in torch.cuda.memory._snapshot()["segments"]:
        reserved += seg["total_size"]
        for block in seg["blocks"]:
            if block["state"] == "active_allocated":
                total += block["size"]
                by_site[_site(block.get("frames", []))] += block["size"]
    lines = [f"allocated {total / GiB:.2f} GiB of {reserved / GiB:.2f} GiB reserved, by site:"]
    lines += [f"  {size / GiB:7.3f} GiB  {site}" for site, size in by_site.most_common(top)]
    return lines


def attach() -> None:
    """Record allocations from now on and print `report()` at the first out-of-memory error."""
    observer = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)
    if observer is None or not hasattr(torch.cuda.memory, "_record_memory_history"):
        print("--oom-report: this PyTorch has no allocator history; no report")
        return
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    done = []

    def on_oom(device, requested, device_allocated, device_free):
        if done:
            return
        done.append(True)
        print(f"out of memory: a request of {requested / GiB:.2f} GiB failed on device {device}", flush=True)
        print("\n".join(report()), flush=True)

    observer(on_oom)
