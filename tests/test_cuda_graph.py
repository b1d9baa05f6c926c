"""CUDA-graph replay of the dense DiT (s2core/cuda_graph.py): the same numbers as the eager forward.

Tolerance: none. A replay launches the eager forward's kernels on the same shapes, so velocities and whole
sampling runs must be bitwise equal; on a CPU the wrapper must simply call the model.
"""

import dataclasses

import pytest
import torch

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
    with torch.inference_mode():
        assert torch.equal(graphed(x, t, cond), dit(x, t, cond))
        assert torch.equal(graphed(x[:1], t, cond[:1].clone()), dit(x[:1], t, cond[:1]))
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
                assert len(graphed.graphs) == 1
            assert graphed.graphs == {}
            levels.append(torch.cuda.memory_allocated())
    assert levels[1] == levels[0] == levels[2], levels
