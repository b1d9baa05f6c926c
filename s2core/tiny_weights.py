"""Weights for `tiny-random` that make every stage's surface well defined and cheap (same code paths).

Sparse VAEs (`flat_sdf_head`): random decoders give an SDF that flips sign from voxel to voxel, so the
512 mesh was ~140k faces of noise, and voxelizing it for the 1024 stage took minutes on a CPU. The
tiny decoders' output layer instead gives every decoded voxel the same inside value, so each stage's
surface is the boundary of the voxels it decoded, i.e. the shape of its sparse structure.

Refiners (`pass_through_refiner`) pass the decoded SDF through:

Random refiner weights give a field that never reaches the iso-level, so the demo's refined meshes were
empty. These weights route the SDF channel through every layer of the refiner unchanged in shape:

* `conv_in` copies the SDF into channel 0; the UNet's `conv_in` writes `a·sdf` and `-a·sdf` to channels
  0 and 1, which share a GroupNorm group, so the group mean is exactly 0 in every cube; `a` is so small
  that the group variance is negligible against the norm's eps, so the norm scales by a constant instead
  of by per-cube statistics (no seams between cubes).
* The last up-block resnet's 1×1 shortcut keeps those two channels and its residual conv is zero, so the
  UNet output is `silu(sdf + 2)` in channel 0 (monotone for sdf > -3.2), the other channels 0.
* Each adaptive filter head predicts only the centre tap (an identity filter), `mid_conv` is identity,
  and `conv_out` maps channel 0 so the output reaches the pipeline's iso-level where sdf = mc_threshold.

All taps but the centre are zero, so zero padding at cube borders changes nothing. Other weights (the
down/mid path, `latent_mlp`) stay random: they run, but their outputs are multiplied by zero.
"""

from __future__ import annotations

import math

import torch

_A = 1e-4  # SDF scale before the UNet's last GroupNorm: variance <= 1e-8, against eps = 1e-5
_SHIFT = 2.0  # silu(sdf + 2) is increasing for sdf > -3.28; the decoded SDF lies in [-1, 1]
_GAIN = 2.0  # conv_out's scale on silu(sdf + 2): about 1.8 refined-field units per SDF unit at the level


_INSIDE = -0.5  # the tiny VAEs' SDF on every decoded voxel: below both iso-levels, background is +1


def flat_sdf_head(sd: dict[str, torch.Tensor]) -> None:
    """Overwrite (in place) a sparse VAE state dict's decoder output layer so tanh(out) = _INSIDE on
    every decoded voxel (the refiner's per-voxel features, from the layers before it, stay random)."""
    sd["decoder.out_layer.weight"].zero_()
    sd["decoder.out_layer.bias"].fill_(math.atanh(_INSIDE))


def _centre(w: torch.Tensor, out: int, inp: int, value: float) -> None:
    w[(out, inp) + (w.shape[2] // 2,) * (w.dim() - 2)] = value


def pass_through_refiner(
    sd: dict[str, torch.Tensor], channels: int, sign: bool, sdf_level: float, field_level: float, eps: float = 1e-5
) -> None:
    """Overwrite (in place) a one-level refiner state dict (`layers_per_block` 0) so the refined field
    is an increasing function of the SDF equal to `field_level` at sdf = `sdf_level` (the sign refiner:
    +1 where sdf > sdf_level)."""
    for k, v in sd.items():
        if (
            k.startswith(
                (
                    "conv_in.",
                    "unet3d1.conv_in.",
                    "unet3d1.conv_norm_out.",
                    "unet3d1.up_blocks.0.",
                    "adaptive_conv",
                    "mid_conv.",
                    "conv_out.",
                )
            )
            and v.is_floating_point()
        ):
            v.zero_()
    _centre(sd["conv_in.weight"], 0, 0, 1.0)
    _centre(sd["unet3d1.conv_in.weight"], 0, 0, _A)
    _centre(sd["unet3d1.conv_in.weight"], 1, 0, -_A)
    res = "unet3d1.up_blocks.0.resnets.0."
    skip_from = sd[res + "conv_shortcut.weight"].shape[1] - channels  # cat(h, skip): skip channels come last
    _centre(sd[res + "conv_shortcut.weight"], 0, skip_from, 1.0)
    _centre(sd[res + "conv_shortcut.weight"], 1, skip_from + 1, 1.0)
    for k in ("norm1", "norm2"):  # the zeroed residual branch: keep its norms well defined
        sd[res + k + ".weight"].fill_(1.0)
    # the norm divides by ~sqrt(eps) / _A; undo it so channel 0 reads sdf + _SHIFT before the SiLU
    sd["unet3d1.conv_norm_out.weight"][0] = math.sqrt(eps) / _A
    sd["unet3d1.conv_norm_out.bias"][0] = _SHIFT
    at_level = _GAIN * (sdf_level + _SHIFT) * torch.sigmoid(torch.tensor(sdf_level + _SHIFT)).item()
    _centre(sd["conv_out.weight"], 0, 0, _GAIN)
    if sign:
        sd["conv_out.bias"][0] = -at_level  # logit 0 at the level
        return
    sd["conv_out.bias"][0] = math.atanh(field_level) - at_level
    for n in ("adaptive_conv1", "adaptive_conv2", "adaptive_conv3"):
        sd[f"{n}.0.bias"].fill_(1.0)  # relu(1) = 1 everywhere
        w = sd[f"{n}.2.weight"]  # [27, C, 3, 3, 3]: only the centre tap (13), weight 1 after L1 normalising
        for c in range(w.shape[1]):
            _centre(w, 13, c, 1.0 / w.shape[1])
    for c in range(channels):
        _centre(sd["mid_conv.weight"], c, c, 1.0)
