"""Submanifold 3×3×3 sparse convolution of few-channel fp16 features as one implicit GEMM (SPARSE.md §2).

The sparse VAE decoders end in three subdivide blocks; their last levels hold millions of voxels with 32-64
channels (the 1024 decode's last level: every decoded voxel, ~60 M, plus each chunk's context, at 32
channels). `s2core.sparse.conv` computes such a convolution by gathering each output's 27 neighbour rows into
a [rows, 27·Cin] buffer and one GEMM: 27× the features written and read again. Here a program keeps BM
output rows in registers, gathers each tap's [BM, Cin] neighbour rows straight from the features (the caches
serve the rows that neighbouring outputs share) and multiplies them with that tap's [Cin, Cout] weights on the
tensor cores.

Which rows are neighbours, in the three forms the decoder meets (`neighbours`):

    direct     nbr [N, 27]: row of the neighbour of output r at tap k, or N where inactive (`build_kernel_map`)
    derived    output r is child o = r % 8 of parent p = r // 8 of a subdivided set, whose parents have the
               map pmap [M, 27]; its tap-k neighbour is child CHILD[o, k] of parent pmap[p, PTAP[o, k]]
               (`subdivided_kernel_map`'s arithmetic, done per row instead of materialising [8M, 27])
    copied     as derived, but the features are the parents' [M, Cin] and every child reads its parent's row,
               as after `sparse_subdivide`, which copies a parent's features into its 8 children: the
               subdivided features are never built

For output row r:

    y[r] = round(round(sum_k [active] x[row(r, k)] @ W[k]) + bias)      (round: to x's dtype; sums in fp32)

which is the reference's GEMM rounded to fp16, then its bias add in fp16, up to the fp32 summation order.

Layouts: x [rows, Cin] contiguous fp16/bf16; weight [27, Cin, Cout] (torchsparse's layout; any float dtype,
used in x's dtype); bias [Cout] or None; maps int32 contiguous; y [N, Cout] in x's dtype.
"""

from __future__ import annotations

import functools

import torch

from ._common import HALF as _HALF
from ._common import dot_width, tl, triton  # Triton, or stand-ins that let this module import without it (see _common)
from ._common import use_triton as _use_triton

__all__ = ["neighbours", "sparse_conv3d", "sparse_conv3d_reference", "suits"]

MAX_CIN = MAX_COUT = 64  # wider convolutions are GEMM-bound, where the gather + one GEMM path is fast
BLOCK_M, NUM_WARPS = 64, 4  # output rows of a program, bench/bench_sparse_conv.py --kernel
MODES = ("direct", "derived", "copied")


@functools.lru_cache(maxsize=None)
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(PTAP, CHILD) [8, 27] int32: child o's tap-k neighbour is child CHILD[o, k] of its parent's tap-PTAP[o, k]
    neighbour. Per axis, child offset c in {0, 1} plus tap offset d in {-1, 0, 1} is s = c + d: parent offset
    floor(s / 2), child offset s mod 2. Children are z fastest (`sparse_subdivide`), taps x fastest."""
    o = torch.arange(8, device=device)
    child = torch.stack([o >> 2 & 1, o >> 1 & 1, o & 1], 1)  # (cx, cy, cz)
    k = torch.arange(27, device=device)
    tap = torch.stack([k % 3, k // 3 % 3, k // 9], 1) - 1  # (dx, dy, dz)
    s = child[:, None, :] + tap[None]  # [8, 27, 3]
    e, c = torch.div(s, 2, rounding_mode="floor"), s % 2
    ptap = (e[..., 0] + 1) + 3 * (e[..., 1] + 1) + 9 * (e[..., 2] + 1)
    return ptap.int().contiguous(), (c[..., 0] * 4 + c[..., 1] * 2 + c[..., 2]).int().contiguous()


def _rows_out(mode: str, nmap: torch.Tensor, n_out: int | None) -> int:
    """Output rows: n_out, or by default nmap's rows (direct) or 8 children a parent (derived, copied)."""
    assert mode in MODES, f"mode {mode!r} is not one of {MODES}"
    return (nmap.shape[0] if mode == "direct" else 8 * nmap.shape[0]) if n_out is None else n_out


def neighbours(mode: str, nmap: torch.Tensor, n_out: int) -> torch.Tensor:
    """[n_out, 27] int64 row of x each output row reads at each tap, -1 where inactive: what the kernel
    computes row by row, as a tensor (the reference's index; tests)."""
    if mode == "direct":
        m = nmap.shape[0]
        return torch.where(nmap < m, nmap.long(), -1)
    ptap, child = _tables(nmap.device)
    r = torch.arange(n_out, device=nmap.device)
    p, o = r // 8, r % 8
    q = nmap.long()[p[:, None], ptap[o].long()]  # [n_out, 27] parent rows
    m = nmap.shape[0]
    row = q * 8 + child[o] if mode == "derived" else q
    return torch.where(q < m, row, -1)


def sparse_conv3d_reference(
    x: torch.Tensor,
    nmap: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    mode: str = "direct",
    n_out: int | None = None,
) -> torch.Tensor:
    """The decoder's convolution as `s2core.sparse.conv` computes it: gathered neighbour rows (a zero row where
    inactive) times W viewed [27·Cin, Cout], one matmul in x's dtype, then the bias add in x's dtype. n_out:
    output rows (direct: nmap's rows; derived, copied: 8 × nmap's rows)."""
    n_out = _rows_out(mode, nmap, n_out)
    cin, cout = weight.shape[1:]
    rows = neighbours(mode, nmap, n_out)
    padded = torch.cat([x, x.new_zeros(1, cin)], 0)  # row -1 = the zero row
    y = padded[rows].reshape(n_out, 27 * cin) @ weight.to(x.dtype).reshape(27 * cin, cout)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y


def suits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel computes this convolution: 3×3×3, at most 64 channels in and out, Triton for x (CUDA,
    fp16/bf16, Triton installed)."""
    return weight.dim() == 3 and weight.shape[1] <= MAX_CIN and weight.shape[2] <= MAX_COUT and _use_triton("auto", x)


@triton.jit
def _sparse_conv_kernel(
    x,
    nmap,
    ptap,
    child,
    w,
    bias,
    y,
    N,
    M,
    CIN,
    COUT,
    ROWS_PER_PARENT: tl.constexpr,
    CHILD_ROWS: tl.constexpr,
    CIN_P: tl.constexpr,
    COUT_P: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr,
):
    # program: output rows [pid·BM, (pid + 1)·BM), all output channels; the 27 taps loop at run time
    r = tl.program_id(0) * BM + tl.arange(0, BM)
    m_r = r < N
    p = (r // ROWS_PER_PARENT).to(tl.int64)
    o = r % ROWS_PER_PARENT
    ci = tl.arange(0, CIN_P)
    co = tl.arange(0, COUT_P)
    m_ci = ci[None, :] < CIN
    acc = tl.zeros([BM, COUT_P], tl.float32)
    for k in range(27):
        t = tl.load(ptap + o * 27 + k)  # direct: the identity table
        q = tl.load(nmap + p * 27 + t, mask=m_r, other=M)
        live = q < M
        row = q.to(tl.int64)
        if CHILD_ROWS:
            row = row * 8 + tl.load(child + o * 27 + k)
        a = tl.load(x + row[:, None] * CIN + ci[None, :], mask=live[:, None] & m_ci, other=0.0)
        wt = tl.load(w + k * CIN_P * COUT_P + ci[:, None] * COUT_P + co[None, :])  # zero-padded
        acc = tl.dot(a, wt, acc)
    out = acc.to(y.dtype.element_ty)
    if HAS_BIAS:
        b = tl.load(bias + co, mask=co < COUT, other=0.0)
        out = (out.to(tl.float32) + b.to(tl.float32)[None, :]).to(y.dtype.element_ty)
    tl.store(y + r.to(tl.int64)[:, None] * COUT + co[None, :], out, mask=m_r[:, None] & (co[None, :] < COUT))


def _sparse_conv3d_triton(x, nmap, weight, bias, mode, n_out, block=None) -> torch.Tensor:
    assert x.dtype in _HALF and x.dim() == 2, "x must be [rows, Cin] fp16/bf16"
    cin, cout = weight.shape[1:]
    assert weight.shape[0] == 27 and x.shape[1] == cin, f"weight {tuple(weight.shape)} for {x.shape[1]} channels"
    x, nmap = x.contiguous(), nmap.contiguous()
    y = torch.empty(n_out, cout, dtype=x.dtype, device=x.device)
    if n_out == 0:
        return y
    cin_p, cout_p = dot_width(cin), dot_width(cout)
    wp = torch.zeros(27, cin_p, cout_p, dtype=x.dtype, device=x.device)
    wp[:, :cin, :cout] = weight.to(x.dtype)
    if mode == "direct":
        ptap = torch.arange(27, dtype=torch.int32, device=x.device)
        child = ptap
    else:
        ptap, child = _tables(x.device)  # once per device
    bm, warps = block or (BLOCK_M, NUM_WARPS)
    _sparse_conv_kernel[(triton.cdiv(n_out, bm),)](
        x,
        nmap,
        ptap,
        child,
        wp,
        wp if bias is None else bias,
        y,
        n_out,
        nmap.shape[0],
        cin,
        cout,
        ROWS_PER_PARENT=1 if mode == "direct" else 8,
        CHILD_ROWS=mode == "derived",
        CIN_P=cin_p,
        COUT_P=cout_p,
        HAS_BIAS=bias is not None,
        BM=bm,
        num_warps=warps,
    )
    return y


def sparse_conv3d(
    x: torch.Tensor,
    nmap: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    mode: str = "direct",
    n_out: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Submanifold 3×3×3 convolution [rows, Cin] → [n_out, Cout] in x's dtype (see module doc for the modes).

    nmap: direct, the [N, 27] map of the output rows; derived and copied, the parents' [M, 27] map (n_out
    defaults to 8M). backend: "auto" (Triton on CUDA for fp16/bf16 when installed, the reference elsewhere),
    "triton" (also on CPU with TRITON_INTERPRET=1) or "reference".
    """
    n_out = _rows_out(mode, nmap, n_out)
    if _use_triton(backend, x):
        return _sparse_conv3d_triton(x, nmap, weight, bias, mode, n_out)
    return sparse_conv3d_reference(x, nmap, weight, bias, mode, n_out)
