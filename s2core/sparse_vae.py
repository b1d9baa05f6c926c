"""Sparse SDF VAE (SS-VAE) of Direct3D-S2: latent tokens on a 64^3 / 128^3 grid <-> a narrow-band sparse
SDF on the 512^3 / 1024^3 grid (SPARSE.md §4).

Decoder (the part inference uses): SparseLinear(16 -> 512) + absolute position embedding, four
pre-LN transformer blocks with windowed ("swin") self-attention (window 8, shift 0/4 alternating),
then three SparseSubdivideBlock3d (conv3 -> SiLU -> subdivide x2 -> conv3 -> SiLU; 512 -> 128 -> 64
-> 32 channels) and SparseLinear(32 -> 1) + tanh. Every latent token becomes 8^3 = 512 SDF voxels.
The 1024 VAE (chunk_size 4) runs the upsampling head per spatial chunk, as the original does in eval
mode, seam duplicates included (§4.5). The encoder (training only) mirrors it with SparseDownBlock3d.

Dimension letters: `N` active voxels/tokens, `C` channels (512), `H` heads (8), `D` head dim (64),
`B` batch elements. Attribute names are the checkpoint's (`act_layers`, `out_layers`, `mlp.mlp.0`,
`conv.kernel`...), including the odd ones. With `use_fp16` every Linear and conv holds fp16 weights
and GroupNorm stays fp32, as the original's `convert_to_fp16`; norms compute in fp32.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SparseVAEConfig
from .layers import FeedForward, LayerNorm32, absolute_position_embedding, cast_layers
from .sparse import (
    SparseConv3d,
    SparseGroupNorm32,
    SparseLinear,
    SparseSiLU,
    SparseTensor,
    sparse_downsample,
    sparse_subdivide_conv3d,
    windowed_self_attention,
)

WINDOW_SIZE = 8  # SparseSDFEncoder/Decoder constructor default ("swin" mode); not in config.json
MLP_RATIO = 4
UPSAMPLE_RATIO = 8  # three subdivisions
CHUNK_PADDING = 4  # latent cells of context around each chunk (the original's split_for_meshing)


# ------------------------------------------------------------------------------------------------
# transformer trunk


class WindowedSelfAttention(nn.Module):
    def __init__(self, channels: int, num_heads: int, window_size: int, shift: int):
        super().__init__()
        self.num_heads, self.window_size, self.shift = num_heads, window_size, shift
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: SparseTensor) -> torch.Tensor:
        n, c = x.feats.shape
        qkv = self.to_qkv(x.feats).view(n, 3, self.num_heads, c // self.num_heads)  # [N, 3, H, D]
        h = windowed_self_attention(qkv, x.coords, self.window_size, self.shift, x.cache)  # [N, H, D]
        return self.to_out(h.reshape(n, c))


class SparseTransformerBlock(nn.Module):
    """x += attn(LN(x)); x += mlp(LN(x)); LayerNorms without affine, eps 1e-6, fp32."""

    def __init__(self, channels: int, num_heads: int, window_size: int, shift: int):
        super().__init__()
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.attn = WindowedSelfAttention(channels, num_heads, window_size, shift)
        self.mlp = FeedForward(channels, MLP_RATIO)

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = self.attn(x.replace(self.norm1(x.feats)))
        x = x.replace(x.feats + h)
        return x.replace(x.feats + self.mlp(self.norm2(x.feats)))


class SparseTransformerTrunk(nn.Module):
    """Base of encoder and decoder: input_layer + APE, then blocks alternating window shift 0 / 4.

    `input_layer` and `blocks` sit directly on the encoder/decoder, as the checkpoint's keys do."""

    def _build_trunk(self, in_channels: int, channels: int, num_blocks: int, num_heads: int, use_fp16: bool):
        self.channels = channels
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.input_layer = nn.Linear(in_channels, channels)
        self.blocks = nn.ModuleList(
            [
                SparseTransformerBlock(channels, num_heads, WINDOW_SIZE, WINDOW_SIZE // 2 * (i % 2))
                for i in range(num_blocks)
            ]
        )

    def run_trunk(self, x: SparseTensor, factor: float | None = None) -> SparseTensor:
        h = self.input_layer(x.feats.to(self.input_layer.weight.dtype))  # [N, C]
        pos = x.coords[:, 1:].float()
        pos = pos * factor if factor is not None else pos
        h = (h + absolute_position_embedding(pos, self.channels)).to(self.dtype)  # APE added in fp32
        h = x.replace(h)
        for block in self.blocks:
            h = block(h)
        return h


# ------------------------------------------------------------------------------------------------
# decoder


class SparseSubdivideBlock3d(nn.Module):
    """SiLU(conv3(C -> C')) at the coarse grid, subdivide, SiLU(conv3(C' -> C')) at the fine grid."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        # the SiLUs act in place on the convs' fresh outputs (at the 512 decoder's last level a copy is 0.9 GB)
        self.act_layers = nn.Sequential(SparseConv3d(channels, out_channels, 3), SparseSiLU(inplace=True))
        self.out_layers = nn.Sequential(SparseConv3d(out_channels, out_channels, 3), SparseSiLU(inplace=True))

    def forward(self, x: SparseTensor) -> SparseTensor:
        # conv(subdivide(h)) in one step: on CUDA the children's copied features are never built
        conv, silu = self.out_layers
        return silu(sparse_subdivide_conv3d(self.act_layers(x), conv.conv.kernel, conv.conv.bias))


class SparseSDFDecoder(SparseTransformerTrunk):
    def __init__(self, cfg: SparseVAEConfig):
        super().__init__()
        c = cfg.model_channels_decoder
        self.resolution = cfg.resolution
        self.chunk_size = cfg.chunk_size
        self._build_trunk(cfg.embed_dim, c, cfg.num_blocks_decoder, cfg.num_heads_decoder, cfg.use_fp16)
        self.upsample = nn.ModuleList(
            [
                SparseSubdivideBlock3d(c, c // 4),
                SparseSubdivideBlock3d(c // 4, c // 8),
                SparseSubdivideBlock3d(c // 8, c // 16),
            ]
        )
        self.out_layer = SparseLinear(c // 16, cfg.out_channels)
        if cfg.use_fp16:
            cast_layers(self, torch.float16, (nn.Linear, SparseConv3d))  # convert_to_fp16: norms stay fp32

    def head(self, h: SparseTensor, out_dtype: torch.dtype) -> tuple[SparseTensor, SparseTensor]:
        """Upsampling stack + out_layer + tanh -> (sdf [N*512, 1], features [N*512, C/16])."""
        for block in self.upsample:
            h = block(h)
        feat = h.type(out_dtype)
        sdf = torch.tanh(self.out_layer.forward(feat.type(self.out_layer.weight.dtype)).feats)
        # fresh caches: the fine grid's [N, 27] kernel map (108 bytes a voxel, more than the features) is
        # of no use after the decoder and would otherwise live as long as the caller keeps the outputs
        return (
            SparseTensor(sdf, h.coords, h.batch_size, h.offsets),
            SparseTensor(feat.feats, h.coords, h.batch_size, h.offsets),
        )

    def forward(self, x: SparseTensor, factor: float | None = None, return_feat: bool = False, check_cancel=None):
        """Latent tokens x (feats [N, 16], coords at the latent grid) -> sparse SDF at 8x the resolution.

        Unchunked (512 VAE): returns sdf, or (sdf, features) with return_feat. Chunked (1024 VAE): returns
        sdf only, with the original's seam duplicates (return_feat is ignored, as in the original).
        check_cancel() (raises to stop) is called before each chunk.
        """
        h = self.run_trunk(x, factor)
        if self.chunk_size <= 1:
            sdf, feat = self.head(h, x.dtype)
            return (sdf, feat) if return_feat else sdf
        return self.decode_chunked(h, x.dtype, check_cancel)

    @torch.no_grad()
    def decode_chunked(self, h: SparseTensor, out_dtype: torch.dtype, check_cancel=None) -> SparseTensor:
        """Run the head per chunk of (resolution / chunk_size)^3 latent cells with 4 cells of context.

        Matches the original's eval path (SPARSE.md §4.5): chunks in (i, j, k) order, z innermost; a chunk
        keeps output voxels in [i*S*8, (i+1)*S*8 + 7) per axis, so neighbouring chunks both emit up to 7
        layers at each seam (duplicate coordinates, equal values). Rows come chunk by chunk in chunk-input
        order; for B > 1 they are then stably grouped by batch element (the original leaves them
        interleaved, which its own layout computation does not support).
        """
        res, n_chunks, pad = self.resolution, self.chunk_size, CHUNK_PADDING
        sub = res // n_chunks
        assert sub % pad == 0, f"chunk size {sub} is not a multiple of the padding {pad}"
        xyz = h.coords[:, 1:]
        feats_out, coords_out = [], []
        for i in range(n_chunks):  # a loop over chunks, not voxels
            for j in range(n_chunks):
                for k in range(n_chunks):
                    if check_cancel is not None:
                        check_cancel()
                    lo = torch.tensor([max(0, c * sub - pad) for c in (i, j, k)], device=h.device, dtype=xyz.dtype)
                    hi = torch.tensor(
                        [min((c + 1) * sub + pad, res) for c in (i, j, k)], device=h.device, dtype=xyz.dtype
                    )
                    rows = torch.nonzero(((xyz >= lo) & (xyz < hi)).all(1)).squeeze(1)
                    if rows.numel() == 0:
                        continue
                    coords = h.coords[rows].clone()
                    coords[:, 1:] -= lo
                    chunk = SparseTensor(h.feats[rows], coords, h.batch_size)
                    sdf, _ = self.head(chunk, out_dtype)
                    out_xyz = sdf.coords[:, 1:] + lo * UPSAMPLE_RATIO
                    keep_lo = torch.tensor(
                        [c * sub * UPSAMPLE_RATIO for c in (i, j, k)], device=h.device, dtype=xyz.dtype
                    )
                    keep = ((out_xyz >= keep_lo) & (out_xyz < keep_lo + sub * UPSAMPLE_RATIO + UPSAMPLE_RATIO - 1)).all(
                        1
                    )
                    keep = torch.nonzero(keep).squeeze(1)
                    coords_out.append(torch.cat([sdf.coords[keep, :1], out_xyz[keep]], 1))
                    feats_out.append(sdf.feats[keep])
                    # drop this chunk's fine-grid tensors before the next chunk's head runs (else two
                    # chunks' worth of upsampled voxels are alive at once)
                    del sdf, out_xyz, keep, chunk, coords, rows
        if not coords_out:
            return SparseTensor(
                self.out_layer.weight.new_zeros(0, self.out_layer.out_features), h.coords.new_zeros(0, 4), h.batch_size
            )
        coords = torch.cat(coords_out)
        del coords_out[:]  # concatenate one list at a time: at most one extra copy alive
        feats = torch.cat(feats_out)
        del feats_out[:]
        if h.batch_size > 1:
            order = torch.sort(coords[:, 0], stable=True).indices
            coords, feats = coords[order], feats[order]
        return SparseTensor(feats, coords, h.batch_size)


# ------------------------------------------------------------------------------------------------
# encoder (training only; kept for strict loading and round-trip tests)


class SparseDownBlock3d(nn.Module):
    """h = SiLU(GN(x)); pool both h and x by 2 (sum/(n+1)); h = conv3, GN, SiLU, conv3; out = h + skip(x)."""

    def __init__(self, channels: int, out_channels: int, num_groups: int = 32):
        super().__init__()
        # groups <= channels only matters for tiny test configs; official widths are >= 32
        self.act_layers = nn.Sequential(SparseGroupNorm32(min(num_groups, channels), channels), SparseSiLU())
        self.out_layers = nn.Sequential(
            SparseConv3d(channels, out_channels, 3),
            SparseGroupNorm32(min(num_groups, out_channels), out_channels),
            SparseSiLU(),
            SparseConv3d(out_channels, out_channels, 3),
        )
        self.skip_connection = SparseConv3d(channels, out_channels, 1) if out_channels != channels else nn.Identity()

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = sparse_downsample(self.act_layers(x), 2)
        x = sparse_downsample(x, 2)
        h = self.out_layers(x.replace(h.feats))  # same coords: share x's kernel-map cache
        return h + self.skip_connection(x).feats


class SparseSDFEncoder(SparseTransformerTrunk):
    def __init__(self, cfg: SparseVAEConfig):
        super().__init__()
        c = cfg.model_channels_encoder
        self.input_layer1 = SparseLinear(1, c // 16)
        self.downsample = nn.ModuleList(
            [SparseDownBlock3d(c // 16, c // 8), SparseDownBlock3d(c // 8, c // 4), SparseDownBlock3d(c // 4, c)]
        )
        self._build_trunk(c, c, cfg.num_blocks_encoder, cfg.num_heads_encoder, cfg.use_fp16)
        self.out_layer = SparseLinear(c, 2 * cfg.embed_dim)
        if cfg.use_fp16:
            cast_layers(self, torch.float16, (nn.Linear, SparseConv3d))  # convert_to_fp16: norms stay fp32

    def forward(self, x: SparseTensor, factor: float | None = None) -> SparseTensor:
        """Sparse SDF x (feats [N, 1] at the fine grid) -> [N', 2*embed_dim] (mean, logvar) at the latent grid."""
        x = self.input_layer1(x.type(self.input_layer1.weight.dtype))
        for block in self.downsample:
            x = block(x)
        h = self.run_trunk(x, factor).type(x.dtype)
        h = h.replace(F.layer_norm(h.feats, h.feats.shape[-1:]))  # no affine, eps 1e-5, in the feats dtype
        return self.out_layer(h)


class SparseSDFVAE(nn.Module):
    """`encoder.*` and `decoder.*` of model_sparse_{512,1024}.ckpt (key `vae`)."""

    def __init__(self, cfg: SparseVAEConfig = SparseVAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = SparseSDFEncoder(cfg)
        self.decoder = SparseSDFDecoder(cfg)

    def encode(
        self,
        sdf: SparseTensor,
        sample: bool = False,
        generator: torch.Generator | None = None,
        factor: float | None = None,
    ) -> SparseTensor:
        """Posterior mean (or a sample) of the latent, logvar clamped to [-30, 20] as the original."""
        h = self.encoder(sdf, factor)
        mean, logvar = h.feats.float().chunk(2, dim=1)
        z = mean
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            z = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)
        return h.replace(z.to(h.dtype))

    def decode(self, latent: SparseTensor, factor: float = 1.0, return_feat: bool = False, check_cancel=None):
        """Sampled latent -> sparse SDF in (-1, 1) at resolution * 8 (see SparseSDFDecoder.forward).

        Applies the original pipeline's `1 / latents_scale * latents + latents_shift` first (identity
        for the released 1.0 / 0.0)."""
        feats = (1.0 / self.cfg.latents_scale) * latent.feats + self.cfg.latents_shift
        return self.decoder(latent.replace(feats), factor, return_feat, check_cancel)

    @property
    def sdf_resolution(self) -> int:
        return self.cfg.resolution * UPSAMPLE_RATIO
