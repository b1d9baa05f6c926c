"""Spatial Sparse Attention (SSA): the self-attention of the sparse DiT (SPARSE.md §6).

Three branches over the same queries, mixed per token by sigmoid gates (§6.7):

    compressed  every query attends to one pooled key/value per occupied cbs³ cell of its sample (§6.2-6.3)
    selected    every query attends to the tokens of the top-k selection blocks its compressed attention
                weighted most, pooled over the G query heads of each KV head (§6.4-6.5)
    window      full attention inside 8³ windows, shifted by 0 or 4 on alternate blocks (§6.6)

Letters: `N` tokens, `C` channels (1024), `HQ` query heads (32), `H` KV heads (2), `G = HQ / H`, `D` head dim
(32), `M` compressed cells, `NB` occupied selection blocks, `B` samples.

Tokens must be block-sorted (`structure.sort_block(coords, selection_block_size)`): the tokens of every
selection block contiguous, blocks in ascending (x, y, z) order, samples contiguous — the original relies on
it (§6.8) and so do the selection kernel's token ranges. Everything derived from the coordinates (cells,
blocks, windows, their offsets and maximum lengths as Python ints) lives in an `SSAPlan`, built once per
coordinate set by `ssa_plan` and memoised in `SparseTensor.cache`; `forward` has no host syncs.

Parameter names are the checkpoint's (`proj_q`, `compression_key.act_layers.0.conv.kernel`, `gate.0`, ...).
The compression's sparse convolutions are torchsparse convs: a 1x1x1 conv stores a 2-D `kernel [Cin, Cout]`
(a plain matmul here), a 3x3x3 submanifold conv `kernel [27, Cin, Cout]` with tap k = (dx+1) + 3(dy+1) + 9(dz+1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._kernels import ssa_compressed as _cmp
from ._kernels import ssa_selection as _sel
from ._kernels import ssa_window as _win
from ._kernels import tuning as _tuning
from .layers import group_norm_per_sample
from .sparse import SparseTensor
from .sparse.coords import keys_to_coords, pack_keys, window_partition


@dataclass
class SSAPlan:
    """What SSA needs from the coordinates of one block-sorted token set (all int tensors on its device).

    | field | shape | meaning |
    |---|---|---|
    | cu_seqlens | [B+1] int32 | token rows of each sample |
    | max_seqlen | int | tokens in the largest sample |
    | pe_index | [N] int64 | (x%cbs)·cbs² + (y%cbs)·cbs + z%cbs, row of the flattened `intra_block_pe` |
    | cell_of_token | [N] int64 | compressed cell of each token (cells lexicographic in (b, cx, cy, cz)) |
    | cell_divisor | [M, 1] fp32 | children + 1 (the original's mean pooling counts its zero init, §2.3) |
    | cell_batch | [M] int64 | sample of each cell |
    | cu_cells | [B+1] int32 | cells of each sample |
    | cell_neighbors | [M, 27] int64 or None | 3x3x3 neighbour cell (M = none), v2 compression only |
    | cu_blocks | [B+1] int32 | occupied selection blocks of each sample (ascending block order) |
    | cu_block_tokens | [NB+1] int32 | token rows of each block |
    | block_keys | [NB, CELLS] int32 or None | cells of each block (-1 padded); None when cell = block |
    | windows | {shift: (perm [N] int32, cu_windows [W+1] int32, tiles [T,2] int32, max_window int)} | |
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    pe_index: torch.Tensor
    cell_of_token: torch.Tensor
    cell_divisor: torch.Tensor
    cell_batch: torch.Tensor
    cu_cells: torch.Tensor
    cell_neighbors: torch.Tensor | None
    cu_blocks: torch.Tensor
    cu_block_tokens: torch.Tensor
    block_keys: torch.Tensor | None
    batch_size: int
    windows: dict = field(default_factory=dict)


def _cu(counts: torch.Tensor) -> torch.Tensor:
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    cu[1:] = torch.cumsum(counts, 0)
    return cu


def ssa_plan(
    coords: torch.Tensor,
    batch_size: int,
    compression_block_size: int = 8,
    selection_block_size: int = 8,
    window_size: int = 8,
    shifts: tuple[int, ...] = (0, 4),
    conv_neighbors: bool = False,
) -> SSAPlan:
    """Build the SSAPlan of block-sorted `coords [N, 4]` (host syncs here, never in forward)."""
    cbs, sbs = compression_block_size, selection_block_size
    if sbs % cbs:
        raise ValueError(f"selection block size {sbs} must be a multiple of the compression block size {cbs}.")
    device = coords.device
    c = coords.long()
    b, xyz = c[:, 0], c[:, 1:]
    n = c.shape[0]
    tokens_per_sample = torch.bincount(b, minlength=batch_size)
    cu_seqlens = _cu(tokens_per_sample)
    blk_key = pack_keys(b, xyz // sbs)
    if n > 1 and bool((blk_key[1:] < blk_key[:-1]).any()):
        raise ValueError(
            "SSA needs block-sorted tokens (each 8^3 selection block contiguous, blocks in ascending "
            "x, y, z order); reorder the coordinates with structure.sort_block(coords, 8) first."
        )
    _, block_counts = torch.unique_consecutive(blk_key, return_counts=True)
    block_first = torch.cumsum(block_counts, 0) - block_counts
    cu_blocks = _cu(torch.bincount(b[block_first], minlength=batch_size))
    cu_block_tokens = _cu(block_counts)

    cell_xyz = xyz // cbs
    cell_key = pack_keys(b, cell_xyz)
    cells, cell_of_token, cell_counts = torch.unique(cell_key, return_inverse=True, return_counts=True)
    m = cells.numel()
    cell_bxyz = keys_to_coords(cells)  # [M, 4]
    cell_batch = cell_bxyz[:, 0]
    cu_cells = _cu(torch.bincount(cell_batch, minlength=batch_size))
    inb = xyz % cbs
    pe_index = (inb[:, 0] * cbs + inb[:, 1]) * cbs + inb[:, 2]

    block_keys = None
    if cbs != sbs:  # v1.0: several compression cells per selection block
        r = sbs // cbs
        cxyz = cell_bxyz[:, 1:]
        cblk = pack_keys(cell_batch, cxyz // r)  # the cell's block key
        blk_keys_sorted = blk_key[block_first]  # [NB] ascending
        blk_of_cell = torch.searchsorted(blk_keys_sorted, cblk)  # global block index
        order = torch.sort(blk_of_cell, stable=True).indices
        first = torch.searchsorted(blk_of_cell[order], blk_of_cell[order], right=False)
        rank = torch.arange(m, device=device) - first
        block_keys = torch.full((block_counts.numel(), r**3), -1, dtype=torch.int32, device=device)
        block_keys[blk_of_cell[order], rank] = order.to(torch.int32)

    neighbors = None
    if conv_neighbors:
        cxyz = cell_bxyz[:, 1:]
        d = torch.arange(-1, 2, device=device)
        offs = torch.stack(torch.meshgrid(d, d, d, indexing="ij"), -1).reshape(27, 3).flip(1)  # x fastest
        nb = cxyz[:, None, :] + offs[None]  # [M, 27, 3]
        valid = (nb >= 0).all(-1)
        nkey = pack_keys(cell_batch[:, None].expand(-1, 27).reshape(-1), nb.clamp(min=0).reshape(-1, 3)).view(m, 27)
        pos = torch.searchsorted(cells, nkey).clamp(max=max(m - 1, 0))
        found = valid & (cells[pos] == nkey)
        neighbors = torch.where(found, pos, m)

    plan = SSAPlan(
        cu_seqlens=cu_seqlens,
        max_seqlen=int(tokens_per_sample.max()) if n else 0,
        pe_index=pe_index,
        cell_of_token=cell_of_token,
        cell_divisor=(cell_counts + 1).to(torch.float32)[:, None],
        cell_batch=cell_batch,
        cu_cells=cu_cells,
        cell_neighbors=neighbors,
        cu_blocks=cu_blocks,
        cu_block_tokens=cu_block_tokens,
        block_keys=block_keys,
        batch_size=batch_size,
    )
    for s in shifts:
        perm, cu_w, max_w = window_partition(coords, window_size, s)
        plan.windows[s] = (perm, cu_w, _win.window_tiles(cu_w), max_w)
    return plan


def plan_for(
    x: SparseTensor,
    compression_block_size: int,
    selection_block_size: int,
    window_size: int,
    conv_neighbors: bool = False,
) -> SSAPlan:
    """The SSAPlan of x's coordinates, memoised in x.cache (shared by every layer and step on these coords)."""
    key = ("ssa_plan", compression_block_size, selection_block_size, window_size, conv_neighbors)
    plan = x.cache.get(key)
    if plan is None:
        plan = ssa_plan(
            x.coords,
            x.batch_size,
            compression_block_size,
            selection_block_size,
            window_size,
            (0, window_size // 2),
            conv_neighbors,
        )
        x.cache[key] = plan
    return plan


# ------------------------------------------------------------------------------------------------
# compression blocks (§6.2)


class _ConvParams(nn.Module):
    """torchsparse Conv3d parameters: kernel [Cin, Cout] (1x1x1) or [27, Cin, Cout] (3x3x3), bias [Cout]."""

    def __init__(self, cin: int, cout: int, taps: int):
        super().__init__()
        self.kernel = nn.Parameter(torch.zeros((cin, cout) if taps == 1 else (taps, cin, cout)))
        self.bias = nn.Parameter(torch.zeros(cout))


class SparseConv(nn.Module):
    """Holder named like the original's wrapper (`<name>.conv.kernel`, `<name>.conv.bias`)."""

    def __init__(self, cin: int, cout: int, taps: int):
        super().__init__()
        self.conv = _ConvParams(cin, cout, taps)

    def pointwise(self, x: torch.Tensor) -> torch.Tensor:  # [R, Cin] -> [R, Cout]
        return torch.addmm(self.conv.bias.to(x.dtype), x, self.conv.kernel.to(x.dtype))

    def submanifold(self, x: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
        """3x3x3 submanifold conv on rows with neighbour map [R, 27] (R = absent)."""
        x_pad = torch.cat([x, x.new_zeros(1, x.shape[1])], 0)
        g = x_pad[neighbors]  # [R, 27, Cin]
        w = self.conv.kernel.to(x.dtype)
        out = torch.mm(g.reshape(x.shape[0], -1), w.reshape(-1, w.shape[-1]))  # fp32 accumulate in GEMM
        return out + self.conv.bias.to(x.dtype)


def pool_cells(x: torch.Tensor, plan: SSAPlan) -> torch.Tensor:
    """[N, C] -> [M, C]: sum of each cell's tokens / (count + 1), the original's mean-with-zero-init."""
    acc = torch.zeros(plan.cell_divisor.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    acc.index_add_(0, plan.cell_of_token, x.float())
    return (acc / plan.cell_divisor).to(x.dtype)


class CompressionV1(nn.Module):
    """v1.1: `Down_cbs(SiLU(conv1x1(x)))` (`act_layers.0` = the 1x1x1 conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.act_layers = nn.ModuleList([SparseConv(channels, channels, 1), nn.SiLU()])

    def forward(self, x: torch.Tensor, plan: SSAPlan) -> torch.Tensor:  # [N, C] -> [M, C]
        return pool_cells(F.silu(self.act_layers[0].pointwise(x)), plan)


class CompressionV2(nn.Module):
    """v1.0: `conv3(SiLU(GN(conv3(Down(SiLU(GN(x))))))) + Down(x)`, convs submanifold on the cell grid."""

    def __init__(self, channels: int, num_groups: int = 32):
        super().__init__()
        self.act_layers = nn.ModuleList([nn.GroupNorm(num_groups, channels), nn.SiLU()])
        self.out_layers = nn.ModuleList(
            [
                SparseConv(channels, channels, 27),
                nn.GroupNorm(num_groups, channels),
                nn.SiLU(),
                SparseConv(channels, channels, 27),
            ]
        )

    def forward(self, x: torch.Tensor, plan: SSAPlan) -> torch.Tensor:  # [N, C] -> [M, C]
        tok_batch = plan.cell_batch[plan.cell_of_token]
        gn1, gn2 = self.act_layers[0], self.out_layers[1]
        h = F.silu(group_norm_per_sample(x, tok_batch, plan.batch_size, gn1.num_groups, gn1.weight, gn1.bias, gn1.eps))
        h = pool_cells(h, plan)
        h = self.out_layers[0].submanifold(h, plan.cell_neighbors)
        h = F.silu(
            group_norm_per_sample(h, plan.cell_batch, plan.batch_size, gn2.num_groups, gn2.weight, gn2.bias, gn2.eps)
        )
        h = self.out_layers[3].submanifold(h, plan.cell_neighbors)
        return h + pool_cells(x, plan)


# ------------------------------------------------------------------------------------------------


class SpatialSparseAttention(nn.Module):
    """SSA over block-sorted tokens: x [N, C] + its SSAPlan -> [N, C] (checkpoint key prefix `self_attn.`)."""

    def __init__(
        self,
        channels: int = 1024,
        num_heads: int = 32,
        num_kv_heads: int = 2,
        compression_block_size: int = 8,
        selection_block_size: int = 8,
        topk: int = 8,
        window_size: int = 8,
        shift_window: int = 0,
        compression_version: str = "v1",
    ):
        super().__init__()
        if compression_version not in ("v1", "v2"):
            raise ValueError(f"compression_version must be 'v1' or 'v2', got {compression_version!r}.")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = channels // num_heads
        self.compression_block_size = compression_block_size
        self.selection_block_size = selection_block_size
        self.topk, self.window_size, self.shift_window = topk, window_size, shift_window
        self.compression_version = compression_version
        kv = num_kv_heads * self.head_dim
        self.proj_q = nn.Linear(channels, channels, bias=False)
        self.proj_k = nn.Linear(channels, kv, bias=False)
        self.proj_v = nn.Linear(channels, kv, bias=False)
        self.proj_o = nn.Linear(channels, channels, bias=False)
        block = CompressionV1 if compression_version == "v1" else CompressionV2
        self.compression_key = block(kv)
        self.compression_value = block(kv)
        cbs = compression_block_size
        self.intra_block_pe = nn.Parameter(torch.zeros(cbs, cbs, cbs, kv))  # stays fp32 in fp16 models
        self.gate = nn.Sequential(nn.Linear(channels, 3, bias=False))  # key `gate.0.weight`; sigmoid in forward

    def plan(self, x: SparseTensor) -> SSAPlan:
        return plan_for(
            x,
            self.compression_block_size,
            self.selection_block_size,
            self.window_size,
            conv_neighbors=self.compression_version == "v2",
        )

    def forward(self, x: torch.Tensor, plan: SSAPlan, backend: str = "auto") -> torch.Tensor:
        n = x.shape[0]
        HQ, H, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.proj_q(x).view(n, HQ, D)  # [N, HQ, D]
        k = self.proj_k(x)  # [N, H*D]
        v = self.proj_v(x)
        pe = self.intra_block_pe.reshape(-1, H * D)[plan.pe_index].to(k.dtype)
        ck = self.compression_key(k + pe, plan).view(-1, H, D)  # [M, H, D]
        cv = self.compression_value(v, plan).view(-1, H, D)
        k, v = k.view(n, H, D), v.view(n, H, D)
        g = torch.sigmoid(self.gate(x))  # [N, 3] gates of (compressed, selected, window), shared by all heads
        if q.is_cuda and backend != "reference":
            # A process's first call of each shape class compiles every kernel config it may tune, all at once
            # (kernels/tuning.py); the dry run reads q..g and writes only buffers of its own.
            key = ("ssa", q.device, q.dtype, HQ, H, D, self.topk, plan.block_keys is None, _tuning.tune_size(n))
            _tuning.compile_ahead(key, lambda: self.attend(q, k, v, ck, cv, g, plan, backend))
        return self.proj_o(self.attend(q, k, v, ck, cv, g, plan, backend).reshape(n, HQ * D))

    def attend(self, q, k, v, ck, cv, g, plan: SSAPlan, backend: str = "auto") -> torch.Tensor:
        """The three attention branches, gated and summed: q [N, HQ, D], k/v [N, H, D], compressed ck/cv
        [M, H, D], gates g [N, 3] -> o [N, HQ, D]."""
        perm, cu_win, tiles, max_win = plan.windows[self.shift_window]
        # each branch kernel scales its output by its gate and adds it into `o` (one [N, HQ, D] buffer, no combine)
        o, _, block_idx = _cmp.ssa_compressed_attention(
            q,
            ck,
            cv,
            plan.cu_seqlens,
            plan.cu_cells,
            plan.max_seqlen,
            self.topk,
            plan.block_keys,
            plan.cu_blocks,
            gate=g[:, 0],
            return_lse=False,
            backend=backend,
        )  # o [N, HQ, D], block_idx [H, N, topk]
        _sel.ssa_selection_attention(
            q,
            k,
            v,
            block_idx,
            plan.cu_seqlens,
            plan.cu_blocks,
            plan.cu_block_tokens,
            plan.max_seqlen,
            gate=g[:, 1],
            out=o,
            backend=backend,
        )
        _win.ssa_window_attention(q, k, v, perm, cu_win, max_win, tiles, gate=g[:, 2], out=o, backend=backend)
        return o
