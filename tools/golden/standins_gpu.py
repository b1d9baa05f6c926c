"""Fast stand-ins for `torchsparse` and `flash_attn`, so the ORIGINAL Direct3D-S2 sparse VAE can run (and be
timed) on a GPU machine where neither package is installed (tools only, never imported by s2core).

`tools/golden/harness.py` makes fixtures on CPU with spconv and an exact per-sequence fp32 attention; that
is right for fixtures and far too slow for a 200k-token decode. Here both packages are replaced by thin
adapters over OUR kernels, written for this repo (nothing from torchsparse or flash-attn is copied):

* `torchsparse` -- what the original touches: `SparseTensor(feats, coords, stride=1, spatial_range=None)`
  with `.F/.C/.feats/.coords/.stride/.spatial_range/._caches`; `nn.Conv3d(in, out, kernel_size, stride,
  padding, dilation, bias, transposed)` holding `kernel` [K^3, Cin, Cout] ([Cin, Cout] for 1x1x1) and
  `bias`; `nn.functional.conv3d`; `utils.make_ntuple`. Computed by `s2core.sparse.conv.sparse_conv3d`
  (gather + one fp32-accumulated GEMM); the kernel map is memoised in `_caches`, which conv outputs and
  the original's `replace()` share, as torchsparse's kmap cache is shared.
* `flash_attn` -- `flash_attn_varlen_func`, `flash_attn_varlen_qkvpacked_func`,
  `flash_attn_varlen_kvpacked_func`, `flash_attn_func`, `flash_attn_qkvpacked_func`,
  `flash_attn_kvpacked_func` (`softmax_scale`; GQA: query head h reads kv head h // (H/Hk);
  `return_attn_probs=True` -> `(out, softmax_lse [H, total_q] fp32 natural log, None)`). Computed by
  `s2core.sparse.attention.varlen_attention` (torch SDPA) on sequences grouped in power-of-two length
  buckets (padding wastes < 2x); the lse path is an explicit fp32 softmax per bucket.
* `einops`, `trimesh`, `skimage` -- import-only placeholders where not installed (imported at module level
  by files the VAE decoder does not call into).

Semantics kept (SPARSE.md §2.1): only stride-1, dilation-1 convs with kernel 3 (submanifold: output set =
input set, same order, padding ignored as torchsparse does for odd kernels) or 1 (a matmul); tap
k = (dx+1) + 3(dy+1) + 9(dz+1) with dx on coords column 1. Anything else (strided, transposed, dilated,
causal attention, dropout) raises instead of computing something else.

    import standins_gpu
    standins_gpu.install_standins(upstream)  # before the first `import direct3d_s2...`
    python tools/golden/standins_gpu.py --check --upstream UPSTREAM/Direct3D-S2
        # the original SparseSDFVAE decoder on these stand-ins vs the golden fixtures (spconv + exact attention)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import math
import os
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from s2core.sparse.attention import varlen_attention  # noqa: E402
from s2core.sparse.conv import sparse_conv3d  # noqa: E402
from s2core.sparse.tensor import SparseTensor as OurSparseTensor  # noqa: E402

# name -> one line "what replaces what, and why the math is the same" (copied into results files)
STAND_INS = {
    "torchsparse": "torchsparse replaced by tools/golden/standins_gpu.py: SparseTensor/Conv3d/conv3d adapters over "
    "s2core.sparse.conv.sparse_conv3d (stride-1 submanifold 3x3x3 or 1x1x1, official kernel layout "
    "[27,Cin,Cout]/[Cin,Cout], tap k=(dx+1)+3(dy+1)+9(dz+1), one fp32-accumulated GEMM as "
    "torchsparse's implicit GEMM; kernel map memoised per coordinate set like torchsparse's kmap "
    "cache); differs from torchsparse only in summation order. Memory: the [N,27] int32 kernel map "
    "is the size of torchsparse's out_in_map; the gathered [rows, 27*Cin] block (<= 128 MiB) is an "
    "extra transient that torchsparse's implicit GEMM does not allocate",
    "flash_attn": "flash_attn replaced by tools/golden/standins_gpu.py: varlen/packed/batched entry points on "
    "s2core.sparse.attention.varlen_attention (torch SDPA) over power-of-two length buckets "
    "(padding < 2x, masked keys); same softmax(QK^T*scale)V, different kernel and summation order. "
    "Memory: the padded q/k/v/out copies (< 2x the packed ones) are transients flash-attn does not "
    "allocate, so the original's peak in the transformer trunk may read high by that much. "
    "return_attn_probs=True (SSA's compressed attention, which needs softmax_lse): on CUDA PyTorch's "
    "own FlashAttention-2 varlen kernel (aten._flash_attention_forward; GQA natively or by repeating "
    "the kv heads), checked once against an explicit fp32 softmax; otherwise an explicit "
    "fp32 softmax in query chunks of <= 256 MiB of logits",
}

# Read by the original at import time: default torchsparse conv backend, flash_attn sparse attention.
ENV = {"SPARSE_BACKEND": "torchsparse", "SPARSE_ATTN_BACKEND": "flash_attn"}


def _module(name: str, doc: str) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__doc__ = doc
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)  # importlib.util.find_spec needs one
    m.__version__ = "0.0-standin"
    return m


# ---------------------------------------------------------------------------------------------
# torchsparse


def make_ntuple(x, ndim: int) -> tuple:
    """An int -> (x,) * ndim; a sequence of length ndim -> tuple(x)."""
    if isinstance(x, int):
        return (x,) * ndim
    x = tuple(x)
    assert len(x) == ndim, f"expected {ndim} values, got {len(x)}"
    return x


class TSSparseTensor:
    """torchsparse.SparseTensor as the original uses it: feats [N, *C], coords [N, 4] int (b, x, y, z)."""

    def __init__(self, feats: torch.Tensor, coords: torch.Tensor, stride=1, spatial_range=None):
        self.feats = feats
        self.coords = coords
        self.stride = make_ntuple(stride, 3)
        self.spatial_range = spatial_range
        self._caches = {}  # shared by conv outputs and replace() copies with the same coordinates

    @property
    def F(self) -> torch.Tensor:
        return self.feats

    @F.setter
    def F(self, value: torch.Tensor) -> None:
        self.feats = value

    @property
    def C(self) -> torch.Tensor:
        return self.coords

    @C.setter
    def C(self, value: torch.Tensor) -> None:
        self.coords = value

    def dense(self):
        raise NotImplementedError("The torchsparse stand-in has no dense(); the sparse VAE decoder never calls it.")


def _as_ours(x: TSSparseTensor) -> OurSparseTensor:
    """Our SparseTensor over the same feats/coords whose cache (kernel map) lives in x._caches."""
    cache = x._caches.setdefault("s2core", {})
    offsets = cache.get("offsets")
    if offsets is None:  # once per coordinate set (one host sync, like torchsparse's kmap build)
        b = int(x.coords[:, 0].max().item()) + 1 if x.coords.shape[0] else 1
        offsets = torch.zeros(b + 1, dtype=torch.int64, device=x.coords.device)
        offsets[1:] = torch.cumsum(torch.bincount(x.coords[:, 0].long(), minlength=b), 0)
        cache["offsets"] = offsets
    return OurSparseTensor(x.feats, x.coords, offsets.numel() - 1, offsets, cache)


def ts_conv3d(
    input: TSSparseTensor,
    weight: torch.Tensor,
    kernel_size,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    transposed: bool = False,
    generative: bool = False,
    config=None,
    training: bool = False,
) -> TSSparseTensor:
    """torchsparse.nn.functional.conv3d for the stride-1 submanifold case (the only one the models use)."""
    ks, st, dil = make_ntuple(kernel_size, 3), make_ntuple(stride, 3), make_ntuple(dilation, 3)
    if transposed or generative or st != (1, 1, 1) or dil != (1, 1, 1) or ks not in ((1, 1, 1), (3, 3, 3)):
        raise NotImplementedError(
            f"The torchsparse stand-in only does stride-1 submanifold 3x3x3 and 1x1x1 convs, got kernel {ks}, "
            f"stride {st}, dilation {dil}, transposed={transposed}, generative={generative}."
        )
    feats = input.feats
    assert feats.dim() == 2, f"sparse conv feats must be [N, Cin], got {tuple(feats.shape)}"
    out_feats = sparse_conv3d(_as_ours(input), weight, bias)
    out = TSSparseTensor(out_feats, input.coords, input.stride, input.spatial_range)
    out._caches = input._caches  # same coordinates -> same kernel map, as torchsparse shares its caches
    return out


class TSConv3d(nn.Module):
    """torchsparse.nn.Conv3d: parameters `kernel` [K^3, Cin, Cout] ([Cin, Cout] when K^3 == 1 and stride 1)
    and `bias` [Cout]; forward = ts_conv3d."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size=3,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = False,
        transposed: bool = False,
        generative: bool = False,
        config=None,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = make_ntuple(kernel_size, 3)
        self.stride = make_ntuple(stride, 3)
        self.dilation = dilation
        self.padding = padding
        self.transposed, self.generative, self.config = transposed, generative, config
        self.kernel_volume = math.prod(self.kernel_size)
        shape = (
            (self.kernel_volume, in_channels, out_channels)
            if self.kernel_volume > 1 or self.stride != (1, 1, 1)
            else (in_channels, out_channels)
        )
        self.kernel = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        bound = 1.0 / math.sqrt((out_channels if transposed else in_channels) * self.kernel_volume)
        nn.init.uniform_(self.kernel, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: TSSparseTensor) -> TSSparseTensor:
        return ts_conv3d(
            input,
            self.kernel,
            self.kernel_size,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.transposed,
            self.generative,
            self.config,
            self.training,
        )


def make_torchsparse() -> dict[str, types.ModuleType]:
    """The stand-in package as {module name: module} (nothing is installed)."""
    ts = _module("torchsparse", "Stand-in for torchsparse (tools/golden/standins_gpu.py).")
    ts_nn = _module("torchsparse.nn", "Stand-in torchsparse.nn")
    ts_fn = _module("torchsparse.nn.functional", "Stand-in torchsparse.nn.functional")
    ts_utils = _module("torchsparse.utils", "Stand-in torchsparse.utils")
    ts.__path__ = []  # a package, so `import torchsparse.nn` resolves through sys.modules
    ts_nn.__path__ = []
    ts.SparseTensor = TSSparseTensor
    ts_nn.Conv3d = TSConv3d
    ts_fn.conv3d = ts_conv3d
    ts_utils.make_ntuple = make_ntuple
    ts.nn, ts.utils, ts_nn.functional = ts_nn, ts_utils, ts_fn
    return {m.__name__: m for m in (ts, ts_nn, ts_fn, ts_utils)}


def install_torchsparse_standin() -> types.ModuleType:
    """Put the torchsparse stand-in into sys.modules (before the original is imported); returns it."""
    mods = make_torchsparse()
    sys.modules.update(mods)
    return mods["torchsparse"]


# ---------------------------------------------------------------------------------------------
# flash_attn


def _bucket_rows(cu: torch.Tensor, seqs: torch.Tensor, lens: list[int]):
    """Rows (into the packed tensor) of the sequences `seqs`, concatenated, and their cu_seqlens."""
    lens_t = torch.tensor(lens, dtype=torch.int64, device=cu.device)
    new_cu = torch.zeros(len(lens) + 1, dtype=torch.int64, device=cu.device)
    new_cu[1:] = torch.cumsum(lens_t, 0)
    total = sum(lens)
    local = torch.repeat_interleave(torch.arange(len(lens), device=cu.device), lens_t, output_size=total)
    rows = cu[:-1].long()[seqs][local] + torch.arange(total, device=cu.device) - new_cu[:-1][local]
    return rows, new_cu, local


def _explicit_lse(q, k, v, cu_q, cu_k, lq, lk, scale):
    """Padded fp32 softmax attention of one bucket: -> (out [Nq, H, D] q.dtype, lse [H, Nq] fp32)."""
    h, d = q.shape[1], q.shape[2]
    s = len(lq)
    mq, mk = max(lq), max(lk) if lk else 0
    rq, cuq, sq = _bucket_rows(cu_q, torch.arange(s, device=q.device), lq)
    pq = torch.arange(rq.numel(), device=q.device) - cuq[:-1][sq]
    qp = q.new_zeros(s, max(mq, 1), h, d, dtype=torch.float32)
    qp[sq, pq] = q[rq].float()
    if mk == 0:
        return torch.zeros_like(q), torch.full((h, q.shape[0]), float("-inf"), device=q.device)
    rk, cuk, sk = _bucket_rows(cu_k, torch.arange(s, device=q.device), lk)
    pk = torch.arange(rk.numel(), device=q.device) - cuk[:-1][sk]
    kk = k[rk].float().repeat_interleave(h // k.shape[1], dim=1)
    vv = v[rk].float().repeat_interleave(h // v.shape[1], dim=1)
    kp = q.new_zeros(s, mk, h, d, dtype=torch.float32)
    vp = q.new_zeros(s, mk, h, d, dtype=torch.float32)
    kp[sk, pk], vp[sk, pk] = kk, vv
    valid = torch.arange(mk, device=q.device)[None, :] < torch.tensor(lk, device=q.device)[:, None]
    logits = torch.einsum("sqhd,skhd->shqk", qp, kp) * scale
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(logits, -1)  # [S, H, Lq]
    p = torch.nan_to_num(torch.exp(logits - lse[..., None]))  # a sequence without keys -> zeros
    out = torch.einsum("shqk,skhd->sqhd", p, vp)
    return out[sq, pq].to(q.dtype), lse[sq, :, pq].transpose(0, 1).contiguous()


LSE_CHUNK_BYTES = 256 << 20  # fp32 logits per query chunk of the explicit softmax_lse path


def _explicit_lse_chunked(q, k, v, cu_q, cu_k, lq, lk, scale):
    """_explicit_lse with each sequence's queries in chunks whose fp32 logits stay under LSE_CHUNK_BYTES (SSA's
    compressed attention has all N tokens as queries: unchunked, 100k queries x 3k keys x 32 heads is 40 GB)."""
    h = q.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(h, q.shape[0], dtype=torch.float32, device=q.device)
    starts_q, starts_k = cu_q[:-1].tolist(), cu_k[:-1].tolist()
    for sq, sk, nq, nk in zip(starts_q, starts_k, lq, lk):  # host loop over sequences and query chunks
        step = max(1, LSE_CHUNK_BYTES // max(1, 4 * h * max(nk, 1)))
        kk, vv = k[sk : sk + nk], v[sk : sk + nk]
        cuk = torch.tensor([0, nk], device=q.device)
        for a in range(0, nq, step):
            b = min(nq, a + step)
            o, l_ = _explicit_lse(
                q[sq + a : sq + b], kk, vv, torch.tensor([0, b - a], device=q.device), cuk, [b - a], [nk], scale
            )
            out[sq + a : sq + b], lse[:, sq + a : sq + b] = o, l_
    return out, lse


# Opt-in (bench/e2e_original.py): every CUDA fp16/bf16 varlen call, not only the lse path, on PyTorch's own
# FlashAttention-2 varlen kernel (once checked), i.e. the kernel flash-attn 2 itself ships. Off by default, so
# bench_sparse_vae.py's numbers keep their meaning.
PREFER_TORCH_FLASH = False
TORCH_FLASH_NOTE = (
    "flash_attn stand-in with PREFER_TORCH_FLASH: every CUDA fp16 call (varlen, packed, batched) "
    "runs PyTorch's FlashAttention-2 varlen forward (aten._flash_attention_forward, the flash-attn 2 "
    "kernel vendored in PyTorch; GQA natively, or by repeating the kv heads if that raises), checked "
    "once against an explicit fp32 softmax; only if that check fails, the SDPA buckets / chunked "
    "explicit softmax above"
)
_FAST_LSE: dict[str, bool] = {}  # "ok": torch's flash varlen kernel checked against the explicit path once


def _torch_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """PyTorch's own FlashAttention-2 varlen forward (CUDA, fp16/bf16): (out [Nq, H, D], lse [H, Nq] fp32)."""
    h = q.shape[1]

    def run(k, v):
        return torch.ops.aten._flash_attention_forward(
            q,
            k.contiguous(),
            v.contiguous(),
            cu_q.int(),
            cu_k.int(),
            int(max_q),
            int(max_k),
            0.0,
            False,
            False,
            scale=scale,
        )[:2]

    if k.shape[1] == h:
        out, lse = run(k, v)
    else:  # GQA: query head h reads kv head h // (H / Hk); flash-attn 2 does that natively, else repeat the kv heads
        try:
            if not _FAST_LSE.get("native_gqa", True):
                raise RuntimeError("native GQA unavailable")
            out, lse = run(k, v)
        except RuntimeError:
            _FAST_LSE["native_gqa"] = False
            out, lse = run(k.repeat_interleave(h // k.shape[1], 1), v.repeat_interleave(h // v.shape[1], 1))
    if lse.dim() == 3:  # [B, H, max_q] (older flash-attn layout) -> [H, Nq]
        lens = (cu_q[1:] - cu_q[:-1]).long()
        seq = torch.repeat_interleave(torch.arange(len(lens), device=q.device), lens, output_size=q.shape[0])
        pos = torch.arange(q.shape[0], device=q.device) - cu_q[:-1].long()[seq]
        lse = lse[seq, :, pos].transpose(0, 1)
    if lse.shape != (h, q.shape[0]):
        raise RuntimeError(f"unexpected softmax_lse shape {tuple(lse.shape)}")
    return out, lse.float().contiguous()


def _fast_lse_ok(q, k, v, cu_q, cu_k, max_q, max_k, scale) -> bool:
    """Use torch's flash varlen kernel if it runs and agrees with the explicit fp32 path on the first sequence's
    first 256 queries (checked once per process for equal and for grouped kv heads; else the fallback paths)."""
    key = "ok" if k.shape[1] == q.shape[1] else "ok_gqa"  # checked separately: plain and grouped kv heads
    if key not in _FAST_LSE:
        try:
            m, nk = min(256, int(cu_q[1] - cu_q[0])), int(cu_k[1] - cu_k[0])
            q0, k0, v0 = q[:m], k[int(cu_k[0]) : int(cu_k[0]) + nk], v[int(cu_k[0]) : int(cu_k[0]) + nk]
            cq, ck = torch.tensor([0, m], device=q.device), torch.tensor([0, nk], device=q.device)
            o1, l1 = _torch_flash_varlen(q0, k0, v0, cq, ck, m, nk, scale)
            o2, l2 = _explicit_lse(q0, k0, v0, cq, ck, [m], [nk], scale)
            err = max((o1.float() - o2.float()).abs().max().item(), (l1 - l2).abs().max().item())
            _FAST_LSE[key] = err < 2e-2
            print(
                f"[standins_gpu] flash_attn stand-in ({key}): torch's flash varlen kernel vs explicit fp32: max "
                f"diff {err:.1e} -> {'using it' if _FAST_LSE[key] else 'fallback paths'}",
                flush=True,
            )
        except Exception as e:  # noqa: BLE001 - any failure means: not usable here
            _FAST_LSE[key] = False
            print(
                f"[standins_gpu] flash_attn stand-in ({key}): torch's flash varlen kernel unusable "
                f"({type(e).__name__}: {str(e)[:120]}) -> fallback paths",
                flush=True,
            )
    return _FAST_LSE[key]


def _fa_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q=None,
    max_seqlen_k=None,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    return_attn_probs=False,
    **kw,
):
    """flash_attn_varlen_func: q [Nq, H, D], k/v [Nk, Hk, D] -> out [Nq, H, D] (, lse [H, Nq], None)."""
    if causal or dropout_p:
        raise NotImplementedError(
            "The flash_attn stand-in has no causal mask or dropout; Direct3D-S2 inference uses neither."
        )
    for name in ("window_size", "alibi_slopes"):
        if kw.get(name) not in (None, (-1, -1)):
            raise NotImplementedError(f"The flash_attn stand-in does not support {name}.")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if (
        (return_attn_probs or PREFER_TORCH_FLASH)
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[0]
        and k.shape[0]
    ):
        mq = max_seqlen_q if max_seqlen_q is not None else int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        mk = max_seqlen_k if max_seqlen_k is not None else int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
        if _fast_lse_ok(q, k, v, cu_seqlens_q, cu_seqlens_k, mq, mk, scale):
            out, lse = _torch_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, mq, mk, scale)
            return (out, lse, None) if return_attn_probs else out
    lq_all = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()  # one host sync per call
    lk_all = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    # group sequences by the power of two above their longer side (>= 16): padding < 2x per bucket
    bucket_of = [max(4, math.ceil(math.log2(max(a, b, 1)))) for a, b in zip(lq_all, lk_all)]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device) if return_attn_probs else None
    for b in sorted(set(bucket_of)):
        ids = [i for i, x in enumerate(bucket_of) if x == b]  # host lists: sequences, not tokens
        seqs = torch.tensor(ids, device=q.device)
        lq, lk = [lq_all[i] for i in ids], [lk_all[i] for i in ids]
        if len(ids) == len(lq_all):
            rq, cuq, rk, cuk = None, cu_seqlens_q, None, cu_seqlens_k
            qb, kb, vb = q, k, v
        else:
            rq, cuq, _ = _bucket_rows(cu_seqlens_q, seqs, lq)
            rk, cuk, _ = _bucket_rows(cu_seqlens_k, seqs, lk)
            qb, kb, vb = q[rq], k[rk], v[rk]
        if return_attn_probs:
            ob, lb = _explicit_lse_chunked(qb, kb, vb, cuq, cuk, lq, lk, scale)
        else:
            # pad lengths to a multiple of 8: keeps the mask aligned for SDPA's memory-efficient CUDA kernel
            ob = varlen_attention(qb, kb, vb, cuq, cuk, -(-max(lq) // 8) * 8, -(-max(lk) // 8) * 8, scale)
        if rq is None:
            out = ob
            if return_attn_probs:
                lse = lb
        else:
            out[rq] = ob
            if return_attn_probs:
                lse[:, rq] = lb
    return (out, lse, None) if return_attn_probs else out


def _fa_batched(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, return_attn_probs=False, **kw):
    """flash_attn_func: q [B, Sq, H, D], k/v [B, Sk, Hk, D] -> [B, Sq, H, D] (, lse [B, H, Sq], None)."""
    bsz, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    cu_q = torch.arange(bsz + 1, device=q.device, dtype=torch.int32) * sq
    cu_k = torch.arange(bsz + 1, device=q.device, dtype=torch.int32) * sk
    res = _fa_varlen(
        q.flatten(0, 1),
        k.flatten(0, 1),
        v.flatten(0, 1),
        cu_q,
        cu_k,
        sq,
        sk,
        dropout_p,
        softmax_scale,
        causal,
        return_attn_probs,
        **kw,
    )
    if not return_attn_probs:
        return res.unflatten(0, (bsz, sq))
    return res[0].unflatten(0, (bsz, sq)), res[1].unflatten(1, (bsz, sq)).transpose(0, 1), None


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, *args, **kw):
    """qkv [N, 3, H, D]."""
    return _fa_varlen(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, *args, **kw)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *args, **kw):
    """kv [Nk, 2, Hk, D]."""
    return _fa_varlen(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *args, **kw)


def flash_attn_qkvpacked_func(qkv, *args, **kw):
    """qkv [B, S, 3, H, D]."""
    return _fa_batched(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], *args, **kw)


def flash_attn_kvpacked_func(q, kv, *args, **kw):
    """kv [B, Sk, 2, Hk, D]."""
    return _fa_batched(q, kv[:, :, 0], kv[:, :, 1], *args, **kw)


def make_flash_attn() -> types.ModuleType:
    """The flash_attn stand-in module (nothing is installed)."""
    m = _module("flash_attn", "Stand-in for flash-attn (tools/golden/standins_gpu.py): SDPA on length buckets.")
    m.flash_attn_varlen_func = _fa_varlen
    m.flash_attn_func = _fa_batched
    m.flash_attn_varlen_qkvpacked_func = flash_attn_varlen_qkvpacked_func
    m.flash_attn_varlen_kvpacked_func = flash_attn_varlen_kvpacked_func
    m.flash_attn_qkvpacked_func = flash_attn_qkvpacked_func
    m.flash_attn_kvpacked_func = flash_attn_kvpacked_func
    return m


def install_flash_attn_standin() -> types.ModuleType:
    """Put the flash_attn stand-in into sys.modules (before the original is imported); returns it."""
    sys.modules["flash_attn"] = make_flash_attn()
    return sys.modules["flash_attn"]


# ---------------------------------------------------------------------------------------------
# wiring the original


def _importable(name: str) -> bool:
    if name in sys.modules:
        return True
    try:
        importlib.import_module(name)
        return True
    except Exception:
        return False


def install_standins(upstream: str | Path | None = None, force: bool = False) -> dict[str, str]:
    """Set the original's env vars, put `upstream` on sys.path, and install the stand-ins for whichever of
    torchsparse / flash_attn is not importable (all of them with force=True). Also placeholders for
    trimesh / skimage if missing (ss_vae.py imports them at module level; only decode_mesh's meshing uses
    them). Returns {stand-in: why} for the results file. Call before the first `import direct3d_s2`."""
    if any(n == "direct3d_s2" or n.startswith("direct3d_s2.") for n in sys.modules):
        raise RuntimeError("Install the stand-ins before importing direct3d_s2 (its backends are chosen at import).")
    os.environ.update(ENV)
    if upstream is not None:
        sys.path.insert(0, str(Path(upstream).resolve()))
    used = {}
    if force or not _importable("torchsparse"):
        install_torchsparse_standin()
        used["torchsparse"] = STAND_INS["torchsparse"]
    if force or not _importable("flash_attn"):
        install_flash_attn_standin()
        used["flash_attn"] = STAND_INS["flash_attn"]
    for name, sub in (("trimesh", None), ("skimage", "measure")):
        if not _importable(name):
            m = _module(name, f"Import-only placeholder for {name} (tools/golden/standins_gpu.py).")
            if sub:
                setattr(m, sub, _module(f"{name}.{sub}", "placeholder"))
            sys.modules[name] = m
            used[name] = (
                f"{name} not installed: an import-only placeholder (ss_vae.py imports it; the decoder never calls it)"
            )
    if not _importable("einops"):
        m = _module("einops", "Placeholder for einops (tools/golden/standins_gpu.py).")
        m.rearrange = _rearrange_merge_last
        sys.modules["einops"] = m
        used["einops"] = (
            "einops not installed: rearrange('n h d -> n (h d)') as a reshape (the one pattern the "
            "SSA module, imported by the sparse transformer package, uses; the VAE never calls it)"
        )
    return used


def _rearrange_merge_last(t: torch.Tensor, pattern: str) -> torch.Tensor:
    if pattern.replace(" ", "") != "nhd->n(hd)":
        raise NotImplementedError(f"The einops placeholder only does 'n h d -> n (h d)', got {pattern!r}.")
    return t.reshape(t.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# The whole original pipeline (bench/e2e_original.py): its voxelizer, scheduler and unused imports

UDF_EXT = (
    "udf_ext replaced by tools/golden/standins_gpu.py: compute_valid_udf(vertices, faces, udf, n, dim, "
    "threshold) re-stated in PyTorch (every triangle's lattice box grown by int(threshold)+1, points "
    "(i/(dim-1) - 0.5, ...), distance by s2core.mesh.voxelize.point_triangle_distance with the CUDA "
    "kernel's rules, int(distance * 1e7) written with an atomic-min scatter into the same int32 dim^3 grid). "
    "Same grid, same index set; the original's own dense grids (int32 + float32 + bool at 1024^3) are "
    "allocated by its unchanged mesh2index. Time: windowed torch kernels over ~3 G candidate points "
    "(~4 s at 1024^3 for 1.3 M faces on an H100, bench/results/voxelize.md) where the CUDA extension took "
    "0.2 s (PERF.md), so the original's 'mesh -> 1024 structure' row reads several seconds slow; memory: "
    "each window adds ~1-2 GiB of transients before the original's dense float/bool grids exist"
)


def compute_valid_udf(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    udf: torch.Tensor,
    n_faces: int,
    dim: int,
    threshold: float,
    window: int = 1 << 22,
) -> None:
    """udf_ext.compute_valid_udf in PyTorch: lowers udf[(i * dim + j) * dim + k] (int32, in place) to
    int(d * 1e7) for each lattice point within threshold / dim of a triangle, d its distance."""
    from s2core.mesh.voxelize import point_triangle_distance

    tris = vertices.float()[faces[:n_faces].long()]  # [F, 3 corners, 3]
    grow = int(threshold + 1)
    lo = (torch.floor((tris.amin(1).double() + 0.5) * (dim - 1)).long().clamp_min(0) - grow).clamp(0, dim - 1)
    hi = (torch.floor((tris.amax(1).double() + 0.5) * (dim - 1)).long().clamp_max(dim - 1) + grow).clamp(0, dim - 1)
    extent = (hi - lo + 1).clamp_min(0)
    ends = torch.cumsum(extent.prod(1), 0)
    total = int(ends[-1]) if ends.numel() else 0
    starts = ends - extent.prod(1)
    for first in range(0, total, window):  # windows of candidate points (host loop over windows, not triangles)
        flat = torch.arange(first, min(first + window, total), device=udf.device)
        t = torch.searchsorted(ends, flat, right=True)
        rel = flat - starts[t]
        ey, ez = extent[t, 1], extent[t, 2]
        ijk = torch.stack([rel // (ey * ez), rel // ez % ey, rel % ez], 1) + lo[t]
        tri = tris[t]
        d = point_triangle_distance(ijk.float() / (dim - 1) - 0.5, tri[:, 0], tri[:, 1], tri[:, 2])
        near = d < threshold / dim
        cell = (ijk[near, 0] * dim + ijk[near, 1]) * dim + ijk[near, 2]
        udf.scatter_reduce_(0, cell, (d[near] * 10_000_000).int(), "amin")


def make_udf_ext() -> types.ModuleType:
    m = _module("udf_ext", "Stand-in for the original's CUDA voxelizer (tools/golden/standins_gpu.py).")
    m.compute_valid_udf = compute_valid_udf
    return m


class FlowMatchEulerStandIn:
    """diffusers FlowMatchEulerDiscreteScheduler as the original pipeline drives it (set_timesteps, timesteps,
    step(...).prev_sample), from s2core.flow_sampler.flow_schedule (diffusers' schedule, checked by its tests):
    x <- (x.float() + (sigma_next - sigma) * v).to(v.dtype)."""

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, **_):
        self.num_train_timesteps, self.shift = num_train_timesteps, shift

    def set_timesteps(self, num_inference_steps: int, device=None):
        from s2core.flow_sampler import flow_schedule

        s = flow_schedule(num_inference_steps, self.shift, self.num_train_timesteps)
        self.timesteps, self.sigmas, self._i = s.timesteps.to(device or "cpu"), s.sigmas.to(device or "cpu"), 0

    def step(self, model_output, timestep, sample, **_):
        dt = self.sigmas[self._i + 1] - self.sigmas[self._i]
        self._i += 1
        return types.SimpleNamespace(prev_sample=(sample.float() + dt * model_output).to(model_output.dtype))


class _ImportOnly(types.ModuleType):
    """A module that imports and hands out attributes, each raising if it is ever called."""

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def _unavailable(*a, **k):
            raise RuntimeError(f"{self.__name__}.{attr} is an import-only placeholder (tools/golden/standins_gpu.py)")

        return _unavailable


# imported at module level by direct3d_s2.pipeline / utils (hole filling, background removal, from_pretrained)
PIPELINE_IMPORT_ONLY = ("utils3d", "pymeshfix", "igraph", "pyvista", "omegaconf", "huggingface_hub", "transformers")


def install_pipeline_standins() -> tuple[dict[str, str], type]:
    """What the whole original pipeline needs beyond install_standins(): the udf_ext voxelizer stand-in (always:
    the CUDA extension is not built here), import-only placeholders for packages that are missing, torchvision
    (tools/golden/harness.py shim) and tqdm (pass-through) if missing. Returns ({stand-in: why}, the scheduler
    class: diffusers' FlowMatchEulerDiscreteScheduler if importable, else FlowMatchEulerStandIn). Call after
    install_standins() and before the first `import direct3d_s2`."""
    used = {}
    if not _importable("udf_ext"):
        sys.modules["udf_ext"] = make_udf_ext()
        used["udf_ext"] = UDF_EXT
    for name in PIPELINE_IMPORT_ONLY:
        if not _importable(name):
            m = _ImportOnly(name)
            m.__spec__ = importlib.machinery.ModuleSpec(name, None)
            sys.modules[name] = m
            used[name] = (
                f"{name} not installed: an import-only placeholder (imported at module level by "
                "direct3d_s2 for hole filling / background removal / from_pretrained; never called)"
            )
    if not _importable("torchvision"):
        for n in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[n]
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import harness

        sys.modules.update(harness._make_torchvision())
        used["torchvision"] = (
            "torchvision not importable: tools/golden/harness.py shim (PIL pad/resize/to_tensor "
            "are PIL's own; tensor Resize/CenterCrop/Normalize re-stated)"
        )
    if not _importable("tqdm"):
        m = _module("tqdm", "pass-through")
        m.tqdm = lambda it=None, *a, **k: it
        sys.modules["tqdm"] = m
        used["tqdm"] = "tqdm not installed: a pass-through iterator"
    try:
        from diffusers import FlowMatchEulerDiscreteScheduler as sched
    except Exception:
        sched = FlowMatchEulerStandIn
        used["diffusers"] = (
            "diffusers not importable: FlowMatchEulerDiscreteScheduler stand-in on "
            "s2core.flow_sampler.flow_schedule (same timesteps/sigmas; one Euler update per step, "
            "microseconds either way)"
        )
    return used, sched


def load_original_vae(params: dict, state: dict, device="cpu"):
    """The original SparseSDFVAE(**params) with `state` loaded strictly (official torchsparse names), eval."""
    from direct3d_s2.models.autoencoders.ss_vae import SparseSDFVAE as Original

    model = Original(**params)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# --check: the original decoder on these stand-ins vs the golden fixtures (spconv + exact attention)


def _rel_rms(a, b) -> float:
    return ((a.double() - b.double()).pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt().clamp_min(1e-30)).item()


# Same bounds as tests/test_parity_sparse_vae.py: one fp16 rounding (eps 9.8e-4) of GEMMs summed in another
# order is ~1e-3 relative; a wrong tap/window/chunk bound is orders of magnitude above.
SDF_REL_RMS, FEAT_REL_RMS, SDF_MAX_ABS = 3e-3, 5e-3, 1e-3


def check(upstream: str) -> bool:
    from s2core.testing import golden_state_dict, load_golden

    used = install_standins(upstream, force=True)
    sp = importlib.import_module("direct3d_s2.modules.sparse")
    assert sp.BACKEND == "torchsparse" and sp.ATTN == "flash_attn", (sp.BACKEND, sp.ATTN)
    print("stand-ins:", ", ".join(used))
    ok = True
    for name in ("sparse_vae_512__decode", "sparse_vae_1024__decode_chunked"):
        t, meta = load_golden(REPO / "tests" / "golden" / f"{name}.safetensors")
        model = load_original_vae(meta["config"]["params"], golden_state_dict(meta))
        start = time.perf_counter()
        with torch.no_grad():
            res = model.decode_mesh(sp.SparseTensor(t["in.latent"], t["in.coords"]), return_feat=True, factor=1.0)
        secs = time.perf_counter() - start
        sdf, feat = res if isinstance(res, tuple) else (res, None)
        same = torch.equal(sdf.coords.int(), t["out.coords"].int())
        rel = _rel_rms(sdf.feats, t["out.sdf"]) if same else float("nan")
        mx = (sdf.feats.float() - t["out.sdf"].float()).abs().max().item() if same else float("nan")
        line = (
            f"{name}: {len(t['in.coords'])} latent tokens -> {len(sdf.coords)} voxels in {secs:.1f} s; "
            f"coords identical (same order): {same}; sdf rel RMS {rel:.2e} (bound {SDF_REL_RMS:g}), "
            f"max abs {mx:.2e} (bound {SDF_MAX_ABS:g})"
        )
        good = same and rel < SDF_REL_RMS and mx < SDF_MAX_ABS
        if feat is not None and "mid.feat_rows" in t:
            frel = _rel_rms(feat.feats[t["mid.feat_rows"].long()], t["mid.feat_sub"])
            line += f"; 32-ch features rel RMS {frel:.2e} (bound {FEAT_REL_RMS:g})"
            good = good and frel < FEAT_REL_RMS
        print(("PASS " if good else "FAIL ") + line)
        ok = ok and good
    # negative control: the same comparison must fail when two kernel taps (an x flip) are swapped
    t, meta = load_golden(REPO / "tests" / "golden" / "sparse_vae_512__decode.safetensors")
    model = load_original_vae(meta["config"]["params"], golden_state_dict(meta))
    with torch.no_grad():
        k = model.decoder.upsample[1].act_layers[0].conv.kernel
        k[[12, 14]] = k[[14, 12]]
        sdf, _ = model.decode_mesh(sp.SparseTensor(t["in.latent"], t["in.coords"]), return_feat=True, factor=1.0)
    rel = _rel_rms(sdf.feats, t["out.sdf"])
    good = rel > 10 * SDF_REL_RMS
    print(
        ("PASS " if good else "FAIL ") + f"negative control (taps 12<->14 swapped in decoder.upsample.1): sdf rel "
        f"RMS {rel:.2e} (must exceed {10 * SDF_REL_RMS:g})"
    )
    return ok and good


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--check",
        action="store_true",
        help="run the original decoder on the stand-ins against "
        "the golden fixtures tests/golden/sparse_vae_512__decode, sparse_vae_1024__decode_chunked",
    )
    ap.add_argument("--upstream", default=".scratch", help="folder holding a DreamTechAI/Direct3D-S2 checkout")
    args = ap.parse_args()
    if not args.check:
        ap.print_help()
        return
    if not (Path(args.upstream) / "direct3d_s2").is_dir():
        sys.exit(f"No Direct3D-S2 checkout at {args.upstream} (expected a direct3d_s2/ folder there).")
    sys.exit(0 if check(args.upstream) else 1)


if __name__ == "__main__":
    main()
