"""SparseTensor: the active voxels of a batch of sparse grids (SPARSE.md §1).

Layout (rows of one batch element are contiguous, batch elements in ascending order):

| field      | shape / dtype        | meaning                                               |
|------------|----------------------|-------------------------------------------------------|
| feats      | [N, *C] float        | one row per active voxel                              |
| coords     | [N, 4] int32         | (batch, x, y, z), unique per batch element            |
| batch_size | int                  | B                                                     |
| offsets    | [B+1] int64 (device) | rows of element b are offsets[b]:offsets[b+1]          |
| cache      | dict                 | memo shared by tensors with the same coords (kernel maps, windows) |

Example, B=2 with 3 and 2 voxels:

| row | coords        | batch element |
|-----|---------------|---------------|
| 0-2 | (0, x, y, z)  | 0             |
| 3-4 | (1, x, y, z)  | 1             |

offsets = [0, 3, 5].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SparseTensor:
    feats: torch.Tensor
    coords: torch.Tensor
    batch_size: int = -1
    offsets: torch.Tensor | None = None
    cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        assert self.coords.ndim == 2 and self.coords.shape[1] == 4, "coords must be [N, 4]"
        assert self.feats.shape[0] == self.coords.shape[0], "feats and coords disagree on N"
        if self.offsets is None:
            if self.batch_size < 0:
                # one host sync at construction, never inside a layer
                self.batch_size = int(self.coords[:, 0].max().item()) + 1 if self.coords.shape[0] else 1
            counts = torch.bincount(self.coords[:, 0].long(), minlength=self.batch_size)
            self.offsets = torch.zeros(self.batch_size + 1, dtype=torch.int64, device=self.coords.device)
            self.offsets[1:] = torch.cumsum(counts, 0)
        elif self.batch_size < 0:
            self.batch_size = self.offsets.numel() - 1

    def replace(self, feats: torch.Tensor, coords: torch.Tensor | None = None) -> "SparseTensor":
        """Same voxels (and the same cache object) with new features; new coords start a new cache."""
        if coords is None:
            return SparseTensor(feats, self.coords, self.batch_size, self.offsets, self.cache)
        return SparseTensor(feats, coords, self.batch_size)

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    def to(self, *args, **kwargs) -> "SparseTensor":
        feats = self.feats.to(*args, **kwargs)
        coords = self.coords.to(feats.device)
        offsets = self.offsets.to(feats.device)
        cache = self.cache if coords.device == self.coords.device else {}
        return SparseTensor(feats, coords, self.batch_size, offsets, cache)

    def batch_ids(self) -> torch.Tensor:
        """[N] int64 batch index of each row."""
        return self.coords[:, 0].long()

    @property
    def shape(self) -> torch.Size:
        """[B, *C], the original's convention (feature dims after the batch size)."""
        return torch.Size([self.batch_size, *self.feats.shape[1:]])

    def type(self, dtype: torch.dtype) -> "SparseTensor":
        return self.replace(self.feats.to(dtype))

    def half(self) -> "SparseTensor":
        return self.type(torch.float16)

    def float(self) -> "SparseTensor":
        return self.type(torch.float32)

    def reshape(self, *shape) -> "SparseTensor":
        """Reshape the feature dims only: feats [N, *C] -> [N, *shape]."""
        return self.replace(self.feats.reshape(self.feats.shape[0], *shape))

    def broadcast_batch(self, per_batch: torch.Tensor) -> torch.Tensor:
        """[B, *C] per-element values -> [N, *C], row i gets the value of its batch element."""
        return per_batch[self.batch_ids()]

    # Elementwise arithmetic on feats. A dense tensor that broadcasts to [B, *C] is applied per batch
    # element (a [B, C] modulation, a [C] bias); a SparseTensor must have the same rows.
    def _operand(self, other):
        if isinstance(other, SparseTensor):
            assert other.feats.shape[0] == self.feats.shape[0], "SparseTensors with different rows"
            return other.feats
        if isinstance(other, torch.Tensor) and other.ndim > 0:
            full = self.shape
            try:
                per_batch = torch.broadcast_shapes(other.shape, full) == full
            except RuntimeError:
                per_batch = False
            if per_batch:
                return self.broadcast_batch(torch.broadcast_to(other, full))
        return other

    def __add__(self, other):
        return self.replace(self.feats + self._operand(other))

    __radd__ = __add__

    def __sub__(self, other):
        return self.replace(self.feats - self._operand(other))

    def __rsub__(self, other):
        return self.replace(self._operand(other) - self.feats)

    def __mul__(self, other):
        return self.replace(self.feats * self._operand(other))

    __rmul__ = __mul__

    def __truediv__(self, other):
        return self.replace(self.feats / self._operand(other))

    def __neg__(self):
        return self.replace(-self.feats)

    def __len__(self) -> int:
        return self.feats.shape[0]
