"""'Same' 3D convolution (kernels/conv3d.py) against its reference (F.conv3d in fp32, rounded once).

Tolerance: both accumulate in fp32 and round once to fp16; only the summation order differs (the kernel sums
tap by tap on the tensor cores), so an output lands at most an ulp or two away: max-abs 4e-3 at |y| <= 4
(fp16 ulp 2e-3 there), rel-RMS 1e-3.
"""

import zlib

import pytest
import torch
import torch.nn.functional as F

from kernels import conv3d as K
from tests.kernels.ssa_cases import assert_close, poisoned_outputs

CASES = [  # (B, Cin, Cout, D, H, W, k): ragged volumes, partial patches, channel counts below/above 16
    (1, 8, 8, 5, 6, 37, 3),  # W beyond one 32-wide patch, H not a multiple of 4
    (2, 1, 8, 3, 7, 5, 3),  # the sign refiner's input conv (one channel), two samples
    (1, 40, 8, 4, 5, 6, 3),  # the up block's concatenation
    (1, 8, 1, 6, 3, 4, 3),  # the sign refiner's head (one output channel)
    (1, 16, 8, 3, 9, 33, 1),  # a 1x1x1 shortcut
    (1, 8, 8, 1, 1, 1, 3),  # one voxel: every tap but the centre is padding
]


def _inputs(case, seed, device="cpu"):
    B, cin, cout, D, H, W, k = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cin, D, H, W, generator=g).half()
    w = (torch.randn(cout, cin, k, k, k, generator=g) / (cin * k**3) ** 0.5).half()
    b = (0.1 * torch.randn(cout, generator=g)).half()
    return x.to(device), w.to(device), b.to(device)


@pytest.mark.triton
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, bias, monkeypatch):
    x, w, b = _inputs(case, zlib.crc32(f"{case}{bias}".encode()))
    b = b if bias else None
    with poisoned_outputs(monkeypatch):
        y = K.conv3d_same(x, w, b, backend="triton")
    ref = K.conv3d_same_reference(x, w, b)
    assert y.shape == ref.shape == (case[0], case[2], *case[3:6]) and y.dtype == torch.float16
    assert_close(y, ref, 1e-3, 4e-3, f"{case} bias={bias}")


@pytest.mark.triton
@pytest.mark.parametrize("case", [c for c in CASES if c[1] > 1 and c[3] * c[4] * c[5] > 1])
def test_channels_last_matches_reference(case, monkeypatch):
    """A channels-last input (the UNets' layout on CUDA) gives the same values, written channels-last."""
    x, w, b = _inputs(case, zlib.crc32(f"{case}cl".encode()))
    ref = K.conv3d_same_reference(x, w, b)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    with poisoned_outputs(monkeypatch):
        y = K.conv3d_same(x, w, b, backend="triton")
    assert y.shape == ref.shape
    if case[2] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last_3d) and not y.is_contiguous()
    assert_close(y, ref, 1e-3, 4e-3, f"channels-last {case}")


def test_reference_is_the_module():
    """The reference is nn.Conv3d's convolution (fp64 here, where rounding cannot hide a wrong padding)."""
    conv = torch.nn.Conv3d(5, 3, 3, padding=1).double()
    x = torch.randn(2, 5, 4, 6, 3, dtype=torch.float64)
    assert torch.allclose(K.conv3d_same_reference(x, conv.weight, conv.bias), conv(x), atol=1e-12)


@pytest.mark.triton
def test_empty_volume():
    x = torch.zeros(1, 8, 0, 4, 4, dtype=torch.float16)
    y = K.conv3d_same(x, torch.zeros(8, 8, 3, 3, 3, dtype=torch.float16), None, backend="triton")
    assert y.shape == (1, 8, 0, 4, 4)


def test_suits_only_same_convolutions():
    assert K.shape_suits(torch.nn.Conv3d(8, 8, 3, padding=1))
    assert K.shape_suits(torch.nn.Conv3d(40, 8, 1))
    assert not K.shape_suits(torch.nn.Conv3d(8, 8, 2, stride=2))  # the downsampler
    assert not K.shape_suits(torch.nn.Conv3d(8, 8, 3, padding=0))
    assert not K.shape_suits(torch.nn.Conv3d(8, 8, 3, padding=1, padding_mode="replicate"))
    assert not K.shape_suits(torch.nn.Conv3d(128, 128, 3, padding=1))  # wide levels stay with cuDNN
    # on the CPU the module's convolution runs (the kernel is for CUDA; the reference is not bitwise cuDNN's)
    assert not K.suits(torch.nn.Conv3d(8, 8, 3, padding=1), torch.zeros(1, 8, 4, 4, 4, dtype=torch.float16))


@pytest.mark.triton
@pytest.mark.gpu
@pytest.mark.parametrize("case", [(1, 8, 8, 64, 64, 64, 3), (1, 40, 8, 32, 48, 80, 3), (1, 8, 1, 16, 16, 16, 3)])
def test_gpu_matches_cudnn(case):
    """On the GPU against cuDNN's fp16 convolution itself (what the kernel replaces)."""
    x, w, b = _inputs(case, 7, "cuda")
    y = K.conv3d_same(x, w, b)
    ref = F.conv3d(x, w, b, padding=(case[-1] - 1) // 2)
    assert_close(y, ref, 1e-3, 4e-3, f"{case} vs cuDNN")
