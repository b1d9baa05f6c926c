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

    def __len__(self) -> int:
        return self.feats.shape[0]
