"""Deterministic synthetic weights for strict-loading and parity tests.

`deterministic_state_dict(source, seed)` builds a full state dict (right names, shapes, dtypes) whose
values depend only on (seed, tensor name, shape): each tensor draws from its own CPU `torch.Generator`
seeded with `seed` mixed with a CRC32 of its name, in fp32, then is cast. So the same call gives
bitwise the same tensors on any machine and in any registration order (our modules need not register
parameters in the original's order), and the original's modules get the very same values.

Scales keep activations sane through deep stacks and leave no zeros that could hide a bug:

| tensor (by name / layout)                   | values                                   |
|---------------------------------------------|------------------------------------------|
| `*.weight` with ndim >= 2 (Linear, Conv)    | N(0, 1/fan_in), fan_in = prod(shape[1:]) |
| `*.kernel` (torchsparse `[K3, Cin, Cout]`)  | N(0, 1/fan_in), fan_in = prod(shape[:-1])|
| `*.ls1.gamma`, `*.ls2.gamma` (layer scale)  | 0.1 + 0.01 N                             |
| other `*.gamma`, 1-D `*.weight` (norms)     | 1 + 0.1 N                                |
| `*.bias`                                    | 0.02 N                                   |
| tokens, position tables, anything else      | 0.02 N (cls/register/mask/pos) or 0.1 N  |
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .manifest import TensorSpec, manifest, read_manifest_tsv

_TOKEN_NAMES = ("cls_token", "register_tokens", "mask_token", "pos_embed", "pos_emb")


def _specs(source) -> list[TensorSpec]:
    if isinstance(source, torch.nn.Module):
        return [
            TensorSpec(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in source.state_dict().items()
        ]
    if isinstance(source, (str, Path)):
        p = Path(source)
        return read_manifest_tsv(p) if p.suffix == ".tsv" else manifest(str(source))
    if isinstance(source, Mapping):  # name -> tensor
        return [TensorSpec(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in source.items()]
    specs = list(source)
    assert all(isinstance(s, TensorSpec) for s in specs), "expected TensorSpec items"
    return specs


def _scale_and_offset(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "kernel":
        return 1.0 / math.sqrt(max(1, math.prod(shape[:-1]))), 0.0
    if leaf == "weight" and len(shape) >= 2:
        return 1.0 / math.sqrt(max(1, math.prod(shape[1:]))), 0.0
    if leaf == "gamma" and (".ls1." in name or ".ls2." in name or name.startswith(("ls1.", "ls2."))):
        return 0.01, 0.1
    if leaf in ("gamma", "weight"):
        return 0.1, 1.0
    if leaf == "bias":
        return 0.02, 0.0
    if leaf in _TOKEN_NAMES:
        return 0.02, 0.0
    return 0.1, 0.0


def deterministic_tensor(name: str, shape: Iterable[int], dtype: torch.dtype | str, seed: int) -> torch.Tensor:
    """One tensor of `deterministic_state_dict` (values depend on seed, name and shape only)."""
    shape = tuple(int(s) for s in shape)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    if not dtype.is_floating_point:
        return torch.randint(0, 2, shape, generator=gen).to(dtype)
    scale, offset = _scale_and_offset(name, shape)
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale + offset).to(dtype)


def deterministic_state_dict(
    manifest_or_module, seed: int = 0, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """A full synthetic state dict for a manifest key/TSV path, a module, a name->tensor mapping or specs.

    `dtype` overrides every floating tensor's dtype (default: the manifest's / module's own).
    """
    out = {}
    for s in _specs(manifest_or_module):
        dt = getattr(torch, s.dtype)
        if dtype is not None and dt.is_floating_point:
            dt = dtype
        out[s.name] = deterministic_tensor(s.name, s.shape, dt, seed)
    return out


# ---------------------------------------------------------------------------------------------
# Golden fixtures (tests/golden/<component>__<config>.safetensors + .json sidecar, see
# tests/golden/README.md). The sidecar's "weights_specs" lists the original module's
# [name, shape, dtype] in its state-dict order and "seed" the weights seed, so
# `golden_state_dict(meta)` reproduces bitwise the tensors the original was loaded with.


def load_golden(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read one fixture: (tensors, sidecar dict). `path` may omit the suffix."""
    import json

    from safetensors.torch import load_file

    p = Path(path)
    base = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    tensors = load_file(str(base) + ".safetensors")
    meta = json.loads(Path(str(base) + ".json").read_text())
    return tensors, meta


def golden_state_dict(meta: dict, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The exact weights the original module of a fixture was loaded with (strict=True)."""
    specs = [TensorSpec(n, tuple(s), d) for n, s, d in meta["weights_specs"]]
    return deterministic_state_dict(specs, int(meta["seed"]), dtype=dtype)
