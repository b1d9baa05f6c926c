"""The 512 refiner `Voxel_RefinerXL` (config key `refiner`) and its streaming run (SPARSE.md §8.2).

Per cube, `tanh` of a UNet over the SDF and the decoder's 32-channel features, with three "adaptive"
per-voxel 3×3×3 filters. The 27 cube outputs are cross-faded along z, then y, then x into the refined
field, meshed at 2 × mc_threshold. The original builds a 32-channel fp16 512³ feature grid (~8.6 GB)
and keeps all 27 cube outputs; `remove_interior_512` densifies one cube at a time from the sparse voxels,
keeps one row of 9 cube outputs and streams x-slabs of the blended field into a `RefinedField`.

Letters: B batch, P cube edge, S cube stride, O = P - S overlap, R grid edge, N decoded voxels.
Attribute names are the checkpoint's (`unet3d1`, `latent_mlp.net`, `adaptive_conv1.0`), odd as some are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._kernels import adaptive_filter as _af
from ..config import RefinerConfig
from ..cuda_graph import GraphedModel
from ..layers import cast_layers
from ..sparse.tensor import SparseTensor
from .cubes import CubeGrid, Progress, check_sparse, cube_grid, densify, in_cube, take
from .refined_field import CrossingCollector, RefinedField
from .unet import FP16_LAYERS, OFFICIAL_CHANNELS, UNet3D, conv3d_slabs, unet_groups


class LatentMLP(nn.Module):
    """Per-voxel MLP on the decoder's features: 32 → 32 → 32 → 32 → 8 with ReLU (`latent_mlp.net.{0,2,4,6}`)."""

    def __init__(self, cin: int = 32, hidden: int = 32, cout: int = 8):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(cin, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _filter_head(cin: int) -> nn.Sequential:
    # predicts 27 per-voxel tap weights: conv3 → ReLU → conv3 (no bias)
    return nn.Sequential(nn.Conv3d(cin, cin, 3, padding=1), nn.ReLU(), nn.Conv3d(cin, 27, 3, padding=1, bias=False))


def adaptive_filter(x: torch.Tensor, head: nn.Module, source: torch.Tensor | None = None) -> torch.Tensor:
    """Apply 3 times a per-voxel 3×3×3 filter (shared over channels) predicted from `source` (default x).

    Weights are L1-normalised over the 27 taps. Tap t = 9a + 3b + c reads x at offset (a-1, b-1, c-1)
    with zero padding. Terms are added one tap at a time in tap order, in x's dtype, as the original
    does, so fp16 rounding matches (bit for bit; on CUDA one Triton kernel a step, `kernels/adaptive_filter.py`).
    """
    w = F.normalize(head(x if source is None else source), p=1, dim=1).contiguous()  # [B, 27, P, P, P]
    for _ in range(3):
        x = _af.adaptive_filter_step(x, w)
    return x


class VoxelRefiner(nn.Module):
    """`Voxel_RefinerXL` (512): one cube [B,1,P,P,P] SDF + [B,32,P,P,P] features → [B,1,P,P,P] field in (-1, 1)."""

    def __init__(self, cfg: RefinerConfig = RefinerConfig(), block_out_channels: tuple[int, ...] = OFFICIAL_CHANNELS):
        # block_out_channels is fixed in the released models; smaller values only for tests / tiny runs
        super().__init__()
        assert not cfg.sign, "use VoxelRefinerSign for the refiner_1024 config"
        self.cfg = cfg
        c0 = block_out_channels[0]
        self.unet3d1 = UNet3D(c0 + 8, block_out_channels, cfg.layers_per_block, cfg.layers_mid_block, unet_groups(c0))
        self.conv_in = nn.Conv3d(cfg.in_channels, c0, 3, padding=1)
        self.latent_mlp = LatentMLP(32, 32, 8)
        self.adaptive_conv1 = _filter_head(c0)
        self.adaptive_conv2 = _filter_head(c0)
        self.adaptive_conv3 = _filter_head(c0)
        self.mid_conv = nn.Conv3d(c0, c0, 3, padding=1)
        self.conv_out = nn.Conv3d(c0, cfg.out_channels, 3, padding=1)
        if cfg.use_fp16:
            cast_layers(self, torch.float16, FP16_LAYERS)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def refine_cube(self, sdf: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """sdf [B,1,P,P,P], latent = latent_mlp(features) [B,8,P,P,P] → tanh field [B,1,P,P,P]."""
        h = torch.cat([conv3d_slabs(self.conv_in, sdf), latent], dim=1)  # [B, C0+8, P, P, P]
        u = self.unet3d1(h).contiguous()  # [B, C0, P, P, P]; NCDHW again for the adaptive filters
        u = adaptive_filter(u, self.adaptive_conv1)
        u = self.mid_conv(u)
        u = adaptive_filter(u, self.adaptive_conv2)
        o = conv3d_slabs(self.conv_out, u)  # [B, 1, P, P, P]
        o = adaptive_filter(o, self.adaptive_conv3, source=u)
        return torch.tanh(o)

    def forward(self, sdf: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """The original's per-cube computation on dense inputs: sdf [B,1,P,P,P], feats [B,32,P,P,P]."""
        latent = self.latent_mlp(feats.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        return self.refine_cube(sdf, latent)


def _blend(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, dim: int) -> torch.Tensor:
    """Linear cross-fade a → b along `dim`, the original's expression and rounding: a·(1-w) + b·w."""
    shape = [1] * a.ndim
    shape[dim] = -1
    w = w.view(shape)
    return a * (1 - w) + b * w


def _stitch(parts: list[torch.Tensor], dim: int, grid: CubeGrid, w: torch.Tensor) -> torch.Tensor:
    """Three cube outputs (extent P along dim) → one tensor of extent R: first cube up to S, cross-fades on
    the two O-wide overlaps, middle cube's [O, S), last cube's [O, P) (§8.2 step 3)."""
    S, P, O = grid.stride, grid.patch, grid.overlap
    p0, p1, p2 = (p.narrow(dim, 0, P) for p in parts)
    return torch.cat(
        [
            p0.narrow(dim, 0, S),
            _blend(p0.narrow(dim, S, O), p1.narrow(dim, 0, O), w, dim),
            p1.narrow(dim, O, S - O),
            _blend(p1.narrow(dim, S, O), p2.narrow(dim, 0, O), w, dim),
            p2.narrow(dim, O, P - O),
        ],
        dim,
    )


@torch.no_grad()
def remove_interior_512(
    model: VoxelRefiner,
    sdf: SparseTensor,
    feats: SparseTensor | torch.Tensor,
    level: float = 0.4,
    grid: CubeGrid | None = None,
    progress: Progress | None = None,
    slab_rows: int = 32,
    max_corners: int | None = None,
    consume: bool = False,
) -> RefinedField:
    """The 512 refiner's `run()` without dense 512³ grids.

    sdf: decoded SDF, feats [N, 1] at coords [N, 4] in a grid of edge grid.resolution (default: the
    config's tiling of the official 512³ grid, `cube_grid(model.cfg, 512)`); feats: the
    decoder's 32-channel features for the same rows (SparseTensor or [N, 32] tensor). level: the pipeline
    passes 2 × mc_threshold = 0.4. progress(done, total) is called after each of the 27 cubes (it may
    raise to cancel). Returns the refined field's straddling cells (`RefinedField`); raises ValueError
    when more than max_corners (default `max_crossing_corners(R)`) voxels straddle, i.e. the field is noise.
    consume: the caller hands `feats` over; it is emptied (`take`) and its memory freed once the per-voxel
    MLP has read it (the pipeline passes True: 0.9 GB at 512).
    """
    grid = cube_grid(model.cfg, 512) if grid is None else grid
    R, P, S = grid.resolution, grid.patch, grid.stride
    check_sparse(sdf, R, "SDF", model)
    dtype, device = model.dtype, sdf.device
    fe = feats.feats if isinstance(feats, SparseTensor) else feats
    if fe.shape[0] != sdf.coords.shape[0]:
        raise ValueError(
            f"The decoder features have {fe.shape[0]} rows but the SDF has {sdf.coords.shape[0]}; "
            "pass the features decoded together with this SDF (return_feat)."
        )
    B, coords = sdf.batch_size, sdf.coords
    values = sdf.feats.reshape(-1, 1).to(dtype)
    # latent_mlp is per voxel, so running it on the N decoded rows (and once on the zero background
    # vector) equals running it on the dense feature grid, without the 32-channel grid
    bg_latent = model.latent_mlp(torch.zeros(1, fe.shape[1], dtype=dtype, device=device))[0]  # [8]
    if consume and isinstance(feats, SparseTensor):
        _, fe = take(feats)
    latent = torch.cat([model.latent_mlp(c.to(dtype)) for c in fe.split(1 << 20)])  # [N, 8]
    del fe
    bg_sdf = torch.ones(1, dtype=dtype, device=device)
    w = torch.linspace(0, 1, grid.overlap, device=device, dtype=dtype)
    empty_out = None
    collector = CrossingCollector(R, level, max_corners=max_corners)
    prev_tail = None  # x-overlap rows of the previous cube row, stitched over y and z
    origins = grid.origins()
    done = 0
    # a captured graph replays each cube's launches (cuda_graph.STAGES); freed before the meshing
    with GraphedModel(model.refine_cube, "refiner", copied=2) as cube:
        for i in range(3):
            row = []
            for j in range(3):
                for k in range(3):
                    origin = origins[9 * i + 3 * j + k]
                    m = in_cube(coords, origin, P)
                    if bool(m.any()):
                        out = cube(
                            densify(coords, values, m, origin, P, B, bg_sdf),
                            densify(coords, latent, m, origin, P, B, bg_latent),
                        )
                    else:  # identical inputs → identical output; compute once
                        if empty_out is None:
                            empty_out = cube(
                                bg_sdf.view(1, 1, 1, 1, 1).expand(B, 1, P, P, P),
                                bg_latent.view(1, 8, 1, 1, 1).expand(B, 8, P, P, P),
                            )
                        out = empty_out
                    row.append(out[:, 0])  # [B, P, P, P]
                    done += 1
                    if progress is not None:
                        progress(done, 27)

            def layer(row: list[torch.Tensor], x_lo: int, x_hi: int) -> torch.Tensor:
                # z first (the original's "lines"), then y ("layers"): [B, x_hi-x_lo, R, R]
                lines = [_stitch([row[3 * j + k][:, x_lo:x_hi] for k in range(3)], 3, grid, w) for j in range(3)]
                return _stitch(lines, 2, grid, w)

            if i > 0:
                collector.push(_blend(prev_tail, layer(row, 0, grid.overlap), w, 1))
            core_lo, core_hi = (0 if i == 0 else grid.overlap), (S if i < 2 else P)
            for x in range(core_lo, core_hi, slab_rows):
                collector.push(layer(row, x, min(x + slab_rows, core_hi)))
            prev_tail = layer(row, S, P) if i < 2 else None
            del row
    return collector.finish(dtype, device)
