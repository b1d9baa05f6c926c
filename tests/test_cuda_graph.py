"""CUDA-graph replay (s2core/cuda_graph.py): the same numbers as the eager forward, for the dense DiT, the
sparse DiT's sampling loop and the refiners' cubes.

Tolerance: none. A replay launches the eager forward's kernels on the same shapes, so velocities, cubes and
whole sampling runs must be bitwise equal; on a CPU the wrapper must simply call the model.
"""

import dataclasses

import pytest
import torch

from s2core import cuda_graph
from s2core.config import DenseDiTConfig, tiny_release
from s2core.cuda_graph import GraphedModel
from s2core.dense_dit import DenseDiT
from s2core.flow_sampler import sample_flow
from s2core.testing import deterministic_state_dict


def _dit(cfg: DenseDiTConfig, device, dtype=torch.float16) -> DenseDiT:
    dit = DenseDiT(cfg, dtype=dtype)
    dit.load_state_dict(deterministic_state_dict(dit, seed=7), strict=True)
    return dit.set_dtype(dtype).to(device).eval()


def _inputs(cfg: DenseDiTConfig, device, seed: int, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, *[cfg.resolution] * 3, generator=g).half().to(device)
    cond = torch.randn(batch, 9, cfg.cond_channels, generator=g).half().to(device)
    return x, cond


def test_cpu_calls_the_model():
    cfg = tiny_release().dense_dit
    dit = _dit(cfg, "cpu", torch.float32)
    x, cond = _inputs(cfg, "cpu", 1)
    graphed = GraphedModel(dit)
    t = torch.tensor([500.0])
    with torch.inference_mode():
        assert torch.equal(graphed(x.float(), t, cond.float()), dit(x.float(), t, cond.float()))
    assert graphed.graphs == {}


def test_stages_switch_the_wrapper(monkeypatch):
    monkeypatch.setattr(cuda_graph, "STAGES", {"dense", "sparse"})
    assert not GraphedModel(None).eager and not GraphedModel(None, "sparse").eager
    assert GraphedModel(None, "refiner").eager and GraphedModel(None, None).eager
    # without Triton the sparse DiT's references read counts back to the host: never captured
    monkeypatch.setattr(cuda_graph.tuning, "HAS_TRITON", False)
    assert GraphedModel(None, "sparse").eager and not GraphedModel(None, "dense").eager


@pytest.mark.gpu
def test_replay_equals_eager():
    cfg = dataclasses.replace(tiny_release().dense_dit, resolution=8, latent_shape=(8, 8, 8, 8), use_fp16=True)
    dit = _dit(cfg, "cuda")
    x, cond = _inputs(cfg, "cuda", 2)
    uncond = torch.zeros_like(cond)
    graphed = GraphedModel(dit)
    with torch.inference_mode():
        for step, tv in enumerate([1000.0, 731.5, 12.25]):
            t = torch.tensor([tv], device="cuda").half()
            xs = x * (1 + step)
            for c in (cond, uncond):
                assert torch.equal(graphed(xs, t, c), dit(xs, t, c)), f"step {step}"
        assert len(graphed.graphs) == 2 and not graphed.eager  # one graph per condition tensor
        kw = dict(num_steps=6, shift=3.0, guidance=7.0)
        want = sample_flow(dit, x, cond, uncond, **kw)
        got = sample_flow(GraphedModel(dit), x, cond, uncond, **kw)
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_batch_of_two_gets_its_own_graph():
    cfg = dataclasses.replace(tiny_release().dense_dit, use_fp16=True)
    dit = _dit(cfg, "cuda")
    x, cond = _inputs(cfg, "cuda", 3, batch=2)
    graphed = GraphedModel(dit)
    t = torch.tensor([250.0], device="cuda").half()
    one = cond[:1].clone()
    with torch.inference_mode():
        for _ in range(2):  # a key's first call runs eagerly, its second captures
            assert torch.equal(graphed(x, t, cond), dit(x, t, cond))
            assert torch.equal(graphed(x[:1], t, one), dit(x[:1], t, one))
    assert len(graphed.graphs) == 2


@pytest.mark.gpu
def test_closed_wrapper_leaves_no_memory_behind():
    # each sampling run wraps the model anew (pipeline.sample_dense): after its `with` block the graphs, their
    # pool and cuBLAS's per-stream workspaces are gone, so run after run allocates nothing more
    cfg = dataclasses.replace(tiny_release().dense_dit, use_fp16=True)
    dit = _dit(cfg, "cuda")
    x, cond = _inputs(cfg, "cuda", 4)
    t = torch.tensor([400.0], device="cuda").half()
    with torch.inference_mode():
        dit(x, t, cond)  # the default stream's own lazy state first
        torch.cuda.synchronize()
        levels = []
        for _ in range(3):
            with GraphedModel(dit) as graphed:
                graphed(x, t, cond)
                graphed(x, t, cond)
                assert len(graphed.graphs) == 1
            assert graphed.graphs == {}
            levels.append(torch.cuda.memory_allocated())
    assert levels[1] == levels[0] == levels[2], levels


@pytest.fixture
def all_stages(monkeypatch):
    """Every stage replays graphs; returns the list each successful capture appends its graph's key size to."""
    monkeypatch.setattr(cuda_graph, "STAGES", {"dense", "sparse", "refiner"})
    captured, real = [], GraphedModel._capture

    def capture(self, args):
        entry = real(self, args)
        captured.append(len(args))
        return entry

    monkeypatch.setattr(GraphedModel, "_capture", capture)
    return captured


@pytest.mark.gpu
def test_sparse_sampling_and_512_refinement_capture_in_the_pipeline(monkeypatch, all_stages, caplog):
    """The pipeline's sparse sampling (3 steps: each condition's forward runs eagerly, is captured, is
    replayed) and 512 refinement (27 cubes) on the tiny-random release in fp16, every stage graphed: every
    capture succeeds and the chain ends in a mesh. (Bitwise equality with eager is checked per forward below:
    whole runs also differ between two eager runs, as the SSA compression pools with atomic adds.)"""
    from s2core import loading
    from s2core import pipeline as P
    from tests.tiny_chain import picture

    models = loading.load_models("tiny-random", ("dense", "sparse_512"), device="cuda", dtype=torch.float16)
    img, mask = picture()
    with torch.inference_mode():
        cond = P.encode_image(models, img.cuda(), mask.cuda())
        st = P.decode_dense(models, P.sample_dense(models, cond, seed=2, steps=2))
        lat = P.sample_sparse(models, cond, st, seed=2, steps=3)
        mesh = P.decode_sparse(models, lat, refine=True)
    assert "capture failed" not in caplog.text
    # the dense DiT's two conditions, the sparse DiT's two, the refiner's one cube shape
    assert all_stages == [3, 3, 3, 3, 2], all_stages
    assert torch.isfinite(lat.feats).all() and mesh.face_counts[0] > 0


@pytest.mark.gpu
def test_sparse_dit_replay_equals_eager(all_stages):
    """A fp16 sparse DiT's velocity as `pipeline.sample_sparse` calls it (Triton SSA, the zero condition's
    shortcut): replays equal the eager forwards bitwise. At most two tokens share a compression cell, so the
    cells' atomic adds give the same sums in any order and the eager forward is itself reproducible."""
    from s2core.config import SparseDiTConfig
    from s2core.sparse import SparseTensor
    from s2core.sparse_dit import SparseDiT
    from s2core.structure import sort_block

    cfg = SparseDiTConfig(resolution=32, model_channels=64, cond_channels=64, num_blocks=2, num_heads=4)
    cfg = dataclasses.replace(cfg, num_kv_heads=2, topk=3, use_fp16=True)
    dit = SparseDiT(cfg)
    dit.load_state_dict(deterministic_state_dict(dit, 11), strict=True)
    dit = dit.cuda().eval()
    cells = torch.stack(torch.meshgrid(*[torch.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3) * 8
    xyz = torch.cat([cells, cells + torch.tensor([1, 2, 3])])  # two tokens in each 8³ cell
    coords = sort_block(torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1).int(), 8)[0].cuda()
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(len(coords), 16, generator=gen).half().cuda()
    cond = torch.randn(1, 9, 64, generator=gen).half().cuda()
    zeros = torch.zeros_like(cond)
    base = SparseTensor(x, coords)
    dit.plan(base)

    def velocity(x, t, context):
        return dit(base.replace(x), t, context, zero_cond=context is zeros).feats

    with torch.inference_mode(), GraphedModel(velocity, "sparse") as graphed:
        for step, tv in enumerate([900.0, 500.0, 100.0]):
            t = torch.tensor([tv], device="cuda").half()
            for c in (cond, zeros):
                assert torch.equal(graphed(x * (1 + step), t, c), velocity(x * (1 + step), t, c)), f"step {step}"
        assert len(graphed.graphs) == 2 and not graphed.eager
    assert all_stages == [3, 3]


@pytest.mark.gpu
def test_512_refiner_cube_replay_equals_eager(all_stages):
    """The 512 refiner's `refine_cube(sdf, latent)` as its loop runs it, the broadcast background pair
    included: replays equal the eager cubes bitwise."""
    from s2core.config import RefinerConfig
    from s2core.refiner.remesh_512 import VoxelRefiner

    model = VoxelRefiner(RefinerConfig(patch_size=32), block_out_channels=(8, 16, 16, 16))
    model.load_state_dict(deterministic_state_dict(model, 13), strict=True)
    model = model.cuda().eval()
    gen = torch.Generator().manual_seed(14)
    pairs = [
        (torch.randn(1, 1, 32, 32, 32, generator=gen), torch.randn(1, 8, 32, 32, 32, generator=gen)) for _ in range(3)
    ]
    pairs = [(a.half().cuda(), b.half().cuda()) for a, b in pairs]
    one, lat = torch.ones(1, 1, 1, 1, 1).half().cuda(), torch.randn(1, 8, 1, 1, 1, generator=gen).half().cuda()
    pairs.append((one.expand(1, 1, 32, 32, 32), lat.expand(1, 8, 32, 32, 32)))
    with torch.inference_mode(), GraphedModel(model.refine_cube, "refiner", copied=2) as cube:
        for sdf, latent in pairs + pairs[:2]:
            assert torch.equal(cube(sdf, latent), model.refine_cube(sdf, latent))
        assert len(cube.graphs) == 1 and not cube.eager
    assert all_stages == [2]


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_sign_refiner_cube_replay_equals_eager(all_stages, monkeypatch, channels_last):
    """The 1024 sign refiner's cube as the refinement loop runs it, in either UNet layout: densified cubes and
    the broadcast background cube (a stride-0 input copied into the graph's buffer) give the eager cubes
    bitwise."""
    from s2core.config import RefinerConfig
    from s2core.refiner import unet
    from s2core.refiner.sign_1024 import VoxelRefinerSign

    monkeypatch.setattr(unet, "CHANNELS_LAST", channels_last)

    model = VoxelRefinerSign(RefinerConfig(patch_size=32, sign=True), block_out_channels=(8, 16, 16, 16))
    model.load_state_dict(deterministic_state_dict(model, 9), strict=True)
    model = model.cuda().eval()
    gen = torch.Generator().manual_seed(10)
    cubes = [torch.randn(1, 1, 32, 32, 32, generator=gen).half().cuda() for _ in range(3)]
    cubes.append(torch.ones(1, dtype=torch.float16, device="cuda").view(1, 1, 1, 1, 1).expand(1, 1, 32, 32, 32))
    with torch.inference_mode(), GraphedModel(model, "refiner", copied=1) as cube:
        for x in cubes + cubes[:2]:
            assert torch.equal(cube(x), model(x))
        assert len(cube.graphs) == 1 and not cube.eager
    assert all_stages == [1]
