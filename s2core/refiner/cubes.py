"""The refiners' cube tiling and the sparse → dense glue of one cube (SPARSE.md §8.2-8.3).

Both refiners run their UNet on 3 × 3 × 3 overlapping cubes of edge `RefinerConfig.patch_size`: the 512
refiner over the 512³ SDF grid, the sign refiner over the 2× downsampled 1024³ grid. Here each cube is
densified from the sparse voxels when it is computed, so no whole grid is ever held.

Letters: B batch, P cube edge, S cube stride, O = P - S overlap, R grid edge (R = 2·S + P), N voxels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import RefinerConfig
from ..sparse.tensor import SparseTensor

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class CubeGrid:
    """3 cubes of edge `patch` per axis at offsets 0, stride, 2·stride, tiling a grid of edge `resolution`.

    Built from a refiner's config by `cube_grid`; tests build small ones directly.
    """

    resolution: int
    patch: int
    stride: int

    def __post_init__(self):
        if self.resolution != 2 * self.stride + self.patch or not self.stride < self.patch <= 2 * self.stride:
            raise ValueError(
                f"cube grid {self} does not tile: need resolution = 2*stride + patch and stride < patch <= 2*stride"
            )

    @property
    def overlap(self) -> int:
        return self.patch - self.stride

    def origins(self) -> list[tuple[int, int, int]]:
        """Cube origins in the original's order: x outer, then y, z inner."""
        o = [0, self.stride, 2 * self.stride]
        return [(a, b, c) for a in o for b in o for c in o]


def cube_grid(cfg: RefinerConfig, sdf_resolution: int) -> CubeGrid:
    """The tiling a refiner uses over an SDF grid of edge sdf_resolution: 3 cubes of `cfg.patch_size` per axis,
    evenly overlapping, over the SDF grid (512 refiner) or its 2× downsampled grid (sign refiner).

    The original hard-codes its stride and grid; at the official sizes this gives the same 512/192/160
    (refiner) and 512/256/128 (sign refiner) tilings.
    """
    R, P = (sdf_resolution // 2 if cfg.sign else sdf_resolution), cfg.patch_size
    S, odd = divmod(R - P, 2)
    if odd or not S < P <= 2 * S:
        raise ValueError(
            f"The refiner's patch_size {P} does not tile its {R}³ grid with 3 overlapping cubes per "
            f"axis; choose a patch_size P with {R} - P even and {R}/3 < P <= {R}/2 (the release: 192, 256)."
        )
    return CubeGrid(R, P, S)


def in_cube(coords: torch.Tensor, origin: tuple[int, int, int], patch: int) -> torch.Tensor:
    lo = torch.tensor(origin, device=coords.device, dtype=coords.dtype)
    rel = coords[:, 1:] - lo
    return ((rel >= 0) & (rel < patch)).all(1)


def densify(
    coords: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    origin,
    patch: int,
    batch: int,
    background: torch.Tensor,
) -> torch.Tensor:
    """Rows `mask` of (coords [N,4], values [N,C]) scattered into a [B, C, P, P, P] cube filled with
    `background` [C]; with duplicate coordinates one of the writes wins, as in the original."""
    C = values.shape[1]
    cube = background.view(1, C, 1, 1, 1).expand(batch, C, patch, patch, patch).contiguous()
    c = coords[mask].long()
    c[:, 1] -= origin[0]
    c[:, 2] -= origin[1]
    c[:, 3] -= origin[2]
    cube[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = values[mask]
    return cube


def check_sparse(x: SparseTensor, resolution: int, what: str, model: nn.Module) -> None:
    device = next(model.parameters()).device
    if x.coords.device != device:
        raise ValueError(
            f"The decoded {what} is on {x.coords.device} but the refiner is on {device}; move both to the same device."
        )
    if x.coords.shape[0] == 0:
        raise ValueError(
            f"The decoded {what} has no voxels, so there is no surface to refine; "
            "check the structure stage produced tokens."
        )
    lo, hi = int(x.coords[:, 1:].min()), int(x.coords[:, 1:].max())
    if lo < 0 or hi >= resolution:
        raise ValueError(
            f"The decoded {what} has coordinates in [{lo}, {hi}], outside the {resolution}³ grid "
            "the refiner expects; decode at the matching resolution."
        )


def take(x: SparseTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(coords, feats) of x, leaving x empty: with no other reference left, they are freed as soon as the
    refiner has converted them (the decoded 1024 SDF's coords alone are ~1 GB)."""
    coords, feats = x.coords, x.feats
    x.coords, x.feats, x.cache = coords.new_zeros(0, coords.shape[1]), feats.new_zeros(0, *feats.shape[1:]), {}
    return coords, feats
