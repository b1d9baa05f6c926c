"""Record diffusers' FlowMatchEulerDiscreteScheduler on the official settings (for tests/test_standins_gpu.py).

For (steps, shift) = (50, 6.0) and (15, 8.0) (the dense and 1024 stages' schedulers): `set_timesteps(steps)`'s
timesteps, and 64 fp16 values stepped through the whole schedule with seeded fp16 velocities (the same
generator draws as the test). Run in an environment with diffusers (the upstream one):

    UPSTREAM_VENV/bin/python tools/golden/make_scheduler_golden.py

Writes tests/data/flow_match_diffusers.safetensors: timesteps.<steps> [steps] fp32, x0.<steps> [64] fp16 (the
start), x.<steps> [64] fp16 (after the last step); the velocities are re-drawn by the test from seed 0.
"""

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file

out = {}
for steps, shift in ((50, 6.0), (15, 8.0)):
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    s.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=g).half()
    out[f"timesteps.{steps}"], out[f"x0.{steps}"] = s.timesteps.float().clone(), x.clone()
    for t in s.timesteps:
        x = s.step(torch.randn(64, generator=g).half(), t, x).prev_sample
    out[f"x.{steps}"] = x
save_file(out, str(Path(__file__).resolve().parents[2] / "tests" / "data" / "flow_match_diffusers.safetensors"))
