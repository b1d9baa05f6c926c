"""sRGB ↔ linear: our colours are sRGB like the picture they come from; glTF and ComfyUI's MESH are linear.

`results.Mesh.vertex_colors` hold the picture's own (sRGB-encoded) values, which is also what PLY and OBJ
colours mean to the viewers that read them. glTF defines COLOR_0 as linear (a viewer encodes to sRGB for
display), and core ComfyUI's MESH `vertex_colors` follow glTF (core Paint Mesh converts before it stores
them). So the GLB writer and the MESH adapter convert at the boundary; a texture stays sRGB, as glTF's
baseColorTexture is. The standard sRGB transfer function, piecewise (IEC 61966-2-1); a fourth (alpha)
channel is linear already and passes through.
"""

from __future__ import annotations

import torch


def srgb_to_linear(c: torch.Tensor) -> torch.Tensor:
    """[..., 3|4] sRGB-encoded values in [0, 1] → linear."""
    rgb = c[..., :3].clamp(0, 1)
    lin = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    return torch.cat([lin, c[..., 3:]], -1)


def linear_to_srgb(c: torch.Tensor) -> torch.Tensor:
    """[..., 3|4] linear values in [0, 1] → sRGB-encoded."""
    rgb = c[..., :3].clamp(0, 1)
    enc = torch.where(rgb <= 0.0031308, rgb * 12.92, 1.055 * rgb ** (1 / 2.4) - 0.055)
    return torch.cat([enc, c[..., 3:]], -1)
