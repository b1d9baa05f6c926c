"""Interior-removal refiners: dense 3D UNets run over overlapping cubes (SPARSE.md §8).

Decoding a sparse SDF and filling the rest of the grid with +1 leaves a second, inner shell where the
negative band meets the fill (SPARSE.md §4.6). The refiners replace that fill with a proper
inside/outside field before marching cubes:

* `VoxelRefiner` (config key `refiner`, 512³, `remesh_512.py`): per cube, `tanh` of a UNet over the SDF
  and the decoder's features; the cubes are cross-faded into the refined field, meshed at 2 × mc_threshold.
* `VoxelRefinerSign` (config key `refiner_1024`, `sign_1024.py`): per cube of the 2×-downsampled SDF, a
  hard inside/outside sign; the 1024³ field is `|sdf| · sign` with the decoded values restored, meshed
  at mc_threshold.

The original builds the whole grids densely (a 32-channel fp16 512³ feature grid, ~8.6 GB; fp16 1024³
grids; a 4 GiB fp32 grid for CPU marching cubes). Here `remove_interior_512` / `remove_interior_1024`
densify one cube at a time from the sparse voxels (`cubes.py`, tiling from `RefinerConfig.patch_size`),
never hold a whole 512³/1024³ tensor, and stream x-slabs of the field; from each slab only the corners of
marching-cubes cells that straddle the level are kept (`refined_field.py`), which is all marching cubes
needs. Cubes with no decoded voxel in them are computed once and reused: their inputs are bitwise equal,
so are their outputs. Both refiners share the UNet of `unet.py`.

Use: `field = remove_interior(model, sdf, feats, level, progress, grid=cube_grid(model.cfg, sdf_res))` then
`[(vertices, faces), ...] = mesh_refined_field(field)` (one mesh per batch element, original frame).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import RefinerConfig
from ..sparse.tensor import SparseTensor
from .cubes import CubeGrid, Progress, cube_grid
from .refined_field import RefinedField, max_crossing_corners, mesh_refined_field
from .remesh_512 import VoxelRefiner, adaptive_filter, remove_interior_512
from .sign_1024 import VoxelRefinerSign, remove_interior_1024
from .unet import OFFICIAL_CHANNELS, UNet3D

__all__ = [
    "CubeGrid",
    "OFFICIAL_CHANNELS",
    "RefinedField",
    "UNet3D",
    "VoxelRefiner",
    "VoxelRefinerSign",
    "adaptive_filter",
    "build_refiner",
    "cube_grid",
    "max_crossing_corners",
    "mesh_refined_field",
    "remove_interior",
    "remove_interior_512",
    "remove_interior_1024",
]


def build_refiner(cfg: RefinerConfig, block_out_channels: tuple[int, ...] = OFFICIAL_CHANNELS) -> nn.Module:
    """The refiner a config describes: `VoxelRefinerSign` when `cfg.sign`, else `VoxelRefiner`."""
    return (VoxelRefinerSign if cfg.sign else VoxelRefiner)(cfg, block_out_channels)


def remove_interior(
    model: nn.Module,
    sdf: SparseTensor,
    feats: SparseTensor | torch.Tensor | None = None,
    level: float = 0.2,
    progress: Progress | None = None,
    **kwargs,
) -> RefinedField:
    """Dispatch on the refiner kind: `VoxelRefiner` needs feats, `VoxelRefinerSign` ignores them."""
    if isinstance(model, VoxelRefinerSign):
        return remove_interior_1024(model, sdf, level, progress=progress, **kwargs)
    if feats is None:
        raise ValueError("The 512 refiner needs the decoder's 32-channel features; decode with return_feat=True.")
    return remove_interior_512(model, sdf, feats, level, progress=progress, **kwargs)
