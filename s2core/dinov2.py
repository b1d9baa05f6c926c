"""DINOv2 ViT-L/14 with 4 register tokens: the image conditioner of every Direct3D-S2 stage (SPEC.md §5).

`DinoV2` is the backbone (`facebookresearch/dinov2` `dinov2_vitl14_reg`): a 14-px patch embedding, a class
token, 4 register tokens and 24 pre-norm blocks with LayerScale. `ImageConditioner` wraps it the way the
original `DinoEncoder` does: ImageNet normalisation, the token sequence after the last block (`x_prenorm`,
before DINOv2's own final norm), then a parameter-free LayerNorm (eps 1e-5); plus the 37×37 patch mask
used by the v1.0 sparse conditions.

Letters: `B` batch, `S` input side (518), `P = S / 14` patches per side (37), `R` registers (4),
`T = 1 + R + P²` tokens (1374), `C` width (1024), `H` heads, `D` head dim.

Weights: attribute names are the torch-hub checkpoint's (`dinov2_vitl14_reg4_pretrain.pth`, manifest
`dinov2_vitl14_reg4.tsv`). The Hugging Face layout (`facebook/dinov2-with-registers-large`,
`Dinov2WithRegistersModel`) is converted through one table, `HF_TO_HUB`, by `hub_state_dict()`.
Precision: fp32 as the original; `dtype=` may select fp16/bf16 (norms and attention softmax then run
in that dtype).
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .config import ImageEncoderConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class LayerScale(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Self attention with a packed `qkv` projection (`[q | k | v]` along output channels) and `proj`."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, -1).unbind(2)  # 3 × [B, T, H, D]
        return self.proj(attention(q, k, v).reshape(B, T, C))


class Mlp(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as DINOv2


class Block(nn.Module):
    def __init__(self, channels: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels, eps=1e-6)
        self.attn = Attention(channels, num_heads)
        self.ls1 = LayerScale(channels)
        self.norm2 = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = Mlp(channels, int(channels * mlp_ratio))
        self.ls2 = LayerScale(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, channels: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(3, channels, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] → [B, P², C], patches row-major
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoV2(nn.Module):
    """The DINOv2-reg backbone. `forward(x [B, 3, S, S] normalised)` → `x_prenorm [B, T, C]`.

    Token order: `[cls, reg_1..reg_R, patch_(0,0), patch_(0,1), ...]`. The position table (`pos_embed`,
    stored for a `pretrain_img_size` grid) is added to cls + patches before the registers are inserted;
    for any other grid it is resized with antialiased bicubic interpolation to the exact patch grid, as the
    `*_reg` hub models do (`interpolate_offset=0`, `interpolate_antialias=True`). At 518² (37×37) the stored
    table is used as is. `norm`, `mask_token` are loaded but unused by Direct3D-S2.
    """

    def __init__(self, cfg: ImageEncoderConfig = ImageEncoderConfig(), dtype: torch.dtype = torch.float32):
        super().__init__()
        C, p = cfg.embed_dim, cfg.patch_size
        self.cfg = cfg
        self.patch_size = p
        grid = cfg.pretrain_img_size // p
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, C))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, C))
        self.mask_token = nn.Parameter(torch.zeros(1, C))
        self.patch_embed = PatchEmbed(C, p)
        self.blocks = nn.ModuleList([Block(C, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(C, eps=1e-6)
        self.to(dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.cls_token.dtype

    def position_table(self, ph: int, pw: int) -> torch.Tensor:
        """`[1, 1 + ph·pw, C]`: the stored table, or its patch part resized to a `ph × pw` grid."""
        n = self.pos_embed.shape[1] - 1
        if ph * pw == n and ph == pw:
            return self.pos_embed
        m = int(round(n**0.5))
        patch = self.pos_embed[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)  # [1, C, m, m]
        patch = F.interpolate(patch, size=(ph, pw), mode="bicubic", antialias=True)  # [1, C, ph, pw]
        patch = patch.permute(0, 2, 3, 1).reshape(1, ph * pw, -1)
        return torch.cat([self.pos_embed[:, :1].float(), patch], dim=1).to(self.pos_embed.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, Hpx, Wpx = x.shape
        h = self.patch_embed(x.to(self.dtype))  # [B, P², C]
        h = torch.cat([self.cls_token.expand(B, -1, -1), h], dim=1)  # [B, 1+P², C]
        h = h + self.position_table(Hpx // self.patch_size, Wpx // self.patch_size)
        h = torch.cat([h[:, :1], self.register_tokens.expand(B, -1, -1), h[:, 1:]], dim=1)  # [B, T, C]
        for block in self.blocks:
            h = block(h)
        return h  # x_prenorm


class ImageConditioner(nn.Module):
    """The original `DinoEncoder`: preprocessed RGB → condition tokens for the DiTs (SPEC.md §5.2).

    `forward(rgb [B, 3, S, S] in [0, 1], mask [B, 1, S, S] | None)` → `(z [B, T, C] fp32, patch_mask)` with
    `z = LayerNorm(x_prenorm)` (no affine, eps 1e-5) and `patch_mask [B, P, P] bool` (14×14 max-pool of the
    mask > 0) or None without a mask. Inputs of another size are resized (shorter side to S, bilinear,
    antialiased) and centre-cropped like the original's torchvision transform; at S×S that is a no-op.
    """

    def __init__(self, cfg: ImageEncoderConfig = ImageEncoderConfig(), dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        self.model = DinoV2(cfg, dtype)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def load_backbone(self, state_dict, assign: bool = False) -> None:
        """Load a backbone checkpoint, torch-hub or Hugging Face layout, into `self.model` (strict)."""
        self.model.load_state_dict(hub_state_dict(state_dict), strict=True, assign=assign)

    def _resize(self, rgb: torch.Tensor) -> torch.Tensor:
        S = self.cfg.size
        H, W = rgb.shape[-2:]
        if (H, W) == (S, S):
            return rgb
        # torchvision Resize(S): shorter side to S, longer side truncated; CenterCrop rounds its offsets.
        size = (S, int(S * W / H)) if H <= W else (int(S * H / W), S)
        rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False, antialias=True)
        top, left = int(round((rgb.shape[-2] - S) / 2.0)), int(round((rgb.shape[-1] - S) / 2.0))
        return rgb[..., top : top + S, left : left + S]

    def forward(self, rgb: torch.Tensor, mask: torch.Tensor | None = None):
        x = (self._resize(rgb.float()) - self.mean) / self.std
        z = self.model(x)  # [B, T, C]
        z = F.layer_norm(z.float(), z.shape[-1:])  # parameter-free, eps 1e-5, fp32
        if mask is None:
            return z, None
        p = self.cfg.patch_size
        patch_mask = F.max_pool2d(mask.float(), kernel_size=p, stride=p).squeeze(1) > 0  # [B, P, P]
        return z, patch_mask


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts. One table maps each Hugging Face `Dinov2WithRegistersModel` key to the hub key it
# fills; the hub's packed `qkv` is the concatenation of HF's query, key, value (rows, in that order).
# `{i}` is a block index.

HF_TO_HUB: tuple[tuple[str | tuple[str, ...], str], ...] = (
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.register_tokens", "register_tokens"),
    ("embeddings.mask_token", "mask_token"),
    ("embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight"),
    ("embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias"),
    ("encoder.layer.{i}.norm1.weight", "blocks.{i}.norm1.weight"),
    ("encoder.layer.{i}.norm1.bias", "blocks.{i}.norm1.bias"),
    (
        (
            "encoder.layer.{i}.attention.attention.query.weight",
            "encoder.layer.{i}.attention.attention.key.weight",
            "encoder.layer.{i}.attention.attention.value.weight",
        ),
        "blocks.{i}.attn.qkv.weight",
    ),
    (
        (
            "encoder.layer.{i}.attention.attention.query.bias",
            "encoder.layer.{i}.attention.attention.key.bias",
            "encoder.layer.{i}.attention.attention.value.bias",
        ),
        "blocks.{i}.attn.qkv.bias",
    ),
    ("encoder.layer.{i}.attention.output.dense.weight", "blocks.{i}.attn.proj.weight"),
    ("encoder.layer.{i}.attention.output.dense.bias", "blocks.{i}.attn.proj.bias"),
    ("encoder.layer.{i}.layer_scale1.lambda1", "blocks.{i}.ls1.gamma"),
    ("encoder.layer.{i}.norm2.weight", "blocks.{i}.norm2.weight"),
    ("encoder.layer.{i}.norm2.bias", "blocks.{i}.norm2.bias"),
    ("encoder.layer.{i}.mlp.fc1.weight", "blocks.{i}.mlp.fc1.weight"),
    ("encoder.layer.{i}.mlp.fc1.bias", "blocks.{i}.mlp.fc1.bias"),
    ("encoder.layer.{i}.mlp.fc2.weight", "blocks.{i}.mlp.fc2.weight"),
    ("encoder.layer.{i}.mlp.fc2.bias", "blocks.{i}.mlp.fc2.bias"),
    ("encoder.layer.{i}.layer_scale2.lambda1", "blocks.{i}.ls2.gamma"),
    ("layernorm.weight", "norm.weight"),
    ("layernorm.bias", "norm.bias"),
)
# Prefixes under which HF checkpoints may nest the backbone (e.g. `...ForImageClassification`).
_HF_PREFIXES = ("dinov2_with_registers.", "dinov2.", "model.")


def _depth(keys, pattern: str) -> int:
    rx = re.compile(re.escape(pattern).replace(r"\{i\}", r"(\d+)"))
    return 1 + max((int(m.group(1)) for k in keys if (m := rx.fullmatch(k))), default=-1)


def is_hf_layout(state_dict) -> bool:
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in state_dict)


def hub_state_dict(state_dict) -> dict[str, torch.Tensor]:
    """A DINOv2-reg state dict in the torch-hub layout, whichever layout `state_dict` uses."""
    if not is_hf_layout(state_dict):
        return dict(state_dict)
    sd = {}
    for k, v in state_dict.items():
        pre = next((p for p in _HF_PREFIXES if k.startswith(p)), "")
        k = k[len(pre) :]
        if not k.startswith("classifier."):
            sd[k] = v
    depth = _depth(sd, "encoder.layer.{i}.norm1.weight")
    out, used = {}, set()
    for hf, hub in HF_TO_HUB:
        for i in range(depth) if "{i}" in hub else [None]:
            names = (hf,) if isinstance(hf, str) else hf
            names = [n.format(i=i) for n in names]
            if not all(n in sd for n in names):
                missing = next(n for n in names if n not in sd)
                raise ValueError(
                    f"The DINOv2 checkpoint (Hugging Face layout) lacks {missing!r}; it is not a "
                    "dinov2-with-registers model — use facebook/dinov2-with-registers-large or the "
                    "torch-hub dinov2_vitl14_reg4 weights."
                )
            out[hub.format(i=i)] = sd[names[0]] if len(names) == 1 else torch.cat([sd[n] for n in names], dim=0)
            used.update(names)
    extra = sorted(set(sd) - used)
    if extra:
        raise ValueError(
            f"The DINOv2 checkpoint has {len(extra)} unexpected weight(s) (first: {extra[0]!r}); it is "
            "not a ViT with registers as Direct3D-S2 uses — use dinov2-with-registers-large."
        )
    return out
