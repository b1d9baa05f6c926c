"""Small pieces every SSA kernel module shares: constants, dispatch dtypes, the gated write-out."""
import torch

LOG2E = 1.4426950408889634  # kernels use exp2: exp(x) = exp2(x * log2 e)
HALF = (torch.float16, torch.bfloat16)  # "auto" runs Triton on CUDA for these; fp32 models use the reference


def gated(o: torch.Tensor, dtype: torch.dtype, gate, out):
    """gate[:, None, None] * o (fp32), then written as dtype or added into `out` in place (the references'
    form of the kernels' fused per-branch gating: every branch accumulates into one output)."""
    if gate is not None:
        o = o * gate.float()[:, None, None]
    if out is None:
        return o.to(dtype)
    out.copy_((out.float() + o).to(out.dtype))
    return out
