"""Small pieces every SSA kernel module shares: constants, dispatch dtypes, the gated write-out."""
import inspect

import torch
import triton

LOG2E = 1.4426950408889634  # kernels use exp2: exp(x) = exp2(x * log2 e)
HALF = (torch.float16, torch.bfloat16)  # "auto" runs Triton on CUDA for these; fp32 models use the reference


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


# keep autotuning results in Triton's on-disk cache where this Triton can (3.3+), so a new process skips the
# benchmarking (the first sparse sampling of a process otherwise spends seconds on it)
AUTOTUNE_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
