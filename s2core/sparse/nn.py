"""Pointwise sparse layers and norms (SPARSE.md §1.2): they act on `feats` and keep coords and cache.

`SparseGroupNorm32` normalises each batch element separately (statistics over all its voxels and
the channels of a group), in fp32, cast back to the input dtype, as the original's `*32` norm
(`layers.group_norm_per_sample`). Row-wise LayerNorm of feats: `layers.LayerNorm32`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import group_norm_per_sample
from .tensor import SparseTensor

__all__ = ["SparseLinear", "SparseSiLU", "SparseGELU", "SparseTanh", "SparseReLU", "SparseSigmoid", "SparseGroupNorm32"]


class SparseLinear(nn.Linear):
    """nn.Linear on feats (keys `weight`, `bias`)."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(super().forward(x.feats))


class _Pointwise(nn.Module):
    fn = None

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(type(self).fn(x.feats))


class SparseSiLU(nn.Module):
    """SiLU on feats; inplace overwrites them (only where the input is a fresh tensor nobody else reads)."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(F.silu(x.feats, inplace=self.inplace))


class SparseTanh(_Pointwise):
    fn = staticmethod(torch.tanh)


class SparseReLU(_Pointwise):
    fn = staticmethod(F.relu)


class SparseSigmoid(_Pointwise):
    fn = staticmethod(torch.sigmoid)


class SparseGELU(nn.Module):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(F.gelu(x.feats, approximate=self.approximate))


class SparseGroupNorm32(nn.GroupNorm):
    """GroupNorm per batch element in fp32 (keys `weight`, `bias`)."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(
            group_norm_per_sample(
                x.feats, x.batch_ids(), x.batch_size, self.num_groups, self.weight, self.bias, self.eps
            )
        )
