"""Dense DiT: the coarse-stage flow model over a 16³ grid of 8-channel latents (SPEC.md §8).

A DiT with adaLN-Zero modulation and cross attention to the DINOv2 tokens:
tokens = the 16³ latent voxels (row-major, token r ↔ voxel (i, j, k) with r = 256 i + 16 j + k), plus a
fixed sin/cos absolute position table; each block does modulated self attention, plain cross attention
to the image tokens, and a modulated MLP. It predicts the flow velocity for the sampler.

Letters: `B` batch, `L = (R/p)³` tokens, `C` model channels, `Lc` condition tokens, `Cc` their channels,
`R` resolution (16), `p` patch size (1 in every release).

Precision (SPEC.md §8.5): with `dtype=float16` (the release) every Linear holds fp16 weights, LayerNorm
affine params, RMS-norm gammas and `pos_emb` stay fp32, norms compute in fp32 and cast back. `bfloat16`
works the same way; `float32` runs everything in fp32.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import CrossAttention, SelfAttention
from .config import DenseDiTConfig
from .layers import FeedForward, LayerNorm32, absolute_position_embedding, cast_layers


@functools.lru_cache(maxsize=16)
def _frequencies(half: int, max_period: float, device: torch.device) -> torch.Tensor:
    """The frequency table, built on the CPU in fp32 and copied to `device` once: a copy from host memory
    inside the forward could not be captured in a CUDA graph (`cuda_graph.py`)."""
    with torch.inference_mode(False):  # a plain tensor, usable outside inference mode too
        return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(device)


def timestep_frequencies(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) timesteps: `t [N]` → `[N, dim]` fp32, cosines first.

    The frequency table is built on the CPU in fp32, as the original does, so it is bitwise the same on
    every device.
    """
    half = dim // 2
    args = t[:, None].float() * _frequencies(half, max_period, t.device)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def absolute_position_table(grid: int, channels: int) -> torch.Tensor:
    """The `pos_emb` buffer (SPEC.md §8.2): `[grid³, channels]` fp32, computed on the CPU: the position
    embedding of the voxels (i, j, k) in row-major order."""
    idx = torch.arange(grid)
    coords = torch.stack(torch.meshgrid(idx, idx, idx, indexing="ij"), dim=-1).reshape(-1, 3)  # [L, 3] int64
    return absolute_position_embedding(coords, channels)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """`[B, C, R, R, R]` → `[B, C·p³, R/p, R/p, R/p]`, channel index `c·p³ + a·p² + b·p + e` (identity for p=1)."""
    if p == 1:
        return x
    B, C, D, H, W = x.shape
    x = x.reshape(B, C, D // p, p, H // p, p, W // p, p).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(B, C * p**3, D // p, H // p, W // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `patchify`."""
    if p == 1:
        return x
    B, Cp, D, H, W = x.shape
    x = x.reshape(B, Cp // p**3, p, p, p, D, H, W).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(B, Cp // p**3, D * p, H * p, W * p)


class TimestepEmbedder(nn.Module):
    """`t [N]` → `[N, C]`: sinusoidal features (256) → Linear → SiLU → Linear (keys `mlp.0`, `mlp.2`)."""

    def __init__(self, channels: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, channels), nn.SiLU(), nn.Linear(channels, channels))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_frequencies(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


class ModulatedCrossBlock(nn.Module):
    """adaLN-Zero block: modulated self attention, cross attention, modulated MLP (SPEC.md §8.4).

    `norm1`/`norm3` have no parameters; `norm2` (before cross attention) is affine. `adaLN_modulation.1`
    maps SiLU(t_emb) to (shift, scale, gate) for attention then MLP, in that order.
    """

    def __init__(
        self,
        channels: int,
        ctx_channels: int,
        num_heads: int,
        mlp_ratio: float,
        qk_rms_norm: bool,
        qk_rms_norm_cross: bool,
        share_mod: bool,
    ):
        super().__init__()
        self.share_mod = share_mod
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = SelfAttention(channels, num_heads, qk_rms_norm=qk_rms_norm)
        self.cross_attn = CrossAttention(channels, ctx_channels, num_heads, qk_rms_norm=qk_rms_norm_cross)
        self.mlp = FeedForward(channels, mlp_ratio)
        if not share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels))

    def forward(self, x: torch.Tensor, mod: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x [B, L, C], mod [B or 1, C] (or [., 6C] when shared), context [B, Lc, C]
        if not self.share_mod:
            mod = self.adaLN_modulation(mod)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (m.unsqueeze(1) for m in mod.chunk(6, dim=1))
        h = self.norm1(x) * (1 + scale_a) + shift_a
        x = x + self.self_attn(h) * gate_a
        x = x + self.cross_attn(self.norm2(x), context)
        h = self.norm3(x) * (1 + scale_m) + shift_m
        return x + self.mlp(h) * gate_m


class DenseDiT(nn.Module):
    """Velocity model of the coarse stage: `(x [B, 8, R, R, R], t [1 or B], cond [B, Lc, Cc])` → `[B, 8, R, R, R]`.

    `dtype` is the compute dtype of the Linear layers (default: fp16 when `cfg.use_fp16`, as released).
    Loads the official `model_dense.ckpt["dit"]` with `strict=True` (the fp32 `pos_emb` buffer included).
    """

    def __init__(self, cfg: DenseDiTConfig = DenseDiTConfig(), dtype: torch.dtype | None = None):
        super().__init__()
        if cfg.pe_mode != "ape":
            raise ValueError(f"Dense DiT pe_mode {cfg.pe_mode!r} is not supported; every release uses 'ape'.")
        self.cfg = cfg
        self.dtype = dtype or (torch.float16 if cfg.use_fp16 else torch.float32)
        C, p = cfg.model_channels, cfg.patch_size
        self.grid = cfg.resolution // p
        self.t_embedder = TimestepEmbedder(C)
        if cfg.share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.register_buffer("pos_emb", absolute_position_table(self.grid, C))  # [L, C] fp32, in the checkpoint
        self.input_layer = nn.Linear(cfg.in_channels * p**3, C)
        self.blocks = nn.ModuleList(
            [
                ModulatedCrossBlock(
                    C,
                    cfg.cond_channels,
                    cfg.num_heads,
                    cfg.mlp_ratio,
                    cfg.qk_rms_norm,
                    cfg.qk_rms_norm_cross,
                    cfg.share_mod,
                )
                for _ in range(cfg.num_blocks)
            ]
        )
        self.out_layer = nn.Linear(C, cfg.out_channels * p**3)
        self.set_dtype(self.dtype)

    def set_dtype(self, dtype: torch.dtype) -> "DenseDiT":
        """Every Linear in `dtype`; everything else (norms, gammas, `pos_emb`) in fp32, as `convert_to_fp16`.

        Call it again after `load_state_dict(..., assign=True)`, which adopts the checkpoint's dtypes.
        """
        self.dtype = dtype
        cast_layers(self.float(), dtype, (nn.Linear,))
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        cfg, B = self.cfg, x.shape[0]
        assert tuple(x.shape[1:]) == (cfg.in_channels, *[cfg.resolution] * 3), f"bad latent shape {tuple(x.shape)}"
        h = patchify(x, cfg.patch_size).flatten(2).transpose(1, 2).contiguous()  # [B, L, 8p³]
        h = self.input_layer(h.to(self.dtype)) + self.pos_emb[None]  # [B, L, C], promoted to fp32 like the original
        t_emb = self.t_embedder(t)  # [1 or B, C]
        if cfg.share_mod:
            t_emb = self.adaLN_modulation(t_emb)
        t_emb, h, cond = t_emb.to(self.dtype), h.to(self.dtype), cond.to(self.dtype)
        for block in self.blocks:
            h = block(h, t_emb, cond)
        h = F.layer_norm(h.to(x.dtype), h.shape[-1:])  # no affine, eps 1e-5, in x's dtype
        h = self.out_layer(h.to(self.dtype)).to(x.dtype)  # [B, L, 8p³]
        h = h.transpose(1, 2).reshape(B, -1, *[self.grid] * 3)
        return unpatchify(h, cfg.patch_size)
