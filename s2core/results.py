"""The typed results that pass between the stages of `s2core.pipeline` (SPEC.md §3).

Batches are packed (ragged) like pytorch3d's `Meshes`: rows of item b are contiguous, items in order.

| object        | packed rows               | per item                                 |
|---------------|---------------------------|------------------------------------------|
| `Structure`   | `coords [N, 4]`           | `counts[b]` rows, `cu_seqlens[b]:[b+1]`   |
| `SparseLatent`| `feats [N, C]` (= coords) | same rows as its `Structure`             |
| `Mesh`        | `vertices [V, 3]`, `faces [F, 3]` | `vertex_counts[b]`, `face_counts[b]`; faces index the item's own vertices |

Example, B=2 with 3 and 2 tokens: `coords` rows 0-2 are (0, x, y, z), rows 3-4 are (1, x, y, z),
`cu_seqlens = [0, 3, 5]`, `counts = (3, 2)`, `max_seqlen = 3`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .sparse.tensor import SparseTensor
from .structure import sort_block


@dataclass(frozen=True)
class Conditioning:
    """DINOv2 image tokens for B images (SPEC.md §5).

    | field        | shape / dtype                  | meaning                                               |
    |--------------|--------------------------------|-------------------------------------------------------|
    | `tokens`     | [B, T, C] float32              | `LN(x_prenorm)`: cls, 4 registers, 37x37 patches (T=1374, C=1024 official) |
    | `patch_mask` | [B, P, P] bool                 | patch cells touched by the object mask (P=37); used only by v1.0 sparse stages |

    The unconditional branch is `zeros_like(tokens)` (built by the samplers, not stored).
    """

    tokens: torch.Tensor
    patch_mask: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def to(self, device) -> "Conditioning":
        return Conditioning(self.tokens.to(device), self.patch_mask.to(device))


@dataclass(frozen=True)
class DenseLatent:
    """Coarse-stage latent: `latents [B, 8, 16, 16, 16]` (model dtype) after `steps` Euler steps from `seed`."""

    latents: torch.Tensor
    seed: int

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    def to(self, device) -> "DenseLatent":
        return DenseLatent(self.latents.to(device), self.seed)


@dataclass(frozen=True)
class Structure:
    """The sparse token index a sparse DiT runs on: active latent cells of a `grid`³ grid.

    | field        | shape / dtype      | meaning                                                        |
    |--------------|--------------------|----------------------------------------------------------------|
    | `coords`     | [N, 4] int32       | (batch, x, y, z), x,y,z in [0, grid); items in batch order, each block-sorted (SPEC.md §9.1) |
    | `resolution` | int                | the stage: 512 or 1024 (official SDF resolution of its decode)   |
    | `grid`       | int                | latent grid edge: 64 / 128 official (16 / 32 for tiny-random); the SDF is 8x finer |
    | `block_size` | int                | SSA selection block edge (8)                                   |
    | `cu_seqlens` | [B+1] int32        | rows of item b are cu_seqlens[b]:cu_seqlens[b+1]                |
    | `counts`     | tuple[int] (B)     | tokens per item, Python ints (no host sync later)              |
    | `max_seqlen` | int                | max(counts)                                                    |
    | `num_blocks` | tuple[int] (B)     | occupied `block_size`³ blocks per item                         |
    | `block_cu`   | [K+1] int32        | token rows of the k-th occupied block (all items, in row order) are block_cu[k]:block_cu[k+1] |
    | `cache`      | dict               | memo shared by every SparseTensor made from it (kernel maps, windows, SSA block ranges): computed on the first step, reused by all later steps |
    """

    coords: torch.Tensor
    resolution: int
    grid: int
    block_size: int
    cu_seqlens: torch.Tensor
    counts: tuple[int, ...]
    max_seqlen: int
    num_blocks: tuple[int, ...]
    block_cu: torch.Tensor
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return len(self.counts)

    @property
    def num_tokens(self) -> int:
        return self.coords.shape[0]

    def to(self, device) -> "Structure":
        device = torch.device(device)
        if self.coords.device == device:
            return self
        return replace(
            self,
            coords=self.coords.to(device),
            cu_seqlens=self.cu_seqlens.to(device),
            block_cu=self.block_cu.to(device),
            cache={},
        )

    def sparse(self, feats: torch.Tensor):
        """A SparseTensor of `feats [N, C]` on these coords, sharing this structure's cache."""
        return SparseTensor(feats, self.coords, self.batch_size, self.cu_seqlens.to(torch.int64), self.cache)


@dataclass(frozen=True)
class SparseLatent:
    """Sparse-stage latent: `feats [N, 16]` (model dtype), one row per `structure.coords` row."""

    feats: torch.Tensor
    structure: Structure
    seed: int

    @property
    def resolution(self) -> int:
        return self.structure.resolution

    def to(self, device) -> "SparseLatent":
        return SparseLatent(self.feats.to(device), self.structure.to(device), self.seed)


@dataclass(frozen=True)
class Mesh:
    """B triangle meshes, packed.

    | field           | shape / dtype   | meaning                                                         |
    |-----------------|-----------------|-----------------------------------------------------------------|
    | `vertices`      | [V, 3] float32  | positions, roughly in [-1, 1] (grid index / resolution * 2 - 1), axes as the original (+Y up in glTF viewers) |
    | `faces`         | [F, 3] int64    | vertex indices local to each item, counter-clockwise = outward   |
    | `vertex_counts` | tuple[int] (B)  | vertices per item                                                |
    | `face_counts`   | tuple[int] (B)  | faces per item                                                   |
    | `resolution`    | int             | stage it was decoded at (512, 1024; 0 = unknown)                 |
    | `info`          | dict            | provenance written into saved files: variant, seed, resolution   |
    | `vertex_colors` | [V, 3] float32 or None | sRGB in [0, 1] per vertex (`s2core.colour`); linear in GLB COLOR_0 and core MESH (`colour/space.py`) |
    """

    vertices: torch.Tensor
    faces: torch.Tensor
    vertex_counts: tuple[int, ...]
    face_counts: tuple[int, ...]
    resolution: int = 0
    info: dict = field(default_factory=dict, compare=False)
    vertex_colors: torch.Tensor | None = field(default=None, compare=False)

    @classmethod
    def from_list(
        cls,
        items: list[tuple[torch.Tensor, torch.Tensor]],
        resolution: int = 0,
        info: dict | None = None,
        colors: list[torch.Tensor] | None = None,
    ) -> "Mesh":
        """Pack (vertices, faces) items; `colors` (one [V_i, 3] per item) become `vertex_colors`."""
        v = [torch.as_tensor(a).to(torch.float32).reshape(-1, 3) for a, _ in items]
        f = [torch.as_tensor(b).to(torch.int64).reshape(-1, 3) for _, b in items]
        c = None
        if colors is not None:
            c = [torch.as_tensor(x).to(torch.float32).reshape(-1, 3).to(a.device) for x, a in zip(colors, v)]
            if len(c) != len(v) or any(x.shape != a.shape for x, a in zip(c, v)):
                raise ValueError("vertex colours must give one RGB row per vertex of every mesh item.")
            c = torch.cat(c) if c else torch.zeros(0, 3)
        return cls(
            torch.cat(v) if v else torch.zeros(0, 3),
            torch.cat(f) if f else torch.zeros(0, 3, dtype=torch.int64),
            tuple(x.shape[0] for x in v),
            tuple(x.shape[0] for x in f),
            resolution,
            dict(info or {}),
            c,
        )

    @property
    def batch_size(self) -> int:
        return len(self.vertex_counts)

    def item(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(vertices [V_i, 3], faces [F_i, 3]) of item i."""
        va, fa = sum(self.vertex_counts[:i]), sum(self.face_counts[:i])
        return (self.vertices[va : va + self.vertex_counts[i]], self.faces[fa : fa + self.face_counts[i]])

    def items(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.item(i) for i in range(self.batch_size)]

    def item_colors(self, i: int) -> torch.Tensor | None:
        """vertex_colors [V_i, 3] of item i, or None."""
        if self.vertex_colors is None:
            return None
        va = sum(self.vertex_counts[:i])
        return self.vertex_colors[va : va + self.vertex_counts[i]]

    def to(self, device) -> "Mesh":
        c = self.vertex_colors.to(device) if self.vertex_colors is not None else None
        return replace(self, vertices=self.vertices.to(device), faces=self.faces.to(device), vertex_colors=c)


def make_structure(
    coords: torch.Tensor, resolution: int, grid: int, block_size: int = 8, sort: bool = True
) -> Structure:
    """Build a Structure for stage `resolution` (512|1024) from `coords [N, 4]` (batch, x, y, z) on a `grid`³ grid.

    With `sort`, rows are ordered by batch item, then block-sorted inside each item
    (`structure.sort_block`, SPEC.md §9.1) — SSA's top-k depends on this order. The token counts are
    read to the host here, once per structure, so the sampling loop never syncs.
    """
    if resolution not in (512, 1024):
        raise ValueError(f"Structure resolution must be 512 or 1024, got {resolution}.")
    coords = coords.to(torch.int32)
    if sort:
        coords = sort_block(coords, block_size)[0]
    bsz = int(coords[:, 0].max().item()) + 1 if coords.shape[0] else 1
    counts_t = torch.bincount(coords[:, 0].long(), minlength=bsz)
    cu = torch.zeros(bsz + 1, dtype=torch.int32, device=coords.device)
    cu[1:] = torch.cumsum(counts_t, 0)
    c = coords.to(torch.int64)
    key = torch.cat([c[:, :1], c[:, 1:] // block_size], 1)  # [N, 4] (b, block x, y, z); rows are block-contiguous
    starts = torch.ones(len(c), dtype=torch.bool, device=c.device)
    starts[1:] = (key[1:] != key[:-1]).any(1)
    first = torch.nonzero(starts).squeeze(1)
    block_cu = torch.cat([first, first.new_tensor([len(c)])]).to(torch.int32)
    nblk = torch.bincount(key[first, 0], minlength=bsz)
    counts = tuple(int(n) for n in counts_t.tolist())
    return Structure(
        coords.contiguous(),
        resolution,
        grid,
        block_size,
        cu,
        counts,
        max(counts, default=0),
        tuple(int(n) for n in nblk.tolist()),
        block_cu,
    )
