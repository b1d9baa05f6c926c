"""Small pieces every kernel module shares: Triton (or its stand-in), the dispatch rule, the shared-memory
limits autotune configs are pruned by, constants, the SSA layout checks and gated write-out, and the SSA
kernels' `@triton.jit` steps (online softmax, normalisation, gated store).

Triton is optional at run time. Windows has no `triton` wheel (ComfyUI portable installs `triton-windows` only
when asked) and CPU-only installs need none: without it every kernel module still imports, its Triton kernels
become stand-ins that refuse to launch, and `use_triton` sends every call to the module's PyTorch reference on
the tensors' own device (CUDA, CPU, MPS), with one log line the first time a CUDA tensor takes that path.
"""

from __future__ import annotations

import functools
import logging

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the references run everywhere
    triton = tl = None

log = logging.getLogger(__name__)

LOG2E = 1.4426950408889634  # kernels use exp2: exp(x) = exp2(x * log2 e)
HALF = (torch.float16, torch.bfloat16)  # "auto" runs Triton on CUDA for these; fp32 models use the reference
HAS_TRITON = triton is not None
NO_TRITON = (
    "Triton is not installed; install it (Linux: `pip install triton`, Windows: `pip install "
    "triton-windows`) or use backend='auto', which runs the PyTorch reference instead"
)


class _NoTriton:
    """Stands in for the `triton` module when it is missing, so that kernel modules import and define their
    kernels: `@triton.jit` and `triton.autotune` give kernels that raise when launched (`kernel[grid](...)`)."""

    class _Kernel:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise RuntimeError(f"{self.fn.__name__}: {NO_TRITON}.")

    class Config:  # same fields as triton.Config, so configs and their pruning work without Triton
        def __init__(self, kwargs, num_warps=4, num_stages=3, **_):
            self.kwargs, self.num_warps, self.num_stages = kwargs, num_warps, num_stages

    def jit(self, fn=None, **_):
        return self._Kernel(fn) if fn is not None else self._Kernel

    def autotune(self, configs, key, **_):
        return lambda kernel: kernel

    @staticmethod
    def cdiv(a: int, b: int) -> int:
        return -(-a // b)

    @staticmethod
    def next_power_of_2(n: int) -> int:
        return 1 << max(n - 1, 0).bit_length()


if triton is None:
    triton = _NoTriton()


@functools.lru_cache(maxsize=1)
def _warn_reference_on_cuda() -> None:
    log.warning(
        "Triton is not installed, so the sparse stages run their PyTorch references on the GPU: several "
        "times slower, same results. For the fast kernels install it (Linux: `pip install triton`, "
        "Windows: `pip install triton-windows`) and restart."
    )


def dot_width(n: int) -> int:
    """n channels padded to a `tl.dot` operand's width: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(n))


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether x [B, C, D, H, W] is stored channels-last (`torch.channels_last_3d`, NDHWC) rather than NCDHW;
    where both describe its memory (one channel, one voxel) this says False and NCDHW code applies."""
    return x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)


def use_triton(backend: str, x: torch.Tensor, dtypes: tuple[torch.dtype, ...] | None = HALF) -> bool:
    """The dispatchers' rule. "triton": the kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1);
    "reference": the reference; "auto": the kernel for CUDA tensors of `dtypes` (None: any) when Triton is
    installed, else the reference (logged once per process when a CUDA tensor falls back)."""
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"backend='triton': {NO_TRITON}.")
        return True
    if backend != "auto" or not x.is_cuda or (dtypes is not None and x.dtype not in dtypes):
        return False
    if not HAS_TRITON:
        _warn_reference_on_cuda()
    return HAS_TRITON


# ------------------------------------------------------------------------------------------------
# Autotune configs are pruned by the running GPU's shared memory per block (opt-in maximum), not by a list
# chosen on one GPU: an H100 gives a block 227 KB, an A100 163 KB, the RTX 30/40/50 cards (sm_86/89/120)
# 99 KB. Each kernel module states its configs' need (`smem` estimates, checked against the compiled
# kernels' own figure for every architecture by bench/archs.py).

SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


@functools.lru_cache(maxsize=None)
def _cuda_smem_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    if not limit:  # older torch: Triton's driver knows it
        limit = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return int(limit)


def smem_limit(device: torch.device) -> int:
    """Shared memory one block may use on `device` (bytes); unbounded off CUDA (the interpreter)."""
    if device.type != "cuda":
        return 1 << 62
    return _cuda_smem_limit(device.index if device.index is not None else torch.cuda.current_device())


def fitting(configs: list, need, limit: int) -> list:
    """The configs whose shared-memory `need(config)` fits `limit`; never empty (the smallest need stays, and
    Triton reports it if even that does not fit)."""
    return [c for c in configs if need(c) <= limit] or [min(configs, key=need)]


def check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Assert the layouts every SSA kernel takes (q [N, HQ, D], k/v [M, H, D], fp16/bf16, last dim contiguous,
    G = HQ / H a power of two, D a power of two >= 16) and return G."""
    hq, d, h = q.shape[1], q.shape[2], k.shape[1]
    assert q.dtype in HALF and k.dtype == q.dtype and v.dtype == q.dtype
    assert hq % h == 0 and (hq // h) & (hq // h - 1) == 0, "G = HQ / H must be a power of two"
    assert d >= 16 and d & (d - 1) == 0, "head dim must be a power of two >= 16"
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1
    return hq // h


def gated(o: torch.Tensor, dtype: torch.dtype, gate, out):
    """gate[:, None, None] * o (fp32), then written as dtype or added into `out` in place (the references'
    form of the kernels' fused per-branch gating: every branch accumulates into one output)."""
    if gate is not None:
        o = o * gate.float()[:, None, None]
    if out is None:
        return o.to(dtype)
    out.copy_((out.float() + o).to(out.dtype))
    return out


# ------------------------------------------------------------------------------------------------
# The SSA kernels' shared steps. Triton inlines a `@triton.jit` function into the kernel that calls it, so these
# compile to the same instructions as a copy in each kernel. Without Triton they are stand-ins like the kernels
# (never called: nothing launches).


@triton.jit
def softmax_step(b_s, b_m, b_l, scale_log2):
    """One online-softmax step over a [ROWS, COLS] tile of raw logits `b_s` = q . k (-inf where masked), given
    the running row max `b_m` of the raw logits and the sum `b_l` [ROWS] -> (max, sum, p = exp2(c (s - max))
    [ROWS, COLS], alpha [ROWS] = exp2(c (old max - max)), the factor that rescales what was accumulated before
    this tile), c = `scale_log2` > 0. Scaling inside the exponent makes it one FMA an element (c max(s) = max(c s)
    for c > 0) instead of a multiply before the max and a subtraction after it."""
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
    # a row masked in every tile so far has max -inf: subtract 0 instead, so that p and alpha are
    # exp2(-inf) = 0 and not exp2(-inf + inf) = NaN, and the row stays empty (sum 0) until a key arrives
    b_mc = tl.where(b_mn == float("-inf"), 0.0, b_mn) * scale_log2
    b_p = tl.exp2(b_s * scale_log2 - b_mc[:, None])
    b_alpha = tl.exp2(b_m * scale_log2 - b_mc)
    return b_mn, b_l * b_alpha + tl.sum(b_p, 1), b_p, b_alpha


@triton.jit
def attend_step(b_s, b_v, b_m, b_l, b_acc, scale_log2):
    """`softmax_step`, then acc = alpha * acc + p @ v ([ROWS, D] fp32; p rounded to v's dtype for tl.dot as the
    flash kernels do) -> (max, sum, acc)."""
    b_m, b_l, b_p, b_alpha = softmax_step(b_s, b_m, b_l, scale_log2)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
    return b_m, b_l, b_acc


@triton.jit
def attend_finish(b_acc, b_l):
    """acc / sum: the softmax-weighted mean of the values; 0 for a row that never saw a key (sum 0)."""
    return b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]


@triton.jit
def load_k_tile(k, rows, m_rows, i_h, stride_n, stride_h, o_d, UPCAST: tl.constexpr):
    """The transposed key tile [HEAD_DIM, BLOCK_K] of key rows `rows` [BLOCK_K] and head `i_h` (0 where `m_rows`
    is false; `m_rows` None: every row exists, a plain load), the left-hand layout of `tl.dot(q, k)`; fp32 when
    UPCAST (the interpreter's tl.dot mishandles bf16, so CPU tests run the same math in fp32 tiles)."""
    p_k = k + rows[None, :].to(tl.int64) * stride_n + i_h * stride_h + o_d[:, None]
    if m_rows is None:  # rows known to exist: a plain load
        b_k = tl.load(p_k)
    else:
        b_k = tl.load(p_k, mask=m_rows[None, :], other=0.0)
    if UPCAST:
        b_k = b_k.to(tl.float32)
    return b_k


@triton.jit
def load_v_tile(v, rows, m_rows, i_h, stride_n, stride_h, o_d, UPCAST: tl.constexpr):
    """The value tile [BLOCK_K, HEAD_DIM] of rows `rows` and head `i_h`, as `load_k_tile` (not transposed)."""
    p_v = v + rows[:, None].to(tl.int64) * stride_n + i_h * stride_h + o_d[None, :]
    if m_rows is None:
        b_v = tl.load(p_v)
    else:
        b_v = tl.load(p_v, mask=m_rows[:, None], other=0.0)
    if UPCAST:
        b_v = b_v.to(tl.float32)
    return b_v


@triton.jit
def store_gated(p_o, b_o, m_o, p_g, HAS_GATE: tl.constexpr, ACCUMULATE: tl.constexpr):
    """Write the fp32 output tile `b_o` [ROWS, D] to the pointers `p_o` (rows masked by `m_o` [ROWS]) in o's
    dtype: times the gate at `p_g` [ROWS] when HAS_GATE, plus what `p_o` holds when ACCUMULATE (the SSA module's
    gated sum of its three branches, fused into each branch's epilogue; `gated` is the references' form)."""
    if HAS_GATE:
        b_o = b_o * tl.load(p_g, mask=m_o, other=0.0).to(tl.float32)[:, None]
    if ACCUMULATE:
        b_o += tl.load(p_o, mask=m_o[:, None], other=0.0).to(tl.float32)
    tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_o[:, None])


# The references' working set: a chunk of queries (or windows) is sized so that its largest fp32 temporary has
# at most this many elements (1 GiB), which keeps the 1024 stage's fallback within its memory target while
# giving each launch enough work on a GPU.
CHUNK_ELEMENTS = 1 << 28


def chunk_rows(per_row: int, budget: int | None = None) -> int:
    """Rows (queries, windows) per chunk when each row needs `per_row` elements of temporaries."""
    return max(1, (CHUNK_ELEMENTS if budget is None else budget) // max(per_row, 1))
