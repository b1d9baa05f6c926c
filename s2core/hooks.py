"""What every stage shares with its caller: progress callbacks, cancellation and out-of-memory errors.

Every loop polls `should_stop()` (return True, or raise your own exception, to cancel: ComfyUI's hook raises
its interruption) and reports `callback(step, total)` after each step. Out-of-memory inside a stage becomes a
RuntimeError naming what to lower.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

Callback = Callable[[int, int], None]
ShouldStop = Callable[[], bool]


class Cancelled(RuntimeError):
    """Raised when `should_stop()` returned True; nothing was written."""


def poll(should_stop: ShouldStop | None, what: str = "run") -> None:
    """Raise Cancelled when the caller asked to stop."""
    if should_stop is not None and should_stop():
        raise Cancelled(f"The {what} was cancelled; nothing was written.")


def step_hooks(callback: Callback | None, should_stop: ShouldStop | None):
    """(callback, check_cancel) in the form `flow_sampler.sample_flow` takes them."""
    return callback, (lambda: poll(should_stop))


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


@contextlib.contextmanager
def stage_guard(stage: str, lower: str) -> Iterator[None]:
    """Run a stage without autograd; an out-of-memory error becomes one sentence naming what to lower."""
    try:
        with torch.inference_mode():
            yield
    except Exception as e:
        if not _is_oom(e):
            raise
        raise RuntimeError(
            f"Out of GPU memory during {stage}; {lower}, or close other programs using the GPU."
        ) from None
