"""Pointwise sparse layers and norms (SPARSE.md §1.2): they act on `feats` and keep coords and cache.

`SparseGroupNorm32` normalises each batch element separately (statistics over all its voxels and
the channels of a group), in fp32, without a Python loop over batch elements; `LayerNorm32` is the
usual per-row LayerNorm in fp32. Both cast back to the input dtype, as the original's `*32` norms.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .tensor import SparseTensor

__all__ = ["SparseLinear", "SparseSiLU", "SparseGELU", "SparseTanh", "SparseReLU", "SparseSigmoid",
           "SparseGroupNorm32", "LayerNorm32", "sparse_group_norm"]


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


def sparse_group_norm(x: SparseTensor, num_groups: int, weight: torch.Tensor | None,
                      bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """GroupNorm of each batch element's [C, N_b] slab, fp32, two-pass variance -> [N, C] in x.dtype."""
    n, c = x.feats.shape
    b = x.batch_size
    f = x.feats.float().reshape(n, num_groups, c // num_groups)  # [N, G, C/G]
    bid = x.batch_ids()
    count = (x.offsets[1:] - x.offsets[:-1]).double()[:, None] * (c // num_groups)  # [B, 1]
    sums = f.new_zeros(b, num_groups, dtype=torch.float64).index_add_(0, bid, f.sum(2, dtype=torch.float64))
    mean = (sums / count).float()  # [B, G]
    dev = f - mean[bid][:, :, None]
    sq = dev.new_zeros(b, num_groups, dtype=torch.float64).index_add_(0, bid, dev.square().sum(2, dtype=torch.float64))
    rstd = torch.rsqrt((sq / count).float() + eps)  # biased variance, as nn.GroupNorm
    y = (dev * rstd[bid][:, :, None]).reshape(n, c)
    if weight is not None:
        y = y * weight.float() + bias.float()
    return y.to(x.dtype)


class SparseGroupNorm32(nn.GroupNorm):
    """GroupNorm per batch element in fp32 (keys `weight`, `bias`)."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(sparse_group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class LayerNorm32(nn.LayerNorm):
    """LayerNorm over the last dim in fp32, cast back; works on dense tensors (apply to `x.feats`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)
