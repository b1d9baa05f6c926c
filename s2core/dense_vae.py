"""Dense shape VAE of the coarse stage (SPEC.md §7): 64³ occupancy ↔ 8×16³ latent.

The decoder turns the sampled latent into occupancy logits on a 64³ grid; thresholding them gives the
voxels that become the sparse tokens of the 512³ stage (`s2core/structure.py`). The encoder (training
only in the original) maps an occupancy grid back to a Gaussian posterior over latents.

Letters: `B` batch, `C` channels, `R` grid side (16 latent, 64 output), `E` latent channels (8).

Blocks: `ResBlock3d` = two (channel-LayerNorm → SiLU → Conv3d k3) with an identity skip; `Upsample3d` =
Conv3d to 8×C then a 3-D pixel shuffle ×2; `Downsample3d` = Conv3d k2 s2. Key names follow the
checkpoint (`encoder.*`, `decoder.*`; `middle_block.i`, `blocks.i`, `out_layer.0/.2`).

Precision (SPEC.md §7.2-7.3): with `use_fp16` the decoder runs every Conv3d in fp16 (norms in fp32, cast
back); the encoder runs only `blocks`/`middle_block` convs in fp16. `dtype=` picks fp16/bf16/fp32.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DenseVAEConfig
from .layers import ChannelLayerNorm32, cast_layers


class ResBlock3d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = ChannelLayerNorm32(channels, eps=1e-5)
        self.norm2 = ChannelLayerNorm32(channels, eps=1e-5)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + x


def pixel_shuffle_3d(x: torch.Tensor, r: int = 2) -> torch.Tensor:
    """`[B, C·r³, D, H, W]` → `[B, C, rD, rH, rW]`; input channel `c·r³ + a·r² + b·r + e` lands at
    output voxel `(r·d + a, r·h + b, r·w + e)` (SPEC.md §7.1)."""
    B, Cr, D, H, W = x.shape
    x = x.reshape(B, Cr // r**3, r, r, r, D, H, W).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(B, Cr // r**3, D * r, H * r, W * r)


class Upsample3d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels * 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


class Downsample3d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _out_layer(channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        ChannelLayerNorm32(channels, eps=1e-5), nn.SiLU(), nn.Conv3d(channels, out_channels, 3, padding=1)
    )


class DenseDecoder(nn.Module):
    """Latent `[B, E, 16, 16, 16]` → occupancy logits `[B, 1, 64, 64, 64]` (in the decoder's dtype)."""

    def __init__(self, cfg: DenseVAEConfig, dtype: torch.dtype):
        super().__init__()
        ch = cfg.model_channels_decoder
        self.dtype = dtype
        self.input_layer = nn.Conv3d(cfg.embed_dim, ch[0], 3, padding=1)
        self.middle_block = nn.Sequential(*[ResBlock3d(ch[0]) for _ in range(cfg.num_res_blocks_middle_decoder)])
        blocks = []
        for i, c in enumerate(ch):
            blocks += [ResBlock3d(c) for _ in range(cfg.num_res_blocks_decoder)]
            if i < len(ch) - 1:
                blocks.append(Upsample3d(c, ch[i + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.out_layer = _out_layer(ch[-1], cfg.out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.middle_block(self.input_layer(z.to(self.dtype)))  # [B, C0, 16³]
        for block in self.blocks:
            h = block(h)  # … → [B, C_last, 64³]
        return self.out_layer(h)  # [B, 1, 64³]


class DenseEncoder(nn.Module):
    """Occupancy `[B, 1, 64, 64, 64]` in {0, 1} → posterior parameters `[B, 2E, 16, 16, 16]` fp32 (mean ‖ logvar)."""

    def __init__(self, cfg: DenseVAEConfig, dtype: torch.dtype):
        super().__init__()
        ch = cfg.model_channels_encoder
        self.dtype = dtype
        self.input_layer = nn.Conv3d(cfg.in_channels, ch[0], 3, padding=1)
        blocks = []
        for i, c in enumerate(ch):
            blocks += [ResBlock3d(c) for _ in range(cfg.num_res_blocks_encoder)]
            if i < len(ch) - 1:
                blocks.append(Downsample3d(c, ch[i + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.middle_block = nn.Sequential(*[ResBlock3d(ch[-1]) for _ in range(cfg.num_res_blocks_middle_encoder)])
        self.out_layer = _out_layer(ch[-1], cfg.embed_dim * 2)

    def forward(self, occupancy: torch.Tensor) -> torch.Tensor:
        h = self.input_layer(occupancy.float() * 2.0 - 1.0)  # [B, C0, 64³] fp32
        # The original has no cast here (its fp16 encoder only ran under autocast in training); we cast
        # at the boundary so the fp16 torso gets fp16 inputs.
        h = h.to(self.dtype)
        for block in self.blocks:
            h = block(h)
        h = self.middle_block(h)  # [B, C_last, 16³]
        return self.out_layer(h.float())  # [B, 2E, 16³] fp32


class DenseVAE(nn.Module):
    """`DenseShapeVAE` (keys `encoder.*`, `decoder.*`); loads `model_dense.ckpt["vae"]` with `strict=True`."""

    def __init__(self, cfg: DenseVAEConfig = DenseVAEConfig(), dtype: torch.dtype | None = None):
        super().__init__()
        self.cfg = cfg
        dtype = dtype or (torch.float16 if cfg.use_fp16 else torch.float32)
        self.encoder = DenseEncoder(cfg, dtype)
        self.decoder = DenseDecoder(cfg, dtype)
        self.set_dtype(dtype)

    def set_dtype(self, dtype: torch.dtype) -> "DenseVAE":
        """Convs in `dtype` — every decoder conv, the encoder's torso only (its input/out layers stay fp32) —
        and norms in fp32, as the original's `use_fp16` (SPEC.md §7.2-7.3). Call it again after
        `load_state_dict(..., assign=True)`, which adopts the checkpoint's dtypes."""
        self.encoder.dtype = self.decoder.dtype = dtype
        self.float()
        for part in (self.decoder, self.encoder.blocks, self.encoder.middle_block):
            cast_layers(part, dtype, (nn.Conv3d,))
        return self

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampled latents `[B, E, 16³]` → occupancy logits `[B, 1, 64³]`, undoing the latent scale/shift first."""
        z = (1.0 / self.cfg.latents_scale) * latents + self.cfg.latents_shift  # the original's order of ops
        return self.decoder(z)

    def encode(
        self, occupancy: torch.Tensor, generator: torch.Generator | None = None, sample_posterior: bool = False
    ) -> torch.Tensor:
        """Occupancy `[B, 1, 64³]` → latents `[B, E, 16³]` fp32: the posterior mean, or a sample with `generator`.

        logvar is clamped to [−30, 20] as in the original's `DiagonalGaussianDistribution`.
        """
        mean, logvar = self.encoder(occupancy).chunk(2, dim=1)
        if not sample_posterior:
            return mean
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise
