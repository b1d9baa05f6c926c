"""The sparse index between the stages: the coarse stage's occupied cells, block-sorted, and the v1.0 condition tokens.

| function | in | out |
|---|---|---|
| `encode_pixels(encoder, pixels)` | `pixels [B, 4, S, S]` (RGB on white ‖ mask, `image.preprocess_image`) | `cond [B, T, C]` fp32, `patch_mask [B, P, P]` bool |
| `decode_occupancy(vae, latent)` | dense latent `[B, 8, R, R, R]` | `coords [N, 4]` int32 (batch, x, y, z) on the 64³ grid, block-sorted |

Plus the index helpers of `utils/sparse.py` (SPEC.md §9), vectorised: `sort_block` (block-major token
order that SSA relies on) and `extract_tokens_and_coords` (v1.0 sparse conditions). The stages that call
them, with seeds, placement and cancellation, are `s2core.pipeline.encode_image / sample_dense / decode_dense`.

Only sample 0 of the original's batch survives the dense stage; here every batch element keeps its own
rows (batch column = element index), which for B = 1 is exactly the original's index.
"""

from __future__ import annotations

import torch

from .sparse.coords import pack_keys


def sort_block(coords: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order voxels block-major, as the original `utils.sparse.sort_block` (SPEC.md §9.1).

    coords `[N, 4]` integer rows `(b, x, y, z)` → `(coords[order], order [N] int64)`. A stable sort on keys,
    most significant first: `b`, `x // bs`, `y // bs`, `z // bs`, `x % bs`, `y % bs`, `z % bs`. Tokens are
    thus grouped by `bs³` block (blocks in x-major order) and x-major inside a block. The original has no
    batch key (its index always has b = 0); putting `b` first keeps batch elements contiguous and is the
    same order whenever `b` is constant. (The original also corrupts its input on CPU tensors, SPEC.md
    §9.1; this follows its CUDA behaviour.) The same dtype and device come back.
    """
    if coords.ndim != 2 or coords.shape[1] != 4:
        raise ValueError(f"sort_block needs coords shaped [N, 4], got {tuple(coords.shape)}.")
    if coords.shape[0] == 0:
        return coords, torch.zeros(0, dtype=torch.int64, device=coords.device)
    c = coords.long()
    blk, inb = c[:, 1:] // block_size, c[:, 1:] % block_size
    # the block's coordinate key, then the within-block digits below it: 36 + 3·log2(bs) bits (45 at bs = 8, so
    # batch < 2^18; see sparse/coords.py for the per-axis range)
    key = pack_keys(c[:, 0], blk)
    for a in range(3):
        key = key * block_size + inb[:, a]
    order = torch.sort(key, stable=True).indices
    return coords[order], order


def extract_tokens_and_coords(
    z: torch.Tensor, patch_mask: torch.Tensor, num_cls: int = 1, num_reg: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select condition tokens for the v1.0 sparse conditions (SPEC.md §9.2), batch by batch.

    z `[B, num_cls + num_reg + P², C]`, patch_mask `[B, P, P]` bool → tokens `[T, C]` and coords `[T, 4]`
    int32. Per element b: the cls and register tokens with coordinate `(b, 0, 0, 1)`, then the patch
    tokens whose mask cell (h, w) is set, in row-major order, with coordinate `(b, w, h, 0)`. (The
    original builds float coordinates that its caller converts with `.int()`; these are the same values.)
    """
    B, T, C = z.shape
    P = patch_mask.shape[-1]
    lead = num_cls + num_reg
    assert T == lead + P * P, f"{T} tokens do not match a {P}x{P} patch mask"
    dev = z.device
    keep = torch.cat([torch.ones(B, lead, dtype=torch.bool, device=dev), patch_mask.reshape(B, P * P)], dim=1)
    h, w = torch.meshgrid(torch.arange(P, device=dev), torch.arange(P, device=dev), indexing="ij")
    patch_xyz = torch.stack([w.reshape(-1), h.reshape(-1), torch.zeros(P * P, dtype=torch.long, device=dev)], -1)
    lead_xyz = torch.tensor([0, 0, 1], device=dev).expand(lead, 3)
    xyz = torch.cat([lead_xyz, patch_xyz], dim=0).expand(B, T, 3)  # [B, T, 3]
    b = torch.arange(B, device=dev).view(B, 1, 1).expand(B, T, 1)
    table = torch.cat([b, xyz], dim=-1)  # [B, T, 4]
    return z[keep], table[keep].int()


def occupancy_coords(logits: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Occupied voxels of decoded logits: `[B, 1, R, R, R]` → coords `[N, 4]` int32 `(b, x, y, z)`, lexicographic.

    A voxel is occupied when `sigmoid(logit) >= threshold`, evaluated in the logits' dtype exactly as the
    original `decode_mesh(return_index=True)` does (fp16 in the release; SPEC.md §7.4).
    """
    occ = logits.sigmoid() >= threshold  # [B, 1, R, R, R]
    return occ[:, 0].nonzero().int()  # [N, 4]


# ---------------------------------------------------------------------------------------------
# Model calls of the coarse stage


def encode_pixels(encoder, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`pixels [B, 4, S, S]` (from `image.preprocess_image`) → `(cond [B, T, C] fp32, patch_mask [B, P, P])`.

    `encoder` is an `ImageConditioner` on the target device; the unconditional branch is `zeros_like(cond)`
    (the original does not encode a blank image).
    """
    dev = next(encoder.parameters()).device
    with torch.no_grad():
        return encoder(pixels[:, :3].to(dev), pixels[:, 3:4].to(dev))


def decode_occupancy(vae, latent: torch.Tensor, *, threshold: float = 0.1, block_size: int = 8) -> torch.Tensor:
    """Latent `[B, 8, R, R, R]` → the sparse index of the next stage: coords `[N, 4]` int32, block-sorted.

    Decodes occupancy logits on the 4R grid (64³), keeps voxels with probability ≥ `threshold` (0.1, fixed
    in the original) and orders them with `sort_block(·, block_size)` (the sparse DiT's selection block
    size, 8). Raises ValueError when nothing is occupied — the next stage would have no tokens.
    """
    dev = next(vae.parameters()).device
    with torch.no_grad():
        logits = vae.decode(latent.to(dev))
        coords = occupancy_coords(logits, threshold)
    counts = torch.bincount(coords[:, 0].long(), minlength=latent.shape[0]).tolist()
    if min(counts) == 0:
        empty = counts.index(0)
        raise ValueError(
            f"The coarse stage found no occupied voxel for image {empty} (max occupancy "
            f"{logits[empty].float().sigmoid().max().item():.3f} < {threshold}); try another seed, "
            "a higher guidance, or check that the mask covers the object."
        )
    return sort_block(coords, block_size)[0]
