"""Flow-matching Euler sampling with classifier-free guidance, as the original pipeline runs it (SPEC.md §3.3, §6).

The schedule reproduces diffusers' `FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=s)`
after `set_timesteps(n)` bit for bit (no diffusers needed); the step and the guidance combination use the
same tensor expressions and dtypes as diffusers' `step` and the original pipeline, so on one device the
latents match the original's exactly.

The sampler knows nothing about the model: it calls `model(x, t, cond)` with `x` shaped like the noise
(dense `[B, 8, 16, 16, 16]` or sparse feats `[N, 16]`), `t` a `[1]` tensor in the latent dtype, and
whatever `cond` / `uncond` objects it was given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


def _shift(u, shift: float):
    return shift * u / (1 + (shift - 1) * u)


@dataclass(frozen=True)
class FlowSchedule:
    """`timesteps [n]` fp32 (= 1000·σ, fed to the model after rounding to the latent dtype) and
    `sigmas [n+1]` fp32 (the last one is 0)."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    def to(self, device) -> "FlowSchedule":
        return FlowSchedule(self.timesteps.to(device), self.sigmas.to(device))


def flow_schedule(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> FlowSchedule:
    """The official schedule (SPEC.md §6): diffusers' construction + `set_timesteps(num_steps)`.

    σ_max = 1 and σ_min = S(1/N) come from the float32 training table; the inference timesteps are
    `linspace(N·σ_max, N·σ_min, n)` in float64, shifted *again* with S (diffusers does this), then cast to
    float32. Test vectors in SPEC.md §6 (e.g. n=50, s=6: 1000.0, 996.5608, ...).
    """
    if num_steps < 1:
        raise ValueError(f"The number of sampling steps must be at least 1, got {num_steps}.")
    N = num_train_timesteps
    train_t = torch.from_numpy(np.linspace(1, N, N, dtype=np.float32)[::-1].copy())
    train_sigmas = _shift(train_t / N, shift)  # float32, like the scheduler's constructor
    sigma_max, sigma_min = train_sigmas[0].item(), train_sigmas[-1].item()
    t = np.linspace(sigma_max * N, sigma_min * N, num_steps)  # float64
    sigmas = torch.from_numpy(_shift(t / N, shift)).to(torch.float32)
    timesteps = sigmas * N
    return FlowSchedule(timesteps, torch.cat([sigmas, torch.zeros(1)]))


def make_noise(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Initial latent noise drawn as the original draws it: `randn(shape, dtype, device, generator)` directly in
    the latent dtype on the device (so the same generator state gives the same noise as the original)."""
    return torch.randn(shape, dtype=dtype, device=device, generator=generator)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A `torch.Generator` on `device` seeded with `seed`."""
    return torch.Generator(device=device).manual_seed(int(seed))


def sample_flow(
    model: Callable,
    noise: torch.Tensor,
    cond,
    uncond=None,
    *,
    num_steps: int,
    shift: float,
    guidance: float = 7.0,
    num_train_timesteps: int = 1000,
    callback: Callable[[int, int], None] | None = None,
    check_cancel: Callable[[], None] | None = None,
    batch_cfg: bool = False,
) -> torch.Tensor:
    """Integrate the flow from `noise` (σ = 1) to a clean latent (σ = 0) with Euler steps.

    model(x, t, cond) → velocity shaped like `x`; `noise` is the initial latent in the latent dtype (fp16 in
    the release). Guidance runs when `guidance > 0` and `uncond` is given, as two separate forwards (cond
    first) combined as `v_u + guidance · (v_c − v_u)` in the model's output dtype — the original's order.
    `check_cancel()` is called before every step (it raises to stop); `callback(step, total)` after every
    step, with step counting from 1. Returns the final latent in the latent dtype.

    `batch_cfg=True` runs cond and uncond as one forward on `cat([x, x])` / `cat([cond, uncond])` along dim 0
    (only for models whose inputs batch along dim 0, like the dense DiT): faster, and equal to the two
    forwards up to GEMM rounding, but not bitwise the original's sequence.
    """
    sched = flow_schedule(num_steps, shift, num_train_timesteps).to(noise.device)
    do_cfg = guidance > 0 and uncond is not None
    # once, not per step: a CUDA-graph wrapper (`cuda_graph.GraphedModel`) keys its graph on the cond tensor
    pair = torch.cat([cond, uncond]) if do_cfg and batch_cfg else None
    x = noise
    for i in range(num_steps):
        if check_cancel is not None:
            check_cancel()
        t = sched.timesteps[i : i + 1].to(x.dtype)  # the original feeds tensor([t], dtype=latent dtype): fp16-rounded
        if do_cfg and batch_cfg:
            v, v_u = model(torch.cat([x, x]), t, pair).chunk(2)
        else:
            v = model(x, t, cond)
            v_u = model(x, t, uncond) if do_cfg else None
        if do_cfg:
            v = v_u + guidance * (v - v_u)
        dt = sched.sigmas[i + 1] - sched.sigmas[i]  # 0-dim fp32: `dt * v` stays in v's dtype, as in diffusers
        x = (x.float() + dt * v).to(v.dtype)
        if callback is not None:
            callback(i + 1, num_steps)
    return x
