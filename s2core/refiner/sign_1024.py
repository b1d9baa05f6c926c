"""The 1024 sign refiner `Voxel_RefinerXL_sign` (config key `refiner_1024`) and its streaming run (SPARSE.md §8.3).

Per cube of the 2×-downsampled SDF, a hard inside/outside sign; later cubes overwrite earlier ones. The
1024³ field is `|sdf| · sign` with the decoded values restored at the decoded voxels, meshed at
mc_threshold. The original builds fp16 1024³ grids; `remove_interior_1024` keeps the sign bits of one row
of cubes (1 bit per voxel, at most 8 MiB) and streams the 1024 x-slabs those rows settle into a
`RefinedField` before computing the next row.

Letters: B batch, P cube edge, S cube stride, R sign grid edge, R2 = 2·R the SDF grid edge, N decoded voxels.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import RefinerConfig
from ..cuda_graph import GraphedModel
from ..layers import cast_layers
from ..sparse.tensor import SparseTensor
from .cubes import CubeGrid, Progress, check_sparse, cube_grid, densify, in_cube, take
from .refined_field import CrossingCollector, RefinedField
from .unet import FP16_LAYERS, OFFICIAL_CHANNELS, UNet3D, conv3d_slabs, unet_groups


class VoxelRefinerSign(nn.Module):
    """`Voxel_RefinerXL_sign` (1024): one cube [B,1,P,P,P] of the downsampled SDF → sigmoid logits' sign."""

    def __init__(
        self,
        cfg: RefinerConfig = RefinerConfig(patch_size=256, sign=True),
        block_out_channels: tuple[int, ...] = OFFICIAL_CHANNELS,
    ):
        super().__init__()
        assert cfg.sign, "use VoxelRefiner for the refiner (512) config"
        self.cfg = cfg
        c0 = block_out_channels[0]
        self.unet3d1 = UNet3D(c0, block_out_channels, cfg.layers_per_block, cfg.layers_mid_block, unet_groups(c0))
        self.conv_in = nn.Conv3d(cfg.in_channels, c0, 3, padding=1)
        self.conv_out = nn.Conv3d(c0, cfg.out_channels, 3, padding=1)
        if cfg.use_fp16:
            cast_layers(self, torch.float16, FP16_LAYERS)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def forward(self, sdf: torch.Tensor) -> torch.Tensor:
        """sdf [B,1,P,P,P] → ±1 in sdf's dtype: +1 where sigmoid(logit) >= 0.5, the comparison made on the
        sigmoid in that dtype (in fp16 a slightly negative logit still rounds to 0.5 and counts as +1)."""
        p = torch.sigmoid(conv3d_slabs(self.conv_out, self.unet3d1(conv3d_slabs(self.conv_in, sdf))))
        return torch.where(p >= 0.5, 1.0, -1.0).to(p.dtype)


# Voxel keys are int32 while B·R2³ fits (one sample at 1024³: 2^30), else int64: at 60 M decoded voxels an int64
# key array is ~0.45 GB and its stable sort needs about three more of them.
INT32_KEYS_BELOW = 2**31


def _voxel_keys(coords: torch.Tensor, B: int, R2: int) -> torch.Tensor:
    """x-major key ((x·B + b)·R2 + y)·R2 + z of each voxel [N, 4] (b, x, y, z), so that every x-slab of the
    grid is one contiguous run of sorted keys."""
    dtype = torch.int32 if B * R2**3 < INT32_KEYS_BELOW else torch.int64
    c = coords.to(dtype)
    return ((c[:, 1] * B + c[:, 0]) * R2 + c[:, 2]) * R2 + c[:, 3]


def _downsample_mean(keys: torch.Tensor, values: torch.Tensor, B: int, R: int):
    """`sparse_downsample(·, 2)` of a one-channel field at 2R → (coords [M, 4] int32 at R, values [M, 1]), from
    the voxels' `_voxel_keys` at 2R (in decoded order).

    The same parents and the same mean, sum / (children + 1) in fp64 (§2.3), from one key per voxel instead
    of [N, 4] int64 parent coordinates (the decoded 1024 grid has ~50 M voxels). Children are added in decoded
    order with index_add_, as sparse_downsample does, so the values are bitwise its values.
    """
    R2 = 2 * R
    xb = keys // (R2 * R2)
    pkeys = xb % B * R + xb // B // 2  # parent (b, x), then y and z
    del xb
    pkeys = (pkeys * R + keys // R2 % R2 // 2) * R + keys % R2 // 2
    pkeys, inverse = torch.unique(pkeys, return_inverse=True)  # sorted (b, x, y, z), as sparse_downsample
    denom = torch.bincount(inverse, minlength=pkeys.numel()).double() + 1.0
    summed = torch.zeros(pkeys.numel(), dtype=torch.float64, device=values.device).index_add_(
        0, inverse, values.double()
    )
    del inverse
    out = torch.stack([pkeys // R**3, pkeys // R**2 % R, pkeys // R % R, pkeys % R], 1).int()
    return out, (summed / denom).to(values.dtype)[:, None]


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[..., Z] bool (Z % 8 == 0) → [..., Z/8] uint8, bit b of byte q = element 8q + b."""
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=bits.device)
    return (bits.view(*bits.shape[:-1], -1, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)


@torch.no_grad()
def remove_interior_1024(
    model: VoxelRefinerSign,
    sdf: SparseTensor,
    level: float = 0.2,
    grid: CubeGrid | None = None,
    progress: Progress | None = None,
    slab_rows: int = 16,
    near_band_only: bool = False,
    max_corners: int | None = None,
    consume: bool = False,
) -> RefinedField:
    """The sign refiner's `run()` without dense 1024³ grids.

    sdf: decoded SDF [N, 1] at coords in a grid of edge 2·grid.resolution (grid default: the config's
    tiling of the official 1024³ grid, `cube_grid(model.cfg, 1024)`; duplicate coordinates from
    chunk seams are allowed, as the original gets them). level: mc_threshold (0.2). The inside/outside
    sign is computed at grid.resolution on `sparse_downsample(sdf, 2)` (its sum/(n+1) mean included), one
    cube at a time, later cubes winning overlaps; the 1024 field is ±1 off the decoded voxels and the
    decoded value on them.

    near_band_only (off by default, not in the original): keep only cells touching a decoded voxel, which
    drops the blocky surfaces the coarse sign grid makes where it flips far from the decoded band.
    max_corners: see `remove_interior_512`.
    consume: the caller hands `sdf` over; it is emptied (`take`) and its coords and values freed once
    converted to sorted keys (the pipeline passes True: ~1 GB for 60 M decoded voxels).
    """
    grid = cube_grid(model.cfg, 1024) if grid is None else grid
    R, P, S = grid.resolution, grid.patch, grid.stride
    R2 = 2 * R
    if R % 8 or S % 8:
        raise ValueError(f"cube grid {grid} needs resolution and stride divisible by 8 for the packed sign grid.")
    check_sparse(sdf, R2, "SDF", model)
    dtype, device = model.dtype, sdf.device
    B = sdf.batch_size
    c, f_values = take(sdf) if consume else (sdf.coords, sdf.feats)
    f_values = f_values.reshape(-1).to(dtype)
    # decoded voxels as one key each; the [N, 4] coordinates (16 bytes a voxel, ~1 GB at 1024) go first, so
    # the downsampling and the sort below never hold them (under a 5 GiB cap that sort ran out of memory)
    f_keys = _voxel_keys(c, B, R2)
    del c
    c_coords, c_values = _downsample_mean(f_keys, f_values, B, R)
    bg = torch.ones(1, dtype=dtype, device=device)
    # the stable sort keeps duplicates (chunk seams) in their decoded order
    f_keys, order = torch.sort(f_keys, stable=True)
    f_values = f_values[order]
    del order
    one = torch.ones((), dtype=dtype, device=device)
    collector = CrossingCollector(R2, level, near=near_band_only, max_corners=max_corners)
    empty_out = None
    done = 0
    # a captured graph replays each cube's launches (cuda_graph.STAGES); freed before the meshing
    with GraphedModel(model, "refiner", copied=1) as cube:
        for i in range(3):
            # later cubes overwrite overlaps, so each cube ends up owning [origin, origin + S) per axis, the
            # last one up to R; a row of cubes (fixed i) thus settles the sign of 512-rows [x0, x1), which
            # are streamed out before the next row: only one row's sign bits are ever held
            x0, x1 = S * i, (S * (i + 1) if i < 2 else R)
            signs = torch.zeros(B, x1 - x0, R, R // 8, dtype=torch.uint8, device=device)  # bit set = +1 (outside)
            for j in range(3):
                for k in range(3):
                    origin = (S * i, S * j, S * k)
                    m = in_cube(c_coords, origin, P)
                    if bool(m.any()):
                        out = cube(densify(c_coords, c_values, m, origin, P, B, bg))
                    else:  # identical inputs → identical output; compute once
                        if empty_out is None:
                            empty_out = cube(bg.view(1, 1, 1, 1, 1).expand(B, 1, P, P, P))
                        out = empty_out
                    own = [S if o < 2 * S else P for o in origin]
                    part = out[:, 0, : own[0], : own[1], : own[2]] > 0
                    signs[:, :, origin[1] : origin[1] + own[1], origin[2] // 8 : (origin[2] + own[2]) // 8] = (
                        _pack_bits(part)
                    )
                    done += 1
                    if progress is not None:
                        progress(done, 27)
            # 1024 x-slabs of these rows: background ±1 from the sign bits, decoded values scattered on top
            starts = list(range(2 * x0, 2 * x1, slab_rows))
            edges = torch.tensor(starts + [2 * x1], device=device, dtype=f_keys.dtype) * (B * R2 * R2)
            bounds = torch.searchsorted(f_keys, edges).tolist()  # one sync per row of cubes
            for n, x in enumerate(starts):
                X = min(slab_rows, 2 * x1 - x)
                bits = _unpack_bits(signs[:, x // 2 - x0 : (x + X + 1) // 2 - x0])  # [B, ~X/2, R, R]
                bits = bits.repeat_interleave(2, 1)[:, x % 2 : x % 2 + X]
                bits = bits.repeat_interleave(2, 2).repeat_interleave(2, 3)  # [B, X, R2, R2]
                slab = torch.where(bits, one, -one)
                del bits
                k = f_keys[bounds[n] : bounds[n + 1]]
                z, y, xb = k % R2, k // R2 % R2, k // (R2 * R2)
                b, xr = xb % B, xb // B - x
                slab[b, xr, y, z] = f_values[bounds[n] : bounds[n + 1]]
                decoded = None
                if near_band_only:
                    decoded = torch.zeros(slab.shape, dtype=torch.bool, device=device)
                    decoded[b, xr, y, z] = True
                del k, z, y, xb, b, xr
                collector.push(slab, decoded)
            del signs
    return collector.finish(dtype, device)
