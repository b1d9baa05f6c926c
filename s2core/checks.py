"""Checks of the settings a user passes (guidance, thresholds, steps, budgets, seeds, device), one sentence each.

Called at the boundary — the pipeline's stage functions, `pipeline.check_chain_settings` (the CLI calls
it before loading any weights), and so the nodes — so that a bad number fails before any work, and not
later as "found no occupied voxel (max occupancy nan)". Every float must be finite: Python's `inf`
and `nan` pass naive range checks (`nan >= 0` is False but `not nan < 0` is True, `inf >= 0` is True).
"""

from __future__ import annotations

import math
import operator

import torch


def number(
    name: str,
    value,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """`value` as a finite float within the bounds, else ValueError naming `name`, the range and the value."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}.") from None
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and (v >= high if high_open else v > high)
    if not math.isfinite(v) or too_low or too_high:
        bounds = []
        if low is not None:
            bounds.append(f"{'above' if low_open else 'at least'} {low:g}")
        if high is not None:
            bounds.append(f"{'below' if high_open else 'at most'} {high:g}")
        within = f" {' and '.join(bounds)}" if bounds else ""
        raise ValueError(f"{name} must be a finite number{within}{hint}, got {value!r}.")
    return v


def count(name: str, value, low: int = 0, hint: str = "") -> int:
    """`value` as a whole number >= low (bools and floats are refused), else ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, got {value!r}.")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a whole number of at least {low}{hint}, got {value!r}.") from None
    if v < low:
        raise ValueError(f"{name} must be a whole number of at least {low}{hint}, got {value!r}.")
    return v


def device(value, name: str = "device", present: bool = True) -> torch.device:
    """A torch.device that exists on this machine, else ValueError saying what is missing and what to do.
    present=False checks only the name (a placement policy can be built and tested on a machine without it)."""
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not a device name; use cpu, cuda or cuda:N.") from None
    if dev.type == "cpu" or not present:
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this PyTorch build has no CUDA support"
                if torch.version.cuda is None
                else "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)"
            )
            raise ValueError(
                f"{name} {value!r} asks for a CUDA GPU, but {why}; use cpu (slow), or install a "
                "CUDA build of PyTorch on a machine with an NVIDIA GPU."
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(
                f"{name} {value!r} names GPU {dev.index}, but only {n} CUDA GPU(s) are visible; "
                f"use cuda:0{f' to cuda:{n - 1}' if n > 1 else ''}."
            )
        return dev
    return dev  # other backends (mps, xpu): torch says what is missing when it is used
