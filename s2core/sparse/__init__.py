"""Sparse voxel tensors and the layers the Direct3D-S2 sparse models use (SPARSE.md §1-2)."""
from .tensor import SparseTensor

__all__ = ["SparseTensor"]
