"""Shared helpers of the SSA kernel tests: random block-sorted token sets, NaN-poisoned allocation, tolerances."""

from __future__ import annotations

import contextlib

import torch

from s2core.sparse.coords import pack_keys


def assert_close(out: torch.Tensor, ref: torch.Tensor, rel_rms: float, max_abs: float, what: str = "") -> None:
    """Relative RMS error (||out - ref|| / ||ref||) and max-abs error, both bounded; NaN fails."""
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all(), f"{what}: non-finite values in the output"
    diff = out - ref
    rr = (diff.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp(min=1e-12)).item()
    ma = diff.abs().max().item() if diff.numel() else 0.0
    assert rr <= rel_rms and ma <= max_abs, f"{what}: rel-rms {rr:.3g} (<= {rel_rms}), max-abs {ma:.3g} (<= {max_abs})"


@contextlib.contextmanager
def poisoned_outputs(monkeypatch):
    """Make torch.empty/empty_like return NaN (floats) or -7 (ints) so unwritten output elements show up."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t.fill_(-7)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
    try:
        yield
    finally:
        monkeypatch.setattr(torch, "empty", real_empty)
        monkeypatch.setattr(torch, "empty_like", real_empty_like)


def block_sorted_coords(tokens_per_sample, grid: int, block: int = 8, seed: int = 0, device="cpu"):
    """Random unique voxels per sample on a grid^3, block-sorted (blocks lexicographic, x-major inside)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, n in enumerate(tokens_per_sample):
        flat = torch.randperm(grid**3, generator=g)[:n]
        xyz = torch.stack([flat // grid**2, (flat // grid) % grid, flat % grid], 1)
        blk, inb = xyz // block, xyz % block
        key = (
            (((blk[:, 0] * 4096 + blk[:, 1]) * 4096 + blk[:, 2]) * block + inb[:, 0]) * block**2
            + inb[:, 1] * block
            + inb[:, 2]
        )
        xyz = xyz[torch.argsort(key)]
        rows.append(torch.cat([torch.full((n, 1), b), xyz], 1))
    return torch.cat(rows).to(torch.int32).to(device)


def block_layout(coords: torch.Tensor, block: int = 8):
    """(cu_seqlens [B+1], cu_blocks [B+1], cu_block_tokens [NB+1]) int32 of block-sorted coords."""
    c = coords.long()
    key = pack_keys(c[:, 0], c[:, 1:] // block)
    _, counts = torch.unique_consecutive(key, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    bsz = int(c[:, 0].max()) + 1

    def cu(x):
        return torch.cat([torch.zeros(1, dtype=torch.int64, device=x.device), torch.cumsum(x, 0)]).to(torch.int32)

    return (cu(torch.bincount(c[:, 0], minlength=bsz)), cu(torch.bincount(c[first, 0], minlength=bsz)), cu(counts))
