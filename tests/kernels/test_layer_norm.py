"""Residual add + LayerNorm + modulation (kernels/layer_norm.py) against its reference (the DiT block's ops).

Tolerance: the residual add and the modulation round exactly as the reference (same fp32 op, same rounding),
so x' must be bitwise equal; y differs only through the statistics' summation order, which can move an
element to the neighbouring fp16 value before the modulation multiplies it: max-abs 4e-2 at |y| up to ~10
(a few fp16 ulps there), rel-RMS 2e-3.
"""

import zlib

import pytest
import torch

from kernels import layer_norm as K
from tests.kernels.ssa_cases import assert_close, poisoned_outputs

VARIANTS = {  # which optional inputs a call gets: the three uses in SparseDiTBlock, plus the bare norm
    "norm1+mod": dict(res=False, gate=False, affine=False, mod=True),
    "gate_add+norm2": dict(res=True, gate=True, affine=True, mod=False),
    "add+norm3+mod": dict(res=True, gate=False, affine=False, mod=True),
    "bare": dict(res=False, gate=False, affine=False, mod=False),
}


def _inputs(n, c, b, variant, device, seed, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    v = VARIANTS[variant]

    def rnd(*shape, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*shape, generator=g)).to(dtype).to(device)

    kw = dict(
        residual=rnd(n, c) if v["res"] else None,
        gate=rnd(b, c, scale=0.5) if v["gate"] else None,
        weight=(1 + 0.2 * torch.randn(c, generator=g)).to(device) if v["affine"] else None,
        bias=(0.1 * torch.randn(c, generator=g)).to(device) if v["affine"] else None,
        scale=rnd(b, c, scale=0.3, shift=1.0) if v["mod"] else None,
        shift=rnd(b, c, scale=0.3) if v["mod"] else None,
    )
    rb = None
    if b > 1:
        rb = torch.randint(0, b, (n,), generator=g).to(device)
    return rnd(n, c, scale=2.0, shift=0.5), kw, rb


def _check(n, c, b, variant, device, monkeypatch, eps=1e-6):
    seed = zlib.crc32(f"{n},{c},{b},{variant}".encode())
    x, kw, rb = _inputs(n, c, b, variant, device, seed)
    x0 = x.clone()
    with poisoned_outputs(monkeypatch):
        xo, y = K.add_layer_norm(x, **kw, row_batch=rb, eps=eps, backend="triton")
    xr, yr = K.add_layer_norm_reference(x0, **kw, row_batch=rb, eps=eps)
    assert torch.equal(x, x0), "the input was modified"
    assert xo.shape == x.shape and y.shape == x.shape and y.dtype == x.dtype
    bad = (xo != xr).nonzero()
    assert bad.numel() == 0, (
        f"{variant}: residual sum differs at {bad.shape[0]} elements, first {bad[0].tolist()}: "
        f"{xo[tuple(bad[0])].item()} vs {xr[tuple(bad[0])].item()}"
    )
    assert_close(y, yr, 2e-3, 4e-2, f"{variant} n={n} c={c} b={b}")


@pytest.mark.triton
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("n,c,b", [(37, 64, 1), (5, 96, 1), (19, 48, 3), (1, 32, 1), (1, 32, 2)])
def test_matches_reference(n, c, b, variant, monkeypatch):
    _check(n, c, b, variant, "cpu", monkeypatch)


@pytest.mark.triton
@pytest.mark.parametrize("n", [1, 23])
def test_broadcast_residual_row(n, monkeypatch):
    """One residual row for every token (stride 0), as the cross attention of a zero condition returns it:
    the same outputs as that row written out n times."""
    g = torch.Generator().manual_seed(100 + n)
    x = torch.randn(n, 48, generator=g).half()
    row = torch.randn(1, 48, generator=g).half()
    kw = dict(
        scale=(1 + 0.2 * torch.randn(1, 48, generator=g)).half(), shift=(0.1 * torch.randn(1, 48, generator=g)).half()
    )
    with poisoned_outputs(monkeypatch):
        xo, y = K.add_layer_norm(x, row.expand(n, 48), **kw, backend="triton")
        xw, yw = K.add_layer_norm(x, row.repeat(n, 1), **kw, backend="triton")
    assert torch.equal(xo, xw) and torch.equal(y, yw)
    xr, yr = K.add_layer_norm_reference(x, row.expand(n, 48), **kw)
    assert torch.equal(xo, xr)
    assert_close(y, yr, 2e-3, 4e-2, f"broadcast residual n={n}")


@pytest.mark.triton
def test_empty_rows():
    x = torch.zeros(0, 64, dtype=torch.float16)
    xo, y = K.add_layer_norm(x, residual=x.clone(), backend="triton")
    assert xo.shape == (0, 64) and y.shape == (0, 64)


@pytest.mark.triton
def test_no_residual_returns_input():
    x = torch.randn(4, 32).half()
    xo, _ = K.add_layer_norm(x, backend="triton")
    assert xo is x


def test_reference_is_the_block_ops():
    # the reference restates SparseDiTBlock's expressions: LayerNorm32 (fp32, cast back), then * (1 + sc) + sh
    from s2core.dense_dit import LayerNorm32

    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 64, generator=g).half()
    sc, sh = (0.1 * torch.randn(1, 64, generator=g)).half(), (0.1 * torch.randn(1, 64, generator=g)).half()
    norm = LayerNorm32(64, elementwise_affine=False, eps=1e-6)
    want = norm(x) * (1 + sc) + sh
    _, got = K.add_layer_norm_reference(x, scale=1 + sc, shift=sh, eps=1e-6)
    assert torch.equal(got, want)


@pytest.mark.triton
@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gpu_matches_reference(variant, monkeypatch):
    for n, c, b in [(20011, 1024, 1), (3001, 1024, 2), (7, 768, 1), (1, 1024, 1)]:
        _check(n, c, b, variant, "cuda", monkeypatch)
