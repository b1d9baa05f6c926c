"""The forwards `cuda_graph.GraphedModel` replays read nothing back to the host (s2core/cuda_graph.py).

A CUDA graph cannot capture a host sync: the capture fails and the wrapper falls back to the eager forward,
so a sync added to a captured forward would cost the graph without any error. The GPU tests check that
capture succeeds; these check the same on a CPU. The kernels' CUDA dispatch is forced for CPU half tensors
(the Triton kernels run in the interpreter, so their launch wrappers are the code a GPU runs), and every aten
op that needs the host to see device data is recorded: `.item()` / `bool()` / `int()`, nonzero, unique,
masked_select, boolean-mask indexing, tensor-count repeat_interleave and bincount. `.tolist()` of a CPU tensor
dispatches nothing and is not seen here; the GPU tests cover it.
"""

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels.conv3d
import kernels.group_norm
from s2core.config import RefinerConfig
from s2core.refiner import unet
from s2core.refiner.remesh_512 import VoxelRefiner
from s2core.refiner.sign_1024 import VoxelRefinerSign
from s2core.sparse import SparseTensor
from s2core.testing import deterministic_state_dict
from tests.test_refiner import SMALL
from tests.test_sparse_dit import _small_dit_and_structure

pytestmark = pytest.mark.triton

_READS_BACK = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive", "masked_select"}
_READS_BACK |= {"bincount", "is_nonzero", "equal"}
_KERNELS = ("adaptive_filter", "conv3d", "group_norm", "layer_norm", "sparse_conv")
_KERNELS += ("ssa_compressed", "ssa_selection", "ssa_topk", "ssa_window")


class HostReads(TorchDispatchMode):
    """Records the aten ops of a block that read device data back to the host."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        flat = [*args, *kwargs.values()]
        flat += [i for a in args if isinstance(a, (list, tuple)) for i in a]
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in flat
        )
        tensor_repeats = name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and len(args) == 1
        if name in _READS_BACK or bool_index or tensor_repeats:
            self.seen.append(str(func))
        return func(*args, **kwargs)


@pytest.fixture
def cuda_dispatch(monkeypatch):
    """The kernels' 'auto' dispatch takes the Triton path for CPU half tensors, as it does on CUDA."""
    from kernels import _common

    def as_on_cuda(backend, x, dtypes=_common.HALF):
        if backend == "reference":
            return False
        return backend == "triton" or dtypes is None or x.dtype in dtypes

    for name in _KERNELS:
        monkeypatch.setattr(importlib.import_module(f"kernels.{name}"), "_use_triton", as_on_cuda)
    assert kernels.group_norm._use_triton is as_on_cuda


def test_the_recorder_sees_host_reads():
    x = torch.tensor([0.0, 1.0, 2.0])
    with HostReads() as reads:
        bool(x.any())
        x[x > 0]
        x.nonzero()
        torch.unique(x)
        (x * 2).sum()
    # one op each; the product and the sum read nothing back
    assert [op.split(".")[1] for op in reads.seen] == ["_local_scalar_dense", "index", "nonzero", "_unique2"]


def test_sparse_dit_forward_reads_nothing_back(cuda_dispatch):
    """A planned forward of a fp16 sparse DiT (the Triton SSA kernels) with an image condition and with the
    all-zero one, each said to be what it is, as `pipeline.sample_sparse` does."""
    torch.manual_seed(0)
    model, parts = _small_dit_and_structure(64, 5, [40])
    model.set_dtype(torch.float16)
    x = SparseTensor(torch.randn(40, 16), parts[0])
    model.plan(x)  # once per structure, before the sampling loop
    t, cond = torch.tensor([300.0]), torch.randn(1, 5, 64)
    with torch.no_grad():
        for c, zero in ((cond, False), (torch.zeros_like(cond), True)):
            with HostReads() as reads:
                out = model(x.replace(x.feats), t, c, zero_cond=zero)
            assert not reads.seen, f"zero_cond={zero}: {reads.seen}"
            assert out.feats.shape == (40, 16) and torch.isfinite(out.feats).all()


def _fp16(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    model.load_state_dict(deterministic_state_dict(model, seed), strict=True)
    return model.half().eval()


@pytest.mark.parametrize("channels_last", [False, True])
def test_refiner_cubes_read_nothing_back(cuda_dispatch, monkeypatch, channels_last):
    """One cube of each refiner (fp16: the GroupNorm and adaptive filter kernels), both UNet layouts. The
    few-channel conv kernel is called once on its own: the interpreter takes a minute for it in a whole cube."""
    monkeypatch.setattr(unet, "CHANNELS_LAST", channels_last)
    monkeypatch.setattr(unet, "_runs_channels_last", lambda x: unet.CHANNELS_LAST)
    monkeypatch.setattr(unet, "USE_CONV_KERNEL", False)
    sign = _fp16(VoxelRefinerSign(RefinerConfig(patch_size=8, sign=True), block_out_channels=SMALL), 4)
    refiner = _fp16(VoxelRefiner(RefinerConfig(patch_size=8), block_out_channels=SMALL), 5)
    gen = torch.Generator().manual_seed(6)
    sdf = torch.randn(1, 1, 8, 8, 8, generator=gen).half()
    latent = torch.randn(1, 8, 8, 8, 8, generator=gen).half()
    if channels_last:
        sdf = sdf.contiguous(memory_format=torch.channels_last_3d)
    runs = {
        "sign refiner": lambda: sign(sdf),
        "512 refiner": lambda: refiner.refine_cube(sdf, latent),
        "conv kernel": lambda: kernels.conv3d.conv3d_same(sdf[..., :2, :2, :4], sign.conv_in.weight, None),
    }
    with torch.no_grad():
        for name, run in runs.items():
            run()
            with HostReads() as reads:
                out = run()
            assert not reads.seen, f"{name}: {reads.seen}"
            assert torch.isfinite(out).all() and out.shape[:2] == ((1, 4) if name == "conv kernel" else (1, 1))
