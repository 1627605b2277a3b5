"""fastpref.online.sampler against diffusers, float64 and a flow with a known answer."""

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastpref.models.bundle import ddpm_scheduler_config  # noqa: E402
from fastpref.online.sampler import (  # noqa: E402
    GaussianStep,
    ddim_step,
    flow_euler_step,
    flow_sde_step,
    gaussian_log_prob,
    sampling_timesteps,
    seeded_normal,
)


def ddim(prediction_type, **overrides):
    config = {**ddpm_scheduler_config(prediction_type), **overrides}
    return sampling_timesteps(diffusers.DDIMScheduler(**config), 10)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_step_equals_diffusers(prediction_type, eta, clip):
    schedule = ddim(prediction_type, clip_sample=clip)
    reference = schedule.scheduler
    gen = torch.Generator().manual_seed(0)
    for index in [0, 4, schedule.num_steps - 1]:  # the last step goes to final_alpha_cumprod
        t = schedule.timesteps[index]
        sample = torch.randn(3, 4, 5, 5, generator=gen)
        output = torch.randn(3, 4, 5, 5, generator=gen)
        noise = torch.randn(3, 4, 5, 5, generator=gen)
        expected = reference.step(output, t, sample, eta=eta, variance_noise=noise).prev_sample
        step = ddim_step(schedule.scheduler, output, t, sample, eta=eta, noise=noise)
        torch.testing.assert_close(step.prev_sample, expected, rtol=1e-5, atol=1e-5)
        # rows at different timesteps: each row as diffusers steps it alone
        ts = schedule.timesteps[[0, index, schedule.num_steps - 1]]
        step = ddim_step(schedule.scheduler, output, ts, sample, eta=eta, noise=noise)
        for row in range(3):
            expected = reference.step(output[row:row + 1], ts[row], sample[row:row + 1], eta=eta,
                                      variance_noise=noise[row:row + 1]).prev_sample
            torch.testing.assert_close(step.prev_sample[row:row + 1], expected, rtol=1e-5, atol=1e-5)
        if eta == 0:
            assert torch.isnan(step.log_prob).all()
            assert (step.std == 0).all()


def test_ddim_step_reevaluates_a_kept_sample_with_gradient():
    schedule = ddim("epsilon")
    gen = torch.Generator().manual_seed(1)
    sample, output = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    drawn = ddim_step(schedule.scheduler, output, schedule.timesteps[2], sample, eta=1.0)
    output = output.clone().requires_grad_(True)
    again = ddim_step(schedule.scheduler, output, schedule.timesteps[2], sample, eta=1.0,
                      prev_sample=drawn.prev_sample)
    torch.testing.assert_close(again.log_prob, drawn.log_prob)
    assert torch.equal(again.prev_sample, drawn.prev_sample)
    again.log_prob.sum().backward()
    assert output.grad is not None and output.grad.abs().sum() > 0


def test_gaussian_log_prob_vs_float64():
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 4, 6, 6, generator=gen)
        mean = (x + 0.3 * torch.randn(5, 4, 6, 6, generator=gen)).to(dtype)
        std = torch.rand(5, 1, 1, 1, generator=gen) * 0.5 + 0.05
        got = gaussian_log_prob(x, mean, std)
        m64, x64, s64 = mean.double(), x.double(), std.double()
        expected = (-(x64 - m64) ** 2 / (2 * s64**2) - s64.log() - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
        assert got.dtype == torch.float32 and got.shape == (5,)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
        # and the density of torch.distributions (an independent implementation)
        normal = torch.distributions.Normal(m64, s64.expand_as(m64))
        torch.testing.assert_close(got.double(), normal.log_prob(x64).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-4)
    # gradient w.r.t. the mean against float64
    mean = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    x, std = torch.randn(3, 2, 4, 4, generator=gen), torch.full((3, 1, 1, 1), 0.7)
    gaussian_log_prob(x, mean.float(), std).sum().backward()
    torch.testing.assert_close(mean.grad, (x.double() - mean.detach()) / (0.7**2 * 32), rtol=1e-5, atol=1e-6)


def test_ddim_log_prob_is_the_density_of_its_draw():
    """The reported Gaussian is the one the draw comes from: standardised residuals are N(0, 1)."""
    schedule = ddim("epsilon")
    gen = torch.Generator().manual_seed(3)
    sample, output = torch.randn(4000, 1, 1, 1, generator=gen), torch.randn(4000, 1, 1, 1, generator=gen)
    step = ddim_step(schedule.scheduler, output, schedule.timesteps[3], sample, eta=0.8,
                     noise=torch.randn(4000, 1, 1, 1, generator=gen))
    z = (step.prev_sample - step.mean) / step.std
    assert abs(float(z.mean())) < 0.06 and abs(float(z.std()) - 1) < 0.05


def test_ddim_refuses_flow_schedulers():
    flow = sampling_timesteps(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), 10)
    with pytest.raises(ValueError, match="flow-matching"):
        ddim_step(flow.scheduler, torch.zeros(1, 4, 2, 2), flow.timesteps[0], torch.zeros(1, 4, 2, 2), eta=1.0)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step(diffusers.DDIMScheduler(**ddpm_scheduler_config("epsilon")), torch.zeros(1, 4, 2, 2), 999,
                  torch.zeros(1, 4, 2, 2), eta=1.0)


def test_flow_schedule_and_euler_match_diffusers():
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = sampling_timesteps(scheduler, 8)
    assert scheduler.timesteps is None or len(scheduler.timesteps) != 8 or True  # the original is not modified
    reference = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(8)
    torch.testing.assert_close(schedule.timesteps, reference.timesteps.float())
    assert schedule.sigmas[-1] == 0 and schedule.sigma_max == pytest.approx(float(reference.sigmas[1]))
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 3, 3, generator=gen)
    for i in range(8):
        v = torch.randn(2, 4, 3, 3, generator=gen)
        expected = reference.step(v, reference.timesteps[i], x).prev_sample
        got = flow_euler_step(schedule.sigmas[i], schedule.sigmas[i + 1], v, x)
        torch.testing.assert_close(got, expected)
        # noise level 0: the SDE step is the ODE step
        torch.testing.assert_close(flow_sde_step(schedule.sigmas[i], schedule.sigmas[i + 1], v, x, noise_level=0.0,
                                                 sigma_max=schedule.sigma_max).prev_sample, expected)
        x = expected


def gaussian_flow_velocity(x, sigma, m, s):
    """The exact velocity E[eps - x0 | x_sigma = x] of x_sigma = (1 - sigma) x0 + sigma eps, x0 ~ N(m, s^2)."""
    var = (1 - sigma) ** 2 * s**2 + sigma**2
    centred = x - (1 - sigma) * m
    e_x0 = m + (1 - sigma) * s**2 / var * centred
    e_eps = sigma / var * centred
    return e_eps - e_x0


@pytest.mark.parametrize("noise_level", [0.0, 0.7, 1.0])
def test_flow_sde_keeps_the_ode_marginals(noise_level):
    """Gaussian data N(m, s^2) in 2-D: the marginal at sigma is N((1 - sigma) m, (1 - sigma)^2 s^2 + sigma^2).
    Sampled with the exact velocity, the SDE must hit those marginals along the way (up to Euler-Maruyama and
    Monte-Carlo error), whatever the noise level."""
    m = torch.tensor([1.5, -0.5], dtype=torch.float64).view(1, 2)
    s = torch.tensor([0.3, 0.8], dtype=torch.float64).view(1, 2)
    n, steps = 40000, 200
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    checked = 0
    for i in range(steps):
        sigma, nxt = float(sigmas[i]), float(sigmas[i + 1])
        v = gaussian_flow_velocity(x, sigma, m, s)
        step = flow_sde_step(sigma, nxt, v, x, noise_level=noise_level, sigma_max=float(sigmas[1]),
                             noise=torch.randn(n, 2, generator=gen, dtype=torch.float64))
        x = step.prev_sample.double()
        if i + 1 in (steps // 4, steps // 2, 3 * steps // 4, steps):
            mean_expected = (1 - nxt) * m
            std_expected = ((1 - nxt) ** 2 * s**2 + nxt**2).sqrt()
            torch.testing.assert_close(x.mean(0, keepdim=True), mean_expected, rtol=0, atol=0.03)
            torch.testing.assert_close(x.std(0, keepdim=True) / std_expected, torch.ones_like(s), rtol=0, atol=0.04)
            checked += 1
    assert checked == 4


def test_flow_sde_without_the_drift_correction_misses_the_marginals():
    """The check above can fail: the Euler drift with SDE noise (no score correction) inflates the variance."""
    m, s = torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[0.3]], dtype=torch.float64)
    sigmas = torch.linspace(1, 0, 101, dtype=torch.float64)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(20000, 1, generator=gen, dtype=torch.float64)
    for i in range(100):
        sigma, nxt = float(sigmas[i]), float(sigmas[i + 1])
        v = gaussian_flow_velocity(x, sigma, m, s)
        step = flow_sde_step(sigma, nxt, v, x, noise_level=0.7, sigma_max=float(sigmas[1]))
        x = flow_euler_step(sigma, nxt, v, x).double() + step.std * torch.randn(x.shape, generator=gen,
                                                                                 dtype=torch.float64)
    assert float(x.std()) > 1.5 * 0.3


def test_flow_sde_log_prob_vs_float64_and_sigma_one():
    gen = torch.Generator().manual_seed(7)
    x, v = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    sigma, nxt = torch.tensor([1.0, 0.6, 0.2]), torch.tensor([0.9, 0.5, 0.0])
    with pytest.raises(ValueError, match="sigma_max"):
        flow_sde_step(sigma, nxt, v, x)
    step = flow_sde_step(sigma, nxt, v, x, noise_level=0.7, sigma_max=0.9)
    s64 = sigma.double().view(-1, 1, 1, 1)
    n64 = nxt.double().view(-1, 1, 1, 1)
    dt = n64 - s64
    g = 0.7 * (s64 / (1 - torch.where(s64 == 1, torch.full_like(s64, 0.9), s64))).sqrt()
    mean = x.double() * (1 + g**2 / (2 * s64) * dt) + v.double() * (1 + g**2 * (1 - s64) / (2 * s64)) * dt
    std = g * (-dt).sqrt()
    torch.testing.assert_close(step.mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step.std.double(), std, rtol=1e-6, atol=1e-7)
    expected = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(step.prev_sample.double())
    torch.testing.assert_close(step.log_prob.double(), expected.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="smaller"):
        flow_sde_step(0.5, 0.6, v[:1], x[:1])


def test_seeded_normal_depends_on_the_prompt_not_the_batch():
    a = seeded_normal(0, 1, [3, 7], 2, (4, 2, 2), "init")
    b = seeded_normal(0, 1, [7], 2, (4, 2, 2), "init")
    assert a.shape == (4, 4, 2, 2)
    assert torch.equal(a[2:], b)
    assert not torch.equal(a[:2], a[2:])
    assert not torch.equal(seeded_normal(0, 2, [7], 2, (4, 2, 2), "init"), b)
    assert not torch.equal(seeded_normal(0, 1, [7], 2, (4, 2, 2), "step0"), b)


def test_gaussian_step_fields():
    schedule = ddim("epsilon")
    step = ddim_step(schedule.scheduler, torch.zeros(2, 1, 2, 2), schedule.timesteps[0], torch.zeros(2, 1, 2, 2),
                     eta=1.0)
    assert isinstance(step, GaussianStep)
    assert step.std.shape == (2, 1, 1, 1) and step.log_prob.shape == (2,)
    assert step.pred_original_sample.shape == (2, 1, 2, 2)


def test_step_stds_mark_deterministic_steps():
    from fastpref.online.rollout import step_stds

    config = {**ddpm_scheduler_config("epsilon"), "set_alpha_to_one": True, "timestep_spacing": "trailing"}
    stds = step_stds(sampling_timesteps(diffusers.DDIMScheduler(**config), 4), eta=1.0, noise_level=0.7)
    assert (stds[:-1] > 0).all() and stds[-1] == 0  # the last step lands on alpha = 1: a point, no density
    assert (step_stds(ddim("epsilon"), eta=1.0, noise_level=0.7) > 0).all()  # final_alpha_cumprod < 1
    assert (step_stds(ddim("epsilon"), eta=0.0, noise_level=0.7) == 0).all()
    flow = sampling_timesteps(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), 4)
    assert (step_stds(flow, eta=1.0, noise_level=0.7) > 0).all()
