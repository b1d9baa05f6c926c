"""The adaptive-filter step (kernels/adaptive_filter.py) against the refiner's original 27-pass loop.

Tolerance: none. The reference is the original loop's body and the kernel performs the same roundings in the
same order (module doc), so every comparison is bitwise (`torch.equal` on the bit patterns, which also tells
-0 from +0 and NaN from NaN).

bf16 runs the kernel only on the GPU for the bitwise check: Triton's CPU interpreter rounds fp32 -> bf16 toward
zero (the GPU rounds to nearest even), so under the interpreter bf16 is checked against the same operation
sequence rounded toward zero instead.
"""

import zlib

import pytest
import torch
import torch.nn.functional as F

from kernels import adaptive_filter as K
from tests.kernels.ssa_cases import poisoned_outputs

SHAPES = [  # [B, C, P0, P1, P2]: ragged cubes, one voxel, channel counts below, at and above a channel block (8)
    (1, 3, 5, 7, 9),
    (2, 1, 1, 1, 1),
    (1, 8, 16, 12, 10),
    (2, 9, 4, 6, 5),
    (1, 1, 2, 31, 3),
    (3, 2, 7, 1, 4),
]
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def _id(shape):
    return "B{}-C{}-P{}x{}x{}".format(*shape)


def old_loop(x, w):
    """The refiner's filter step as it was before the kernel (and as the original writes it): the oracle."""
    P0, P1, P2 = x.shape[-3:]
    xp = F.pad(x, (1, 1, 1, 1, 1, 1))
    out = torch.zeros_like(x)
    for t in range(27):
        a, b, c = t // 9, t // 3 % 3, t % 3
        out = out + xp[:, :, a : a + P0, b : b + P1, c : c + P2] * w[:, t : t + 1]
    return out


def _inputs(shape, dtype, seed, device="cpu"):
    """x spread over several binades (so that sums round) and L1-normalised weights of both signs, as the head's."""
    g = torch.Generator().manual_seed(seed)
    B, C, *P = shape
    x = 4.0 * torch.randn(shape, generator=g) * torch.rand(shape, generator=g).pow(3)
    w = F.normalize(torch.randn(B, 27, *P, generator=g), p=1, dim=1)
    return x.to(dtype).to(device), w.to(dtype).to(device)


def assert_bitwise(out, ref, what=""):
    assert out.shape == ref.shape and out.dtype == ref.dtype, what
    same = out.view(BITS[out.dtype]) == ref.view(BITS[ref.dtype])
    if not same.all():
        bad = (~same).sum().item()
        diff = (out.float() - ref.float()).abs().nan_to_num(float("inf")).max().item()
        raise AssertionError(f"{what}: {bad} of {out.numel()} elements differ (max abs {diff:.3g})")


def _rtz_bf16(v):
    """fp32 -> bf16 rounded toward zero, the interpreter's conversion."""
    return (v.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _step_rounded_toward_zero(x, w):
    # the kernel's sequence of roundings (module doc) with bf16 rounding toward zero
    P0, P1, P2 = x.shape[-3:]
    xp = F.pad(x, (1, 1, 1, 1, 1, 1)).float()
    acc = torch.zeros_like(x)
    for t in range(27):
        a, b, c = t // 9, t // 3 % 3, t % 3
        p = _rtz_bf16(xp[:, :, a : a + P0, b : b + P1, c : c + P2] * w[:, t : t + 1].float())
        acc = _rtz_bf16(acc.float() + p.float())
    return acc


# ------------------------------------------------------------------------------------------------
# The reference (the refiner's path on CPU and without Triton)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_reference_is_the_old_loop(shape, dtype):
    x, w = _inputs(shape, dtype, zlib.crc32(f"ref{shape}{dtype}".encode()))
    assert_bitwise(K.adaptive_filter_reference(x, w), old_loop(x, w), f"{shape} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_emulation_is_the_old_loop(dtype):
    # the semantics the kernel implements: each product and each sum computed in fp32 and rounded to dtype
    x, w = _inputs((2, 5, 9, 8, 7), dtype, 21)
    P0, P1, P2 = x.shape[-3:]
    xp = F.pad(x, (1, 1, 1, 1, 1, 1))
    acc = torch.zeros_like(x)
    for t in range(27):
        a, b, c = t // 9, t // 3 % 3, t % 3
        p = (xp[:, :, a : a + P0, b : b + P1, c : c + P2].float() * w[:, t : t + 1].float()).to(dtype)
        acc = (acc.float() + p.float()).to(dtype)
    assert_bitwise(acc, old_loop(x, w), str(dtype))


def test_auto_uses_reference_off_gpu():
    x, w = _inputs((1, 8, 5, 4, 3), torch.float16, 3)
    assert_bitwise(K.adaptive_filter_step(x, w), old_loop(x, w), "auto on CPU")


def test_refiner_filter_is_three_steps():
    from s2core.refiner import adaptive_filter

    x, _ = _inputs((1, 4, 6, 5, 7), torch.float32, 8)
    head = torch.nn.Conv3d(4, 27, 3, padding=1, bias=False)
    with torch.no_grad():
        w = F.normalize(head(x), p=1, dim=1)
        want = old_loop(old_loop(old_loop(x, w), w), w)
        assert_bitwise(adaptive_filter(x, head), want, "adaptive_filter")


# ------------------------------------------------------------------------------------------------
# The Triton kernel in the interpreter (CPU tensors, TRITON_INTERPRET=1)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_kernel_matches_reference(shape, dtype, monkeypatch):
    x, w = _inputs(shape, dtype, zlib.crc32(f"kernel{shape}{dtype}".encode()))
    with poisoned_outputs(monkeypatch):
        out = K.adaptive_filter_step(x, w, backend="triton")
    assert_bitwise(out, K.adaptive_filter_reference(x, w), f"{shape} {dtype}")


@pytest.mark.triton
def test_kernel_tiles_and_channel_blocks(monkeypatch):
    # tile 512 = 8 channels x 64 voxels: 10 voxel tiles of the 630 (the last partial), channel blocks 8 + 3
    x, w = _inputs((2, 11, 10, 9, 7), torch.float16, 5)
    with poisoned_outputs(monkeypatch):
        out = K._adaptive_filter_triton(x, w, tile=512)
    assert_bitwise(out, K.adaptive_filter_reference(x, w), "small tiles")


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's inf·0 in the interpreter
def test_kernel_special_values(monkeypatch):
    # signed zeros, infinities and NaN propagate as in the loop (0·w where padded, -0 + +0, inf - inf)
    x, w = _inputs((1, 2, 4, 3, 5), torch.float16, 13)
    x[0, 0, 0, 0, :2] = torch.tensor([float("inf"), float("nan")])
    x[0, 1] = -0.0
    w[0, 5, 1, 1, 1] = float("-inf")
    with poisoned_outputs(monkeypatch):
        out = K.adaptive_filter_step(x, w, backend="triton")
    assert_bitwise(out, old_loop(x, w), "special values")


@pytest.mark.triton
def test_kernel_bf16_operation_order():
    x, w = _inputs((1, 3, 5, 7, 9), torch.bfloat16, 17)
    out = K.adaptive_filter_step(x, w, backend="triton")
    ref = K.adaptive_filter_reference(x, w)
    if not torch.equal(out.view(torch.int16), ref.view(torch.int16)):  # this interpreter rounds toward zero
        assert_bitwise(out, _step_rounded_toward_zero(x, w), "bf16, rounded toward zero")


@pytest.mark.triton
def test_kernel_empty():
    for shape in [(0, 8, 4, 4, 4), (1, 0, 4, 4, 4), (1, 8, 0, 4, 4)]:
        x, w = _inputs(shape, torch.float16, 1)
        out = K.adaptive_filter_step(x, w, backend="triton")
        assert out.shape == x.shape and out.dtype == x.dtype


# ------------------------------------------------------------------------------------------------
# The GPU: the dispatcher's choice (Triton for fp16/bf16) against the reference run on the same GPU


@pytest.mark.triton
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 8, 64, 64, 64), (1, 1, 33, 40, 17), *SHAPES], ids=_id)
def test_gpu_matches_reference(shape, monkeypatch):
    for dtype in (torch.float16, torch.bfloat16):
        x, w = _inputs(shape, dtype, zlib.crc32(f"gpu{shape}{dtype}".encode()), "cuda")
        with poisoned_outputs(monkeypatch):
            out = K.adaptive_filter_step(x, w)
        assert_bitwise(out, K.adaptive_filter_reference(x, w), f"{shape} {dtype}")
        assert_bitwise(out.cpu(), K.adaptive_filter_reference(x.cpu(), w.cpu()), f"{shape} {dtype} vs CPU")
