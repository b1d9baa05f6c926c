"""Flow-matching Euler sampler: schedule vs. SPEC.md §6 test vectors, hooks, CFG wiring, noise."""

import pytest
import torch

from s2core.flow_sampler import flow_schedule, make_noise, sample_flow, seeded_generator


@pytest.mark.parametrize(
    "n,shift,first,last,last_sigma",
    [
        (50, 6.0, [1000.0, 996.5608, 993.0013, 989.3149, 985.4949], [226.5382, 139.2569, 34.7826], 0.0347826071),
        (30, 6.0, [1000.0, 994.1192, 987.8821, 981.2553, 974.2010], [325.7593, 201.0283, 34.7826], 0.0347826071),
        (15, 8.0, [1000.0, 990.5568, 979.7769, 967.3547, 952.8840], [584.7305, 406.3086, 60.2070], 0.0602069683),
    ],
    ids=["n50-s6", "n30-s6", "n15-s8"],
)
def test_schedule_matches_spec_vectors(n, shift, first, last, last_sigma):
    s = flow_schedule(n, shift)
    assert s.timesteps.dtype == torch.float32 and s.timesteps.shape == (n,) and s.sigmas.shape == (n + 1,)
    # SPEC vectors are printed to 4 decimals (diffusers 0.33.1 values); fp32 spacing near 1000 is 6e-5.
    assert torch.allclose(s.timesteps[:5], torch.tensor(first), atol=1.2e-4, rtol=0)
    assert torch.allclose(s.timesteps[-3:], torch.tensor(last), atol=1.2e-4, rtol=0)
    assert abs(s.sigmas[-2].item() - last_sigma) < 1e-9 and s.sigmas[-1].item() == 0.0
    assert torch.equal(s.timesteps, s.sigmas[:-1] * 1000)
    assert (s.sigmas[1:] < s.sigmas[:-1]).all()


def test_schedule_rejects_zero_steps():
    with pytest.raises(ValueError, match="at least 1"):
        flow_schedule(0, 6.0)


def _linear_model(calls):
    def model(x, t, cond):
        calls.append((t.clone(), cond))
        return 0.1 * x + (1.0 if cond == "c" else -1.0)

    return model


def test_cfg_runs_cond_then_uncond_and_combines():
    calls, inputs = [], []
    model = _linear_model(calls)
    x0 = torch.randn(2, 3, dtype=torch.float16)
    out = sample_flow(
        lambda x, t, c: (inputs.append(x.clone()), model(x, t, c))[1],
        x0,
        "c",
        "u",
        num_steps=3,
        shift=6.0,
        guidance=7.0,
    )
    assert [c for _, c in calls] == ["c", "u"] * 3 and out.dtype == torch.float16
    # step 0 by hand: v = v_u + 7 (v_c - v_u); x1 = x0 + (σ1 - σ0) v, dt·v in fp16 as diffusers computes it
    s = flow_schedule(3, 6.0)
    v_c, v_u = 0.1 * x0 + 1.0, 0.1 * x0 - 1.0
    x1 = (x0.float() + (s.sigmas[1] - s.sigmas[0]) * (v_u + 7.0 * (v_c - v_u))).to(torch.float16)
    assert torch.equal(inputs[2], x1)  # what the model sees at step 1


def test_no_cfg_when_guidance_zero_or_no_uncond():
    for guidance, uncond in ((0.0, "u"), (7.0, None)):
        calls = []
        sample_flow(_linear_model(calls), torch.zeros(4), "c", uncond, num_steps=4, shift=6.0, guidance=guidance)
        assert [c for _, c in calls] == ["c"] * 4


def test_timestep_is_rounded_to_latent_dtype():
    calls = []
    sample_flow(_linear_model(calls), torch.zeros(2, dtype=torch.float16), "c", None, num_steps=50, shift=6.0)
    t1 = calls[1][0]
    assert t1.dtype == torch.float16 and t1.shape == (1,) and t1.item() == 996.5  # 996.5608 in fp16
    calls = []
    sample_flow(_linear_model(calls), torch.zeros(2), "c", None, num_steps=50, shift=6.0)
    assert calls[1][0].dtype == torch.float32 and abs(calls[1][0].item() - 996.5608) < 1e-3


def test_callback_and_cancel_hooks():
    seen = []
    sample_flow(
        _linear_model([]), torch.zeros(3), "c", "u", num_steps=5, shift=6.0, callback=lambda i, n: seen.append((i, n))
    )
    assert seen == [(i, 5) for i in range(1, 6)]

    class Stop(Exception):
        pass

    calls, count = [], []

    def cancel():
        count.append(1)
        if len(count) == 3:
            raise Stop

    with pytest.raises(Stop):
        sample_flow(_linear_model(calls), torch.zeros(3), "c", "u", num_steps=10, shift=6.0, check_cancel=cancel)
    assert len(calls) == 4  # two full steps ran (cond + uncond each), the third was cancelled before its forward


def test_noise_is_seeded_and_in_latent_dtype():
    a = make_noise((2, 8, 4, 4, 4), seeded_generator(7), torch.float16)
    b = make_noise((2, 8, 4, 4, 4), seeded_generator(7), torch.float16)
    c = make_noise((2, 8, 4, 4, 4), seeded_generator(8), torch.float16)
    assert a.dtype == torch.float16 and torch.equal(a, b) and not torch.equal(a, c)
    ref = torch.randn((2, 8, 4, 4, 4), dtype=torch.float16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, ref)  # the original's draw: randn directly in fp16 with the generator


def test_batched_cfg_equals_two_forwards_for_a_batchable_model():
    def model(x, t, cond):  # elementwise in the batch: batching cannot change the values
        return 0.1 * x * cond + t.float() / 1000

    x0 = torch.randn(1, 4, generator=torch.Generator().manual_seed(0))
    cond, uncond = torch.full((1, 4), 2.0), torch.zeros(1, 4)
    a = sample_flow(model, x0, cond, uncond, num_steps=5, shift=6.0, guidance=7.0)
    b = sample_flow(model, x0, cond, uncond, num_steps=5, shift=6.0, guidance=7.0, batch_cfg=True)
    assert torch.equal(a, b)
