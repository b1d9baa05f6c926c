"""Benchmark: the fused norm kernels against the PyTorch ops they replace, same inputs, same run.

    python bench/bench_norms.py            # GPU; writes bench/results/norms.md

* `kernels/group_norm.py` (refiner UNets): GroupNorm(4 groups, fp32 statistics) + SiLU on one refiner cube's
  activations, [1, C, P, P, P] fp16 at the official cube edges (192 for the 512 refiner, 256 for the 1024 one).
* `kernels/layer_norm.py` (sparse DiT blocks): residual add + fp32 LayerNorm + adaLN modulation on
  [N, 1024] fp16 for the 1024 stage's 109k tokens, the three forms a block uses.

Reports the median time (triton.testing.do_bench) and the peak extra memory of each, and the max difference.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch
import triton

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kernels import group_norm as GN  # noqa: E402
from kernels import layer_norm as LN  # noqa: E402

MiB = 2**20


def measure(fn):
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / MiB
    del out
    return triton.testing.do_bench(fn, warmup=10, rep=100), extra


def main():
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for C, P in [(8, 192), (8, 256), (40, 256), (32, 128), (512, 32)]:
        x = torch.randn(1, C, P, P, P, device=dev, generator=g).half()
        w, b = torch.randn(C, device=dev, generator=g), torch.randn(C, device=dev, generator=g)
        ours = measure(lambda: GN.group_norm_silu(x, w, b, 4))
        ref = measure(lambda: GN.group_norm_silu_reference(x, w, b, 4))
        diff = (GN.group_norm_silu(x, w, b, 4).float() - GN.group_norm_silu_reference(x, w, b, 4).float()).abs().max()
        rows.append((f"GroupNorm+SiLU [1, {C}, {P}³]", ours, ref, diff.item()))
        del x
    N, C = 108862, 1024
    x = torch.randn(N, C, device=dev, generator=g).half()
    r = torch.randn(N, C, device=dev, generator=g).half()
    mod = (0.3 * torch.randn(1, 6 * C, device=dev, generator=g)).half()
    sh, sc, gate = mod[:, :C], mod[:, C : 2 * C], mod[:, 2 * C : 3 * C]
    w, bias = torch.randn(C, device=dev, generator=g), torch.randn(C, device=dev, generator=g)
    forms = {
        "norm1(x)·(1+sc)+sh": dict(scale=None, shift=sh),
        "x + attn·g; norm2 (affine)": dict(residual=r, gate=gate, weight=w, bias=bias),
        "x + cross; norm3·(1+sc)+sh": dict(residual=r, scale=None, shift=sh),
    }
    for name, kw in forms.items():
        if "shift" in kw:
            kw["scale"] = 1 + sc
        ours = measure(lambda: LN.add_layer_norm(x, **kw, eps=1e-6))
        ref = measure(lambda: LN.add_layer_norm_reference(x, **kw, eps=1e-6))
        a, b_ = LN.add_layer_norm(x, **kw, eps=1e-6), LN.add_layer_norm_reference(x, **kw, eps=1e-6)
        diff = max((a[0].float() - b_[0].float()).abs().max().item(), (a[1].float() - b_[1].float()).abs().max().item())
        rows.append((f"{name} [{N}, {C}]", ours, ref, diff))
    lines = [
        f"# Fused norm kernels vs the PyTorch ops they replace ({datetime.date.today().isoformat()})",
        "",
        f"- GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, Triton {triton.__version__}",
        "- command: `python bench/bench_norms.py`",
        "",
        "| op | ours ms | PyTorch ms | speed-up | ours extra MiB | PyTorch extra MiB | max abs diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (t, m), (tr, mr), d in rows:
        lines.append(f"| {name} | {t:.3f} | {tr:.3f} | {tr / t:.1f}× | {m:.0f} | {mr:.0f} | {d:.3g} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (REPO / "bench" / "results" / "norms.md").write_text(text)


if __name__ == "__main__":
    main()
