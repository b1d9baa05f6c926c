"""Sparse voxel tensors and the layers the Direct3D-S2 sparse models use (SPARSE.md §1-2)."""

from .attention import sparse_cross_attention, varlen_attention, windowed_self_attention
from .conv import (
    SparseConv3d,
    SparseDownsample,
    SparseSubdivide,
    kernel_map,
    sparse_conv3d,
    sparse_downsample,
    sparse_subdivide,
    sparse_subdivide_conv3d,
)
from .nn import SparseGELU, SparseGroupNorm32, SparseLinear, SparseReLU, SparseSigmoid, SparseSiLU, SparseTanh
from .tensor import SparseTensor

__all__ = [
    "SparseTensor",
    "SparseLinear",
    "SparseSiLU",
    "SparseGELU",
    "SparseTanh",
    "SparseReLU",
    "SparseSigmoid",
    "SparseGroupNorm32",
    "SparseConv3d",
    "SparseDownsample",
    "SparseSubdivide",
    "kernel_map",
    "sparse_conv3d",
    "sparse_downsample",
    "sparse_subdivide",
    "sparse_subdivide_conv3d",
    "varlen_attention",
    "sparse_cross_attention",
    "windowed_self_attention",
]
