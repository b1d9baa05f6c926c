"""Sparse DiT: the flow model of the 512 and 1024 stages over sparse 16-channel latents (SPARSE.md §5).

A DiT over the active voxels of a 64³ (512 stage) or 128³ (1024 stage) latent grid: an input Linear plus a
sin/cos absolute position embedding of the voxel coordinates (× `factor`: 0.5 at 1024), then 24 blocks of
adaLN-modulated Spatial Sparse Attention (`ssa.py`), plain cross attention to the image tokens and a
modulated MLP; a final LayerNorm and Linear predict the flow velocity of every voxel.

Letters: `N` voxels (tokens, block-sorted), `C` model channels (1024), `Cc` condition channels, `L` condition
tokens, `H` query heads (32), `D` head dim (32), `B` samples.

Precision (§5.4): with fp16 (the release) every Linear and sparse-conv weight is fp16; the affine `norm2`, the
compression GroupNorms and `intra_block_pe` stay fp32; norms compute in fp32 and cast back.

Parameter names are the checkpoint's (`blocks.i.self_attn.*`, `blocks.i.cross_attn.to_kv`, `mlp.mlp.0`,
`adaLN_modulation.1`, ...), so official state dicts load with strict=True.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._kernels import layer_norm as _ln
from .config import SparseDiTConfig
from .dense_dit import TimestepEmbedder
from .layers import FeedForward, LayerNorm32, absolute_position_embedding, cast_layers
from .sparse import SparseTensor
from .sparse.attention import sparse_cross_attention, varlen_attention
from .ssa import SparseConv, SpatialSparseAttention, SSAPlan


class SparseCrossAttention(nn.Module):
    """Voxel tokens attend to their sample's condition tokens; `to_kv` packs [k | v] (keys `to_q/to_kv/to_out`)."""

    def __init__(self, channels: int, ctx_channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(ctx_channels, 2 * channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, max_q: int, context) -> torch.Tensor:
        n, C = x.shape
        if context is None:  # an all-zero dense condition (CFG's unconditional half): see `zero_condition_output`
            return self.zero_condition_output(x.dtype).expand(n, C)
        q = self.to_q(x).view(n, self.num_heads, -1)  # [N, H, D]
        if isinstance(context, SparseTensor):  # v1.0 sparse conditions: ragged context
            kv = self.to_kv(context.feats).view(-1, 2, self.num_heads, C // self.num_heads)  # [L, 2, H, D]
            max_k = context.cache.get("max_len")
            if max_k is None:  # one host sync per condition set, memoised on it
                max_k = context.cache["max_len"] = int((context.offsets[1:] - context.offsets[:-1]).max())
            h = varlen_attention(
                q, kv[:, 0], kv[:, 1], offsets.to(torch.int32), context.offsets.to(torch.int32), max_q, max_k
            )
        else:  # dense condition [B, L, Cc]
            b, l = context.shape[:2]
            k, v = self.to_kv(context).view(b, l, 2, self.num_heads, -1).unbind(2)  # [B, L, H, D]
            h = sparse_cross_attention(q, k, v, offsets, max_q)
        return self.to_out(h.reshape(n, C))

    def zero_condition_output(self, dtype: torch.dtype) -> torch.Tensor:
        """[1, C]: every token's output when the dense condition is all zeros. Each condition token's key and
        value are then exactly `to_kv`'s bias, so every query's scores are equal, its softmax uniform and its
        attention output the value bias itself (exactly so in the flash kernels, which sum L equal values in
        fp32 and divide by L). The unconditional forwards skip `to_q`, the attention and all but one row of
        `to_out`: about a sixth of a 1024 forward on an H100 (bench/results/profile_dit.md)."""
        C = self.to_out.in_features
        b = self.to_kv.bias
        v = b[C:] if b is not None else torch.zeros(C, dtype=self.to_kv.weight.dtype, device=self.to_kv.weight.device)
        return self.to_out(v.to(self.to_out.weight.dtype)[None]).to(dtype)


def is_zero_condition(cond) -> bool:
    """True for a dense condition [B, L, Cc] that is all zeros (the unconditional half of CFG, as the pipeline
    and the original build it). One host sync per forward; sparse (v1.0) conditions are never zero here: their
    tokens get a position embedding."""
    return isinstance(cond, torch.Tensor) and cond.numel() > 0 and not bool(cond.any())


class SparseDiTBlock(nn.Module):
    """adaLN block: modulated SSA, cross attention (affine `norm2`, not modulated), modulated MLP (§5.3)."""

    def __init__(self, cfg: SparseDiTConfig, index: int):
        super().__init__()
        C = cfg.model_channels
        shift = cfg.window_size // 2 * (index % 2) if cfg.use_shift else cfg.window_size // 2
        self.norm1 = LayerNorm32(C, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(C, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(C, elementwise_affine=False, eps=1e-6)
        self.self_attn = SpatialSparseAttention(
            C,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.compression_block_size,
            cfg.selection_block_size,
            cfg.topk,
            cfg.window_size,
            shift,
            cfg.compression_version,
        )
        self.cross_attn = SparseCrossAttention(C, cfg.cond_channels, cfg.num_heads)
        self.mlp = FeedForward(C, cfg.mlp_ratio)
        if not cfg.share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.share_mod = cfg.share_mod

    def forward(
        self,
        x: torch.Tensor,
        mod: torch.Tensor,
        per_token,
        context,
        plan: SSAPlan,
        offsets: torch.Tensor,
        backend: str = "auto",
        pending: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (x, r, g): the block's output is x + r·g (`settle`). The MLP's gated residual is left to the
        next block, whose first norm adds it in the same pass (`pending`), saving two passes over [N, C]."""
        # x [N, C]; mod [B, C] (or [B, 6C] when shared); per_token: [N] sample of each token, or None when B == 1
        if not self.share_mod:
            mod = self.adaLN_modulation(mod)
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)  # [B, C]; row per_token[i] belongs to token i
        # add_layer_norm(x, r, g, ...) = (x + r·g, norm(x + r·g)·s + t) with the separate ops' roundings, one
        # pass over [N, C] on CUDA:
        #   x += r·g (the previous block's MLP);  h = norm1(x)·(1 + sc1) + sh1;  x += attn(h)·g1;  h = norm2(x);
        #   x += cross(h);  h = norm3(x)·(1 + sc2) + sh2
        r, g = pending if pending is not None else (None, None)
        x, h = _ln.add_layer_norm(x, r, g, scale=1 + sc1, shift=sh1, row_batch=per_token, eps=self.norm1.eps)
        x, h = _ln.add_layer_norm(
            x,
            self.self_attn(h, plan, backend),
            g1,
            self.norm2.weight,
            self.norm2.bias,
            row_batch=per_token,
            eps=self.norm2.eps,
        )
        x, h = _ln.add_layer_norm(
            x,
            self.cross_attn(h, offsets, plan.max_seqlen, context),
            scale=1 + sc2,
            shift=sh2,
            row_batch=per_token,
            eps=self.norm3.eps,
        )
        return x, self.mlp(h), g2

    @staticmethod
    def settle(x: torch.Tensor, r: torch.Tensor, g: torch.Tensor, per_token) -> torch.Tensor:
        """x + r·g: the block's output from its deferred form, with the module's roundings."""
        return x + r * (g if per_token is None else g[per_token])


class SparseDiT(nn.Module):
    """Velocity model of a sparse stage: `(x SparseTensor [N, 16] block-sorted, t [B], cond)` → SparseTensor [N, 16].

    `cond` is `[B, L, Cc]` (v1.1) or, with `sparse_conditions` (v1.0), a SparseTensor of the kept DINOv2 tokens
    with coords (b, patch col, patch row, 0) / (b, 0, 0, 1) for cls and registers. An all-zero dense condition
    (CFG's unconditional half) takes the cross attention's shortcut (`zero_condition_output`); `zero_cond`
    says whether cond is one when the caller knows (None: the forward looks, one host sync), so that the
    forward can be replayed as a CUDA graph (`cuda_graph.py`). False is always safe: the full computation.
    `dtype` is the compute dtype of the Linear layers (default fp16 when `cfg.use_fp16`, as released).
    """

    def __init__(self, cfg: SparseDiTConfig = SparseDiTConfig(), dtype: torch.dtype | None = None):
        super().__init__()
        if cfg.pe_mode != "ape":
            raise ValueError(f"Sparse DiT pe_mode {cfg.pe_mode!r} is not supported; every release uses 'ape'.")
        self.cfg = cfg
        C = cfg.model_channels
        self.t_embedder = TimestepEmbedder(C)
        if cfg.share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        if cfg.sparse_conditions:
            self.cond_proj = nn.Linear(cfg.cond_channels, cfg.cond_channels)
        self.input_layer = nn.Linear(cfg.in_channels, C)
        self.blocks = nn.ModuleList([SparseDiTBlock(cfg, i) for i in range(cfg.num_blocks)])
        self.out_layer = nn.Linear(C, cfg.out_channels)
        self.set_dtype(dtype or (torch.float16 if cfg.use_fp16 else torch.float32))

    def set_dtype(self, dtype: torch.dtype) -> "SparseDiT":
        """Cast Linears and sparse-conv weights to `dtype`; norms and `intra_block_pe` stay fp32 (`convert_to_fp16`)."""
        self.dtype = dtype
        cast_layers(self, dtype, (nn.Linear, SparseConv))
        return self

    def plan(self, x: SparseTensor) -> SSAPlan:
        """The SSAPlan of x's coordinates (built once, memoised in x.cache; call it outside the sampling loop)."""
        return self.blocks[0].self_attn.plan(x)

    def forward(
        self, x: SparseTensor, t: torch.Tensor, cond, backend: str = "auto", zero_cond: bool | None = None
    ) -> SparseTensor:
        cfg, dt = self.cfg, self.dtype
        plan = self.plan(x)
        h = self.input_layer(x.feats.to(dt)).to(dt)  # [N, C]
        t_emb = self.t_embedder(t)  # [B, C]
        if cfg.share_mod:
            t_emb = self.adaLN_modulation(t_emb)
        t_emb = t_emb.to(dt)
        if cfg.sparse_conditions:
            feats = self.cond_proj(cond.feats.to(dt))
            feats = feats + absolute_position_embedding(cond.coords[:, 1:], cfg.model_channels).to(dt)
            cond = cond.replace(feats)
        else:
            zero = is_zero_condition(cond) if zero_cond is None else zero_cond
            cond = None if zero else cond.to(dt)  # None: the cross attention's shortcut
        h = h + absolute_position_embedding(x.coords[:, 1:] * cfg.factor, cfg.model_channels).to(dt)
        per_token = None if x.batch_size == 1 else x.coords[:, 0].long()
        pending = None
        for block in self.blocks:
            h, *pending = block(h, t_emb, per_token, cond, plan, x.offsets, backend, pending)
        h = SparseDiTBlock.settle(h, *pending, per_token)
        h = F.layer_norm(h, h.shape[-1:])  # no affine, eps 1e-5, in the compute dtype as the original
        return x.replace(self.out_layer(h.to(dt)).to(x.feats.dtype))
