"""Submanifold sparse convolution and sparse resampling in plain PyTorch (SPARSE.md §2).

Dimension letters: `N` active voxels, `Cin`/`Cout` channels, `K = 27` kernel taps.

Convolution (stride 1, output set = input set, same order), torchsparse semantics and weight layout:

    out[p] = bias + sum_k [p + off(k) active] * in[p + off(k)] @ W[k]          W: [27, Cin, Cout]
    off(k) = (dx, dy, dz),  k = (dx+1) + 3(dy+1) + 9(dz+1)   (x = coords column 1 varies fastest)

so the input at p + off(k) reaches output p through slice k; centre tap k = 13. A 1x1x1 conv keeps a
2-D kernel [Cin, Cout]. Neighbours never cross batch elements.

Kernel map: each voxel (b, x, y, z) becomes one int64 key (`coords.coords_to_keys`, whose +1 shift keeps a
-1 neighbour a valid key); keys are sorted once and `searchsorted` finds all 27
neighbours at once -> `nbr [N, 27]` int32 (row index of the neighbour, N where inactive). The map is built
on the tensor's device and memoised in `SparseTensor.cache`, which every tensor with the same coords
shares, so the convs at one resolution build it once. `sparse_subdivide` does not search: its output
keeps the parent's map, and each conv derives the rows of the children's map it needs from it by a gather
(all 8 children of a parent exist), block by block; the decoder's last level (13.9 M voxels at 512) thus
never holds a [N, 27] map (1.5 GB).

Compute, few channels (at most 64 in and out) on CUDA with USE_KERNEL: `kernels/sparse_conv.py`, an implicit
GEMM that gathers each tap's neighbour rows itself, reading a subdivided set's map off its parent's map row by
row; `sparse_subdivide_conv3d` runs it on the parents' features, so a subdivided level's copied features are
never built. Otherwise: gather the 27 neighbour rows of a block of outputs into [rows, 27*Cin] (a zero row stands for
inactive neighbours) and do one GEMM with W viewed as [27*Cin, Cout]: one fp32-accumulated reduction over all
taps with a single rounding, as torchsparse's implicit GEMM does. Output blocks bound the gathered buffer's
memory. No atomics, so it is bitwise repeatable. (One GEMM per tap plus a scatter-add was slower at every
size measured and not repeatable on a GPU: bench/results/sparse_conv.md.)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .._kernels import sparse_conv as _kernel
from .coords import coords_to_keys, key_deltas, keys_to_coords
from .tensor import SparseTensor

__all__ = [
    "kernel_offsets",
    "kernel_map",
    "kernel_map_rows",
    "subdivided_kernel_map",
    "sparse_conv3d",
    "sparse_conv3d_reference",
    "SparseConv3d",
    "TorchsparseConv3d",
    "sparse_downsample",
    "SparseDownsample",
    "sparse_subdivide",
    "sparse_subdivide_conv3d",
    "SparseSubdivide",
]

_MAX_GATHER = 1 << 26  # elements of the gathered [rows, 27*Cin] block (128 MiB in fp16)
# True: few-channel 3x3x3 convolutions on CUDA run as the implicit-GEMM kernel (`kernels/sparse_conv.py`).
# Off until timed on a GPU: it is tested against its reference (Triton's interpreter) and compiles for
# sm_80-120 (bench/results/archs.md), but no GPU was lent the session that wrote it. `bench/bench_sparse_conv.py
# --kernel` and `bench/e2e.py --sparse-conv-kernel on` measure it against the gather + GEMM path.
USE_KERNEL = False


def kernel_offsets(device=None) -> torch.Tensor:
    """[27, 3] int64 (dx, dy, dz) of tap k = (dx+1) + 3(dy+1) + 9(dz+1)."""
    k = torch.arange(27, device=device)
    return torch.stack([k % 3, k // 3 % 3, k // 9], 1) - 1


def build_kernel_map(coords: torch.Tensor, block: int = 1 << 20) -> torch.Tensor:
    """[N, 27] int32: row of the neighbour at p + off(k), or N when that voxel is inactive.

    Queried in blocks of rows so the int64 temporaries stay ~0.2 GB whatever N is."""
    n = coords.shape[0]
    assert n < 2**31 - 1, "more voxels than an int32 kernel map can index"
    keys = coords_to_keys(coords)
    sorted_keys, order = torch.sort(keys)
    order = order.int()
    deltas = key_deltas(kernel_offsets(coords.device))  # [27]
    nbr = torch.empty(n, 27, dtype=torch.int32, device=coords.device)
    for s in range(0, n, block):  # blocks of rows, not voxels
        query = keys[s : s + block, None] + deltas[None, :]  # [rows, 27]
        pos = torch.searchsorted(sorted_keys, query).clamp_(max=n - 1)
        nbr[s : s + block] = torch.where(sorted_keys[pos] == query, order[pos], n)
    return nbr


def kernel_map(x: SparseTensor) -> torch.Tensor:
    """The memoised [N, 27] neighbour map of x's coordinates (see build_kernel_map)."""
    nbr = x.cache.get("kernel_map_3")
    if nbr is None:
        parent = x.cache.get("parent_kernel_map_3")
        nbr = build_kernel_map(x.coords) if parent is None else subdivided_kernel_map(parent)
        x.cache["kernel_map_3"] = nbr
    return nbr


def kernel_map_rows(x: SparseTensor):
    """rows(s, e) -> x's kernel map rows [s, e) (s, e multiples of 8, or e = N): sliced from the memoised
    map, or, for a subdivided tensor, derived from its parent's map without building the whole map."""
    parent = x.cache.get("parent_kernel_map_3")
    if "kernel_map_3" in x.cache or parent is None:
        nbr = kernel_map(x)
        return lambda s, e: nbr[s:e]
    return lambda s, e: subdivided_kernel_map(parent[s // 8 : (e + 7) // 8], parent.shape[0])


def sparse_conv3d(x: SparseTensor, kernel: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Submanifold conv of x.feats [N, Cin] with kernel [27, Cin, Cout] (or [Cin, Cout]) -> [N, Cout]."""
    feats = x.feats
    if kernel.ndim == 2:  # 1x1x1: a plain matmul
        out = feats @ kernel
    else:
        assert kernel.shape[0] == 27, f"only 3x3x3 kernels are supported, got {tuple(kernel.shape)}"
        if USE_KERNEL and _kernel.suits(feats, kernel):
            parent = x.cache.get("parent_kernel_map_3")
            if "kernel_map_3" in x.cache or parent is None:
                return _kernel.sparse_conv3d(feats, kernel_map(x), kernel, bias, "direct")
            return _kernel.sparse_conv3d(feats, parent, kernel, bias, "derived", n_out=feats.shape[0])
        n, cin = feats.shape
        cout = kernel.shape[2]
        w = kernel.reshape(27 * cin, cout)
        padded = torch.cat([feats, feats.new_zeros(1, cin)], 0)  # row N = inactive neighbour
        out = feats.new_empty(n, cout)
        step = max(8, _MAX_GATHER // (27 * cin) // 8 * 8)  # a multiple of 8: whole families of children
        rows = kernel_map_rows(x)
        for s in range(0, n, step):  # blocks of rows bound the [rows, 27*Cin] buffer
            out[s : s + step] = padded[rows(s, min(s + step, n)).long()].reshape(-1, 27 * cin) @ w
    if bias is not None:
        out = out + bias
    return out


def sparse_conv3d_reference(
    feats: torch.Tensor, coords: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Brute force, fp64, for tests: compare every pair of voxels (O(N^2) memory; keep N small)."""
    f = feats.double()
    out = torch.zeros(feats.shape[0], kernel.shape[-1], dtype=torch.float64, device=feats.device)
    d = coords[None, :, :].long() - coords[:, None, :].long()  # [out, in, 4] = in - out
    same_batch = d[..., 0] == 0
    for k, (dx, dy, dz) in enumerate(kernel_offsets().tolist()):
        hit = same_batch & (d[..., 1] == dx) & (d[..., 2] == dy) & (d[..., 3] == dz)  # [out, in]
        out += hit.double() @ f @ kernel[k].double()
    if bias is not None:
        out += bias.double()
    return out


class TorchsparseConv3d(nn.Module):
    """Parameter holder with torchsparse's names: `kernel` [27, Cin, Cout] ([Cin, Cout] for 1x1x1), `bias`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True):
        super().__init__()
        assert kernel_size in (1, 3), "the Direct3D-S2 models use only 1x1x1 and 3x3x3 convs"
        shape = (in_channels, out_channels) if kernel_size == 1 else (27, in_channels, out_channels)
        self.kernel = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        nn.init.normal_(self.kernel, std=(in_channels * kernel_size**3) ** -0.5)


class SparseConv3d(nn.Module):
    """Stride-1 submanifold conv; checkpoint keys `<prefix>.conv.kernel`, `<prefix>.conv.bias`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        self.conv = TorchsparseConv3d(in_channels, out_channels, kernel_size, bias)  # name = checkpoint's

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(sparse_conv3d(x, self.conv.kernel, self.conv.bias))


# ------------------------------------------------------------------------------------------------
# resampling


def sparse_downsample(x: SparseTensor, factor: int = 2) -> SparseTensor:
    """Pool voxels into cells of factor^3 with the original's mean: sum / (children + 1) (SPARSE.md §2.3).

    Output rows are sorted lexicographically by (b, x//f, y//f, z//f), as torch.unique orders them.
    The pooling sums in fp64 like the original's scatter_reduce, then casts back.
    """
    key = ("downsample", int(factor))
    hit = x.cache.get(key)
    if hit is None:
        parent = torch.cat([x.coords[:, :1], torch.div(x.coords[:, 1:], factor, rounding_mode="floor")], 1)
        pkeys, inverse = torch.unique(coords_to_keys(parent), return_inverse=True)
        m = pkeys.numel()
        out_coords = keys_to_coords(pkeys).int()
        denom = torch.bincount(inverse, minlength=m).double() + 1.0  # the "+1": zero init joins the mean
        hit = x.cache[key] = (out_coords, inverse, denom)
    out_coords, inverse, denom = hit
    feats = x.feats.reshape(x.feats.shape[0], -1).double()
    summed = feats.new_zeros(denom.shape[0], feats.shape[1]).index_add_(0, inverse, feats)
    out = (summed / denom[:, None]).to(x.dtype).reshape(-1, *x.feats.shape[1:])
    return SparseTensor(out, out_coords, x.batch_size)


class SparseDownsample(nn.Module):
    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = factor

    def forward(self, x: SparseTensor) -> SparseTensor:
        return sparse_downsample(x, self.factor)


def _child_offsets(device) -> torch.Tensor:
    """[8, 3] (ox, oy, oz) in the subdivide order (0,0,0), (0,0,1), (0,1,0), ... (1,1,1): z fastest."""
    o = torch.arange(8, device=device)
    return torch.stack([o >> 2 & 1, o >> 1 & 1, o & 1], 1)


def subdivided_kernel_map(parent_map: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """The [8M, 27] kernel map of sparse_subdivide's output, read off the parent's [M, 27] map (or off rows of
    it: parent_map = the map's rows [a, a + M), n = all parents, giving the children's rows [8a, 8a + 8M)).

    Every parent has all 8 children, so the neighbour of child 2p + o at offset d is child o' of parent
    p + e, with s = o + d, e = floor(s / 2), o' = s mod 2 per axis: a gather, no search."""
    n = parent_map.shape[0] if n is None else n
    s = _child_offsets(parent_map.device)[:, None, :] + kernel_offsets(parent_map.device)[None]  # [8, 27, 3]
    e, o2 = torch.div(s, 2, rounding_mode="floor"), s % 2
    parent_tap = (e[..., 0] + 1) + 3 * (e[..., 1] + 1) + 9 * (e[..., 2] + 1)  # [8, 27]
    child_idx = (o2[..., 0] * 4 + o2[..., 1] * 2 + o2[..., 2]).int()  # [8, 27]
    nb = parent_map[:, parent_tap]  # [N, 8, 27]
    return torch.where(nb < n, nb * 8 + child_idx, 8 * n).reshape(-1, 27)


def sparse_subdivide(x: SparseTensor, feats: torch.Tensor | None = None) -> SparseTensor:
    """Each voxel p -> 8 consecutive children 2p + (ox, oy, oz), z fastest, features copied (§2.4); or with
    `feats` [8N, C], the children carry those instead.

    If x's kernel map is cached, the children's map is derived from it when needed (exact, much cheaper
    than a search; see kernel_map_rows)."""
    xyz = (x.coords[:, None, 1:] * 2 + _child_offsets(x.device).int()[None]).reshape(-1, 3)  # [8N, 3]
    coords = torch.cat([x.coords[:, :1].repeat_interleave(8, 0), xyz], 1)
    feats = x.feats.repeat_interleave(8, 0) if feats is None else feats
    out = SparseTensor(feats, coords, x.batch_size, x.offsets * 8)
    if "kernel_map_3" in x.cache or "parent_kernel_map_3" in x.cache:  # x's own map, derived if need be
        out.cache["parent_kernel_map_3"] = kernel_map(x)
    return out


def sparse_subdivide_conv3d(x: SparseTensor, kernel: torch.Tensor, bias: torch.Tensor | None = None) -> SparseTensor:
    """sparse_conv3d of sparse_subdivide(x), as a SparseTensor on the children. Where the kernel runs it reads
    x's own features through x's map ("copied" in kernels/sparse_conv.py): the children's copied features (8
    rows a parent) are never made."""
    if USE_KERNEL and kernel.ndim == 3 and _kernel.suits(x.feats, kernel):
        y = _kernel.sparse_conv3d(x.feats, kernel_map(x), kernel, bias, "copied")
        return sparse_subdivide(x, feats=y)
    sub = sparse_subdivide(x)
    return sub.replace(sparse_conv3d(sub, kernel, bias))


class SparseSubdivide(nn.Module):
    def forward(self, x: SparseTensor) -> SparseTensor:
        return sparse_subdivide(x)
