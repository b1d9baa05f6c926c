"""GroupNorm + SiLU (kernels/group_norm.py) against its reference (the refiner UNet's module path).

Tolerance: the kernel and the reference compute the same fp32 normalisation and round it to the output
dtype twice (norm, then SiLU); only the statistics' summation order and exp's last bit differ, so an
element may land one output ulp away: max-abs 2 ulps at |y| <= 8 (fp16 8e-3, bf16 6.3e-2), rel-RMS 1e-3
(fp16) / 8e-3 (bf16).
"""

import zlib

import pytest
import torch

from kernels import group_norm as K
from tests.kernels.ssa_cases import assert_close, poisoned_outputs

TOL = {torch.float16: (1e-3, 8e-3), torch.bfloat16: (8e-3, 6.3e-2)}

CASES = [  # (shape, groups): ragged spatial sizes; one and several stats tiles (4096 elements), last one partial
    ((1, 8, 5, 6, 7), 4),
    ((2, 16, 3, 3, 3), 4),
    ((1, 8, 20, 21, 22), 4),  # 2 x 9240 elements a group: 3 tiles, the last partial
    ((3, 4, 9, 2, 5), 2),
    ((2, 12, 1, 1, 1), 3),  # one voxel (F.group_norm refuses a single value per channel, so B = 2)
]


def _inputs(shape, groups, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = (3.0 + 0.7 * torch.randn(shape, generator=g)).to(dtype)  # mean far from 0: the merge must not cancel
    w = 1.0 + 0.3 * torch.randn(C, generator=g)
    b = 0.2 * torch.randn(C, generator=g)
    return x.to(device), w.to(device), b.to(device)


# bf16 only on the GPU: Triton's CPU interpreter rounds fp32 -> bf16 toward zero (the GPU rounds to nearest)
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16])
@pytest.mark.parametrize("shape,groups", CASES)
def test_matches_reference(shape, groups, dtype, monkeypatch):
    seed = zlib.crc32(f"{shape}{groups}{dtype}".encode())
    x, w, b = _inputs(shape, groups, dtype, "cpu", seed)
    with poisoned_outputs(monkeypatch):
        out = K.group_norm_silu(x, w, b, groups, backend="triton")
    ref = K.group_norm_silu_reference(x, w, b, groups)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, ref, *TOL[dtype], f"{shape} groups {groups}")


CL_CASES = [  # channels-last: C not a power of two (the up blocks' concatenations), tiles of few voxels
    ((1, 40, 5, 6, 7), 4),  # 40 = 32 + 8: groups of 10 channels, padded to 64
    ((2, 8, 9, 10, 11), 4),  # several tiles of 512 voxels, the last partial
    ((1, 160, 3, 4, 5), 4),
    ((2, 12, 3, 1, 2), 3),
]


@pytest.mark.triton
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("shape,groups", CL_CASES)
def test_channels_last_matches_reference(shape, groups, inplace, monkeypatch):
    seed = zlib.crc32(f"{shape}{groups}{inplace}cl".encode())
    x, w, b = _inputs(shape, groups, torch.float16, "cpu", seed)
    ref = K.group_norm_silu_reference(x, w, b, groups)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    assert K.is_channels_last(x)
    with poisoned_outputs(monkeypatch):
        out = K.group_norm_silu(x, w, b, groups, out=x if inplace else None, backend="triton")
    assert out.shape == x.shape and K.is_channels_last(out) and (out is x) == inplace
    assert_close(out, ref, *TOL[torch.float16], f"channels-last {shape} groups {groups}")


@pytest.mark.triton
def test_empty_inputs(monkeypatch):
    w, b = torch.ones(8), torch.zeros(8)
    for shape in [(0, 8, 4, 4, 4), (1, 8, 0, 4, 4)]:
        x = torch.zeros(shape, dtype=torch.float16)
        out = K.group_norm_silu(x, w, b, 4, backend="triton")
        assert out.shape == x.shape and out.dtype == x.dtype


@pytest.mark.triton
def test_one_element_groups_give_silu_of_bias(monkeypatch):
    # a group of one element has variance 0 and centred value 0, so the output is silu(bias) (the
    # reference, F.group_norm, refuses one value per channel, hence a direct check)
    x = torch.tensor([5.0, -7.0], dtype=torch.float16).view(1, 2, 1, 1, 1)
    w, b = torch.tensor([2.0, 3.0]), torch.tensor([0.5, -1.0])
    with poisoned_outputs(monkeypatch):
        out = K.group_norm_silu(x, w, b, 2, backend="triton")
    assert torch.equal(out.flatten(), torch.nn.functional.silu(b.half()))


def test_matches_unet_module_path():
    # the reference is what the refiner's ResnetBlock3D computed before the kernel: GroupNorm module in
    # fp32 on the upcast input, cast back, SiLU in the input dtype
    g = torch.Generator().manual_seed(11)
    norm = torch.nn.GroupNorm(4, 8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=g))
        norm.bias.copy_(torch.randn(8, generator=g))
    x = torch.randn(2, 8, 6, 5, 4, generator=g, dtype=torch.float64)
    module = torch.nn.functional.silu(norm.double()(x))
    assert torch.equal(K.group_norm_silu_reference(x, norm.weight.double(), norm.bias.double(), 4), module)


def test_auto_uses_reference_off_gpu():
    x, w, b = _inputs((1, 8, 3, 3, 3), 4, torch.float32, "cpu", 3)
    assert torch.equal(K.group_norm_silu(x, w, b, 4), K.group_norm_silu_reference(x, w, b, 4))


@pytest.mark.triton
@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape,groups",
    [((1, 8, 64, 64, 64), 4), ((1, 16, 96, 96, 96), 4), ((1, 512, 24, 24, 24), 4), ((2, 32, 33, 17, 40), 4)] + CASES,
)
def test_gpu_matches_reference(shape, groups, monkeypatch):
    for dtype in (torch.float16, torch.bfloat16):
        x, w, b = _inputs(shape, groups, dtype, "cuda", zlib.crc32(f"{shape}gpu".encode()))
        with poisoned_outputs(monkeypatch):
            out = K.group_norm_silu(x, w, b, groups)
        assert_close(out, K.group_norm_silu_reference(x, w, b, groups), *TOL[dtype], f"{shape} {dtype}")
        y = x.clone()
        assert torch.equal(K.group_norm_silu(y, w, b, groups, out=y), out), "in place differs from out of place"


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.triton), "reference"])
def test_in_place(backend):
    x, w, b = _inputs((2, 8, 17, 9, 30), 4, torch.float16, "cpu", 5)  # 2 stats tiles a group
    want = K.group_norm_silu_reference(x, w, b, 4)
    y = x.clone()
    got = K.group_norm_silu(y, w, b, 4, out=y, backend=backend)
    assert got.data_ptr() == y.data_ptr()
    assert_close(got, want, *TOL[torch.float16], "in place")
