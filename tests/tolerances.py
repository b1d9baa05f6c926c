"""Tolerances derived from the arithmetic, for comparisons whose last bits depend on the CPU (docs/TESTING.md).

Two runs of the same network with the same weights and inputs differ only where a kernel's rounding differs:
the summation order of a dot product (BLAS / oneDNN blocking and vector width depend on the instruction set and
the thread count), FMA contraction, and vectorised libm (exp, sin, sqrt may be 1 ulp off, differently per CPU).
Elementwise IEEE operations (+ - * /, casts) are exact-rounded everywhere and never differ.

Model used here: with unit roundoff u of the accumulation dtype, a length-k dot product of terms of random sign
carries a rounding error of about u·sqrt(k/6) of its size whatever the (recursive) order, so two orders differ
by at most about u·sqrt(k) (blocked and pairwise orders do better). Layers add independent errors, which the
normalisations (GroupNorm, LayerNorm) keep at the size of the signal, so `depth` layers give sqrt(depth) times
one layer's; a factor of 4 covers the gains of the layers between (residual sums, SiLU/GELU slopes, softmax).
Outputs rounded to a narrower dtype (fp16 activations) add up to one ulp of that dtype per layer instead.
"""

import math

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}
SAFETY = 4.0


def reorder_rel_rms(
    k: int, depth: int = 1, accumulate: torch.dtype = torch.float32, store: torch.dtype | None = None
) -> float:
    """Bound on rel. RMS between two CPUs' results of `depth` stacked layers whose widest dot product has k terms,
    accumulated in `accumulate`; `store` is the activations' dtype when narrower (fp16: one ulp per layer)."""
    per_layer = UNIT_ROUNDOFF[accumulate] * math.sqrt(k)
    if store is not None:
        per_layer = max(per_layer, UNIT_ROUNDOFF[store])
    return SAFETY * per_layer * math.sqrt(depth)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
