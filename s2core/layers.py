"""Layers several models share, one implementation each (SPEC.md §7-8, SPARSE.md §1-5).

* `absolute_position_embedding`: the sin/cos embedding of voxel coordinates: the dense DiT's `pos_emb`
  table, the sparse DiT's and sparse VAE's input embedding, the v1.0 condition tokens.
* `FeedForward`: Linear → GELU (tanh) → Linear of the DiT and VAE transformer blocks.
* `LayerNorm32`, `ChannelLayerNorm32`: LayerNorm computed in fp32 and cast back (rows; the channel axis
  of `[B, C, D, H, W]`), as the original's `*32` norms.
* `group_norm_per_sample`: GroupNorm whose statistics run over all rows of one sample (the original's
  `SparseGroupNorm32`: sparse VAE encoder, SSA v2 compression).
* `cast_layers`: the original's `convert_to_fp16`: chosen layer types to fp16, the rest (norms) stays fp32.

Letters: `N` rows (tokens / voxels), `C` channels, `G` groups, `B` samples.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def absolute_position_embedding(pos: torch.Tensor, channels: int) -> torch.Tensor:
    """`pos [N, 3]` → `[N, channels]` fp32: per axis x, y, z `[sin(p ω) ‖ cos(p ω)]`, ω_f = 10000^(−f/F),
    F = channels // 6, zero-padded at the end (SPARSE.md §3, SPEC.md §8.2). Computed on pos's device."""
    f = channels // 3 // 2
    omega = 1.0 / (10000 ** (torch.arange(f, dtype=torch.float32, device=pos.device) / f))
    phase = torch.outer(pos.reshape(-1).float(), omega)  # [3N, F]
    emb = torch.cat([torch.sin(phase), torch.cos(phase)], -1).reshape(pos.shape[0], -1)  # [N, 6F]
    return F.pad(emb, (0, channels - emb.shape[1]))


# On CUDA in fp16/bf16 the first Linear and its GELU run as one cuBLASLt GEMM with a GELU epilogue
# (`torch._addmm_activation`, tanh GELU on CUDA), which rounds once instead of twice and skips a pass over the
# [N, 4C] activations. False restores the separate ops.
FUSED_GELU = True


class FeedForward(nn.Module):
    """Linear C→rC, GELU (tanh), Linear rC→C; keys `mlp.0`, `mlp.2` as in the checkpoints."""

    def __init__(self, channels: int, mlp_ratio: float):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self.mlp[0], self.mlp[2]
        if FUSED_GELU and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and fc1.bias is not None:
            # on the CPU this op's GELU is the erf one, so it is used on CUDA only
            h = torch._addmm_activation(fc1.bias, x.reshape(-1, x.shape[-1]), fc1.weight.t(), use_gelu=True)
            return fc2(h.view(*x.shape[:-1], -1))
        return self.mlp(x)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm over the last dim computed in fp32 and cast back to the input dtype (fp16 models keep fp32
    norms)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class ChannelLayerNorm32(LayerNorm32):
    """`LayerNorm32` over the channel axis of `[B, C, D, H, W]`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = super().forward(x.permute(0, 2, 3, 4, 1).contiguous())  # [B, D, H, W, C]
        return h.permute(0, 4, 1, 2, 3).contiguous()  # [B, C, D, H, W]


def group_norm_per_sample(
    x: torch.Tensor,
    batch: torch.Tensor,
    batch_size: int,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """GroupNorm of each sample's `[C, N_b]` slab: `x [N, C]`, `batch [N]` int64 sample of each row → `[N, C]`
    in x's dtype, without a Python loop over samples.

    As the original's fp32 `nn.GroupNorm` per sample: fp32 values, two-pass biased variance; the sums over a
    sample's rows accumulate in fp64, so a million-row sample sums as accurately as PyTorch's own reduction
    (an fp32 `index_add_` adds the rows one after another).
    """
    n, c = x.shape
    f = x.float().reshape(n, num_groups, c // num_groups)  # [N, G, C/G]
    count = torch.bincount(batch, minlength=batch_size).clamp(min=1).double()[:, None] * (c // num_groups)  # [B, 1]
    sums = f.new_zeros(batch_size, num_groups, dtype=torch.float64).index_add_(0, batch, f.sum(2, dtype=torch.float64))
    mean = (sums / count).float()  # [B, G]
    dev = f - mean[batch][:, :, None]
    sq = f.new_zeros(batch_size, num_groups, dtype=torch.float64).index_add_(
        0, batch, dev.square().sum(2, dtype=torch.float64)
    )
    rstd = torch.rsqrt((sq / count).float() + eps)
    y = (dev * rstd[batch][:, :, None]).reshape(n, c)
    if weight is not None:
        y = y * weight.float() + bias.float()
    return y.to(x.dtype)


def cast_layers(module: nn.Module, dtype: torch.dtype, types: tuple[type[nn.Module], ...]) -> nn.Module:
    """Every submodule of `types` (Linears, convs) to `dtype`; everything else keeps its dtype: the
    original's `convert_to_fp16`, which leaves norms, embeddings and RMS gammas in fp32."""
    for m in module.modules():
        if isinstance(m, types):
            m.to(dtype)
    return module
