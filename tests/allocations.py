"""A TorchDispatchMode that records the tensors ops allocate: the memory tests' one recorder.

An op's output is an allocation when its storage is new: not an input's (views, in-place results) and not one
already recorded. `seen` lists every allocation (bytes, op, shape, dtype) and `largest()` the biggest;
`live` / `peak` count the bytes still referenced, a storage counting until the tensor that brought it in is
garbage (views made later do not keep it counted).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class Allocations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, str, tuple, torch.dtype]] = []
        self.live = self.peak = 0
        self._held: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            if key in inputs or key in self._held:
                continue
            self.seen.append((nbytes, str(func), tuple(t.shape), t.dtype))
            if nbytes:
                self._held[key] = nbytes
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._held.pop(key)

    def largest(self):
        return max(self.seen, default=(0, "", (), None))
