"""Refiner memory: what the 1024 refinement holds before its first cube, and the UNet's activation peak.

Before the cubes, the sign refiner turns the decoded SDF (~60 M voxels at 1024) into sorted int32 voxel keys.
The [N, 4] coordinates (16 bytes a voxel) are dropped first, so the downsampling and the sort never hold them:
under a 5 GiB allocator cap that sort ran out of memory while they were alive (bench/results/e2e-offload.md).

The cube itself (256³) sets the rest of the stage's peak, so the UNet's up path writes each upsampler's
output straight into the next concatenation and hands that concatenation to its resnet, which frees it after
conv1. Counted in "channel volumes" (one channel of the cube, 32 MiB at 256³ in fp16), the official widths'
peak is then 72: the 40-channel concatenation of the last up block's first resnet, the two 8-channel skips
still waiting, and that resnet's shortcut and conv1 outputs (8 each). Before, the full upsampled tensor (32)
lived beside the concatenation (peak 96), and the concatenation outlived conv1 (80).

On the GPU the counting above was not the whole story: under the 5 GiB cap the chain failed on a single 1.50 GiB
request while cuDNN convolved that 40-channel concatenation (1.25 GiB) in one call (H100, 2026-12-07). So a
convolution whose input is over SLAB_BYTES runs on depth slabs (`conv3d_slabs`), each with the halo its kernel
reaches: the tests below check that slabs give the same result as one call, and on a GPU that they lower the peak.
"""

import pytest
import torch
from allocations import Allocations

import s2core.refiner.unet as unet
from s2core.config import RefinerConfig
from s2core.refiner import CubeGrid, VoxelRefinerSign, remove_interior_1024
from s2core.refiner.unet import OFFICIAL_CHANNELS, UNet3D, _upsample_cat
from s2core.sparse.tensor import SparseTensor
from s2core.testing import deterministic_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

SMALL = (4, 8, 8, 8)  # UNet widths of a fast test refiner (the official ones: OFFICIAL_CHANNELS)


@pytest.mark.parametrize("depth,slabs", [(1, 8), (3, 8), (8, 8), (13, 4), (5, 1)])
def test_upsample_cat_equals_cat(depth, slabs):
    gen = torch.Generator().manual_seed(depth * 10 + slabs)
    conv = torch.nn.ConvTranspose3d(6, 5, 2, stride=2).double()
    torch.nn.init.normal_(conv.weight, generator=gen)
    torch.nn.init.normal_(conv.bias, generator=gen)
    x = torch.randn(2, 6, depth, 3, 4, generator=gen, dtype=torch.float64)
    skip = torch.randn(2, 3, 2 * depth, 6, 8, generator=gen, dtype=torch.float64)
    want = torch.cat([conv(x), skip], 1)
    got = _upsample_cat(conv, x, skip, slabs=slabs)
    assert torch.equal(got, want)


def test_up_path_activation_peak(monkeypatch):
    """Official widths and depths on a 16³ cube; the norms run in place as the CUDA kernel does (the CPU
    reference's per-group temporaries are not what a GPU holds)."""
    monkeypatch.setattr(
        unet._gn, "group_norm_silu", lambda x, w, b, g, eps, out=None: torch.empty_like(x) if out is None else out
    )
    p = 16
    net = UNet3D(1, OFFICIAL_CHANNELS, 2, 2).eval()
    x = torch.randn(1, 1, p, p, p)
    with torch.no_grad(), Allocations() as mem:
        y = net(x)
    assert y.shape == (1, OFFICIAL_CHANNELS[0], p, p, p)
    volume = p**3 * x.element_size()
    assert mem.peak <= 72 * volume, f"peak {mem.peak / volume:.1f} channel volumes (72 expected)"


class _FirstCube(Exception):
    pass


def test_1024_refinement_before_the_first_cube(monkeypatch):
    """A spherical band of decoded voxels handed over as the pipeline does (consume=True); stopped at the first
    cube. Beyond the handed-over SDF (16 bytes of coordinates + 4 of value a voxel), the keys, the sorted copy,
    the sort order and the downsampled field peak at 12 bytes a voxel (27 while the coordinates stayed alive
    through the sort, as before)."""

    def first_cube(self, x):
        raise _FirstCube

    monkeypatch.setattr(VoxelRefinerSign, "forward", first_cube)
    model = VoxelRefinerSign(RefinerConfig(patch_size=32, sign=True, use_fp16=False), block_out_channels=SMALL)
    g = torch.arange(128)
    x, y, z = torch.meshgrid(g, g, g, indexing="ij")
    r = ((x - 60.2) ** 2 + (y - 62.7) ** 2 + (z - 66.1) ** 2).float().sqrt()
    band = (r - 40.0).abs() < 6.0
    xyz = band.nonzero().int()
    coords = torch.cat([torch.zeros_like(xyz[:, :1]), xyz], 1)
    values = (r[band] - 40.0)[:, None] / 64
    n = coords.shape[0]
    with Allocations() as mem:
        sdf = SparseTensor(values.clone(), coords.clone())
        handed = mem.live
        with pytest.raises(_FirstCube):
            remove_interior_1024(model, sdf, level=0.2, grid=CubeGrid(64, 32, 16), consume=True)
    assert n > 200_000
    assert mem.peak - handed <= 16 * n, f"{(mem.peak - handed) / n:.1f} bytes a voxel beyond the SDF (12 expected)"


@pytest.mark.parametrize("kernel,depth,max_elems", [(3, 13, 60), (3, 1, 10), (3, 7, 1), (1, 9, 40), (3, 16, 10**6)])
def test_conv3d_slabs_equals_conv(kernel, depth, max_elems):
    """Slabs of at most max_elems input elements (one depth row at least; the last case is one call). fp64, so
    that only the summation order could differ: 1e-12 relative allows for a GEMM blocked another way."""
    gen = torch.Generator().manual_seed(kernel * 100 + depth)
    conv = torch.nn.Conv3d(5, 4, kernel, padding=kernel // 2).double()
    torch.nn.init.normal_(conv.weight, generator=gen)
    torch.nn.init.normal_(conv.bias, generator=gen)
    x = torch.randn(2, 5, depth, 3, 4, generator=gen, dtype=torch.float64)
    seen = []
    conv.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[2]))
    got = unet.conv3d_slabs(conv, x, max_bytes=max_elems * x.element_size())
    torch.testing.assert_close(got, conv(x), rtol=1e-12, atol=1e-12)
    slabs = min(depth, -(-x.numel() // max_elems))
    assert len(seen) == slabs + 1  # the slabs, then the reference call above
    assert max(seen[:-1]) <= -(-depth // slabs) + 2 * (kernel // 2)  # a slab's rows and its halo


def test_unet_on_slabs_equals_whole(monkeypatch):
    """The whole UNet with every convolution above 2 KB of input on slabs gives the one-call result."""
    torch.manual_seed(3)
    net = UNet3D(1, SMALL, 2, 2).double().eval()
    x = torch.randn(1, 1, 16, 16, 16, dtype=torch.float64)
    calls = []
    net.up_blocks[-1].resnets[0].conv1.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[2]))
    with torch.no_grad():
        want = net(x)
        monkeypatch.setattr(unet, "SLAB_BYTES", 2048)
        got = net(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert calls[0] == 16 and len(calls) > 2  # one call, then slabs


def test_unet_channels_last_equals_ncdhw(monkeypatch):
    """The channels-last UNet (CUDA's layout, forced here on the CPU) keeps the layout through every slab,
    concatenation, norm and upsampler write, and gives the NCDHW result (fp64: 1e-12). The CPU's convolutions
    answer NCDHW whatever their input, so here each one hands back its output in its input's layout, as cuDNN
    does."""
    torch.manual_seed(4)
    net = UNet3D(2, SMALL, 2, 2).double().eval()
    x = torch.randn(1, 2, 16, 16, 16, dtype=torch.float64)
    layouts = []

    def channels_last(t):
        return t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()

    def like_cudnn(m, args, out):
        if args[0].shape[2:].numel() > 1:
            layouts.append(channels_last(args[0]))
        return out.contiguous(memory_format=torch.channels_last_3d) if channels_last(args[0]) else out

    for m in net.modules():
        if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            m.register_forward_hook(like_cudnn)
    monkeypatch.setattr(unet, "SLAB_BYTES", 4096)
    with torch.no_grad():
        want = net(x)
        assert layouts and not any(layouts)
        layouts.clear()
        monkeypatch.setattr(unet, "_runs_channels_last", lambda x: True)
        got = net(x)
    assert layouts and all(layouts), f"{layouts.count(False)} of {len(layouts)} convolutions got NCDHW"
    assert channels_last(got)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("cls,cfg", [(VoxelRefinerSign, RefinerConfig(patch_size=64, sign=True))])
def test_channels_last_cube_matches_ncdhw_gpu(cls, cfg, monkeypatch):
    """The official sign refiner's UNet on one 64³ cube in fp16 on CUDA: channels-last (cuDNN's own layout, the
    Triton GroupNorm + SiLU and conv kernels in NDHWC) against NCDHW. cuDNN picks other algorithms per layout,
    so the fp32 sums are ordered differently: the UNet features agree to fp16 rounding (rel-RMS 1e-2, max-abs
    0.1 after ~40 layers), and the inside/outside signs on all but a few near-zero logits."""
    torch.manual_seed(0)
    model = cls(cfg)
    model.load_state_dict(deterministic_state_dict(model, seed=2), strict=True)
    model = model.cuda().eval()
    sdf = torch.randn(1, 1, 64, 64, 64, device="cuda").half()
    with torch.no_grad():
        h = unet.conv3d_slabs(model.conv_in, sdf)
        want, want_sign = model.unet3d1(h), model(sdf)
        monkeypatch.setattr(unet, "CHANNELS_LAST", True)
        got, got_sign = model.unet3d1(h), model(sdf)
    assert got.is_contiguous(memory_format=torch.channels_last_3d) and not got.is_contiguous()
    diff = (got.float() - want.float()).norm() / want.float().norm()
    assert diff < 1e-2 and (got.float() - want.float()).abs().max() < 0.1, f"rel-RMS {diff:.3g}"
    assert (got_sign != want_sign).float().mean() < 1e-3


@pytest.mark.gpu
def test_conv3d_slabs_peak_gpu():
    """The 40-channel 256³ input of the last up block's first conv1 (fp16, 1.25 GiB), as in the 1024 sign cube.
    On slabs the call's own peak must stay below the one-call peak; values agree to fp16 rounding (cuDNN may
    pick another algorithm for a slab's shape, so the fp32 sums may be ordered differently)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(40, 8, 3, padding=1).cuda().half()
    x = torch.randn(1, 40, 256, 256, 256, device="cuda", dtype=torch.float16)

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            y = fn()
        torch.cuda.synchronize()
        return y, torch.cuda.max_memory_allocated() - base

    want, whole = peak(lambda: conv(x))
    got, slabs = peak(lambda: unet.conv3d_slabs(conv, x))
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    out = want.numel() * want.element_size()
    msg = f"slabs peak {slabs / 2**30:.2f} GiB, one call {whole / 2**30:.2f} GiB"
    print(msg)
    # beside the output, per slab: its input's contiguous copy (a strided depth slice of NCDHW), cuDNN's
    # workspace for it (about 1.2x its input: 1.50 GiB for the whole 1.25 GiB tensor) and its own output
    assert slabs <= out + 3 * unet.SLAB_BYTES, msg
    assert slabs < whole, msg
