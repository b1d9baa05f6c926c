"""Dense multi-head attention: the one place the dense models (DINOv2, dense DiT) get attention from.

Everything runs through `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient
kernels on CUDA, the math kernel on CPU), which computes the standard `softmax(q kᵀ / √D) v` the original
reaches through flash-attn; SPEC.md §8.4 checks that the two agree. Sparse (ragged) attention lives in
`s2core/ssa.py` and the sparse modules, not here.

Letters: `B` batch, `L` query tokens, `Lc` context tokens, `C` channels, `H` heads, `D = C / H` head dim.

Parameter names are the checkpoint's (`to_qkv`, `to_q`, `to_kv`, `to_out`, `q_rms_norm.gamma`, ...), so
official state dicts load unchanged (SPEC.md §8.4).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full non-causal attention, scale 1/√D, in the token-major layout the models use.

    q `[B, L, H, D]`, k and v `[B, Lc, H, D]` → `[B, L, H, D]` (dtype of q).
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, H, L, D]
    return out.transpose(1, 2)


class MultiHeadRMSNorm(nn.Module):
    """Per-head RMS norm of queries or keys: `x / ‖x‖₂ · gamma[h] · √D`, computed in fp32.

    The original normalises with `F.normalize` (eps 1e-12 on the L2 norm) and keeps `gamma` in fp32 even
    in fp16 models; we do the same operations in the same order so fp16 results match bitwise.
    """

    def __init__(self, head_dim: int, num_heads: int):
        super().__init__()
        self.scale = head_dim**0.5
        self.gamma = nn.Parameter(torch.ones(num_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, L, H, D]
        return (F.normalize(x.float(), dim=-1) * self.gamma * self.scale).to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self attention with an optional RMS norm on q and k (dense DiT `self_attn`).

    `to_qkv` packs q, k, v along its output channels as `[q | k | v]`, head `h` owning channels
    `h·D … h·D+D-1` of each part (SPEC.md §8.4).
    """

    def __init__(self, channels: int, num_heads: int, qk_rms_norm: bool = False, qkv_bias: bool = True):
        super().__init__()
        assert channels % num_heads == 0, "channels must be a multiple of num_heads"
        self.num_heads = num_heads
        head_dim = channels // num_heads
        self.to_qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        self.qk_rms_norm = qk_rms_norm
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(head_dim, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.to_qkv(x).view(B, L, 3, self.num_heads, -1).unbind(dim=2)  # 3 × [B, L, H, D]
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        h = attention(q, k, v).reshape(B, L, C)
        return self.to_out(h)


class CrossAttention(nn.Module):
    """Multi-head attention from tokens `x [B, L, C]` to a context `[B, Lc, Cc]` (dense DiT `cross_attn`).

    `to_kv` packs `[k | v]` along its output channels.
    """

    def __init__(
        self, channels: int, ctx_channels: int, num_heads: int, qk_rms_norm: bool = False, qkv_bias: bool = True
    ):
        super().__init__()
        assert channels % num_heads == 0, "channels must be a multiple of num_heads"
        self.num_heads = num_heads
        head_dim = channels // num_heads
        self.to_q = nn.Linear(channels, channels, bias=qkv_bias)
        self.to_kv = nn.Linear(ctx_channels, 2 * channels, bias=qkv_bias)
        self.qk_rms_norm = qk_rms_norm
        if qk_rms_norm:
            self.q_rms_norm = MultiHeadRMSNorm(head_dim, num_heads)
            self.k_rms_norm = MultiHeadRMSNorm(head_dim, num_heads)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q = self.to_q(x).view(B, L, self.num_heads, -1)  # [B, L, H, D]
        k, v = self.to_kv(context).view(B, context.shape[1], 2, self.num_heads, -1).unbind(dim=2)  # [B, Lc, H, D]
        if self.qk_rms_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        h = attention(q, k, v).reshape(B, L, C)
        return self.to_out(h)
