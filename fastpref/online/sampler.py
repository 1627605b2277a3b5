"""Sampling steps with per-step Gaussian log-densities: what the online methods (GRPO, SPO, DRaFT) sample with.

Every stochastic step x_t -> x_{t-1} is a Gaussian N(mean, std^2 I) whose mean depends on the denoiser's output
(hence on the policy) and whose std does not. A step returns that Gaussian (`GaussianStep`), so a method can

- sample from it (rollout, no gradient) and keep `prev_sample` and `log_prob`,
- later re-evaluate the same transition under the current policy (`prev_sample=` the kept sample) to get the
  new `mean` / `log_prob` with gradient (the ratio of GRPO / SPO), or under the reference (KL on the means).

Families:
- eps / v-prediction (toy-sd, toy-sdxl, SD1.5, SDXL): DDIM with eta (`ddim_step`). eta = 0 is the deterministic
  step DRaFT backpropagates through, eta = 1 the DDPM-like posterior SPO uses, 0 < eta GRPO (DanceGRPO-style).
  It is diffusers' DDIMScheduler.step written so that timesteps may differ per row and the Gaussian is returned;
  given the same variance noise the two give the same x_{t-1} (tests/online/test_sampler.py).
- flow matching (toy-sd3, SD3): Flow-GRPO's ODE -> SDE conversion (`flow_sde_step`, noise level a: the step's
  diffusion coefficient is a * sqrt(sigma / (1 - sigma))), which keeps the ODE's marginals, and the plain Euler
  step of the ODE (`flow_euler_step`, DRaFT). DDIM's eta posterior is defined for the DDPM forward process only,
  so `ddim_step` refuses a flow scheduler.

Noise: every draw comes from a CPU generator seeded by (seed, epoch, prompt id, what) (`seeded_normal`, reusing
fastpref.data.noise.group_generator), so a rollout does not depend on batch composition, rank count or device,
and a resumed run redraws exactly the noise of the uninterrupted one.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch

from fastpref.data.noise import group_generator

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class GaussianStep:
    """One denoising step x_t -> x_{t-1} ~ N(mean, std^2 I).

    prev_sample: x_{t-1} (drawn here, or the one passed in as prev_sample=)
    mean: the Gaussian mean (carries the denoiser's gradient when the model output does)
    std: broadcastable to the sample, one value per row, e.g. (N, 1, 1, 1); 0 for deterministic steps
    log_prob: (N,) float32, log N(prev_sample; mean, std^2) averaged over the non-batch dims (nan when std == 0)
    pred_original_sample: the step's x0 prediction (what SPO scores, DRaFT decodes), when the family has one
    """

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _rows(value, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (N,) value as an (N, 1, 1, ...) float32 tensor on like's device."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.numel() == 1:
        value = value.reshape(()).expand(like.shape[0])
    if value.shape != (like.shape[0],):
        value = value.reshape(-1)
        if value.shape[0] != like.shape[0]:
            raise ValueError(f"per-row value has {value.shape[0]} entries for a batch of {like.shape[0]}")
    return value.view(-1, *([1] * (like.ndim - 1)))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N,) float32: log N(x; mean, std^2) per element, averaged over all but the first dim.

    The one place this formula lives (the fused ops reproduce it). Computed in float32 whatever the inputs' dtype:
    bf16 means lose the small differences the ratio of two log-densities is made of. x is treated as data (no
    gradient flows into it); the gradient flows into `mean`.
    """
    x = x.detach().float()
    mean = mean.float()
    std = torch.as_tensor(std, device=mean.device).float()
    dims = tuple(range(1, mean.ndim))
    elementwise = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return elementwise.mean(dim=dims) if dims else elementwise


def _log_prob_or_nan(prev_sample, mean, std) -> torch.Tensor:
    if bool((std > 0).all()):
        return gaussian_log_prob(prev_sample, mean, std)
    return torch.full((mean.shape[0],), float("nan"), device=mean.device)


# ---------------------------------------------------------------------------------------------- DDIM


def _is_flow_scheduler(scheduler) -> bool:
    return type(scheduler).__name__.startswith("FlowMatch")


def ddim_step(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor, *, eta: float,
              prev_sample: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> GaussianStep:
    """DDIM step with stochasticity eta for epsilon / v_prediction / sample models (diffusers' DDIMScheduler.step).

    scheduler: a DDIMScheduler on which set_timesteps(num_inference_steps) was called (see sampling_timesteps);
    timestep: a scalar or (N,) of the scheduler's timesteps (rows may be at different steps).
    prev_sample: evaluate this x_{t-1} instead of drawing one (no noise is drawn then); noise: the standard-normal
    variance noise (diffusers' variance_noise), drawn with torch.randn_like when neither is given.
    The mean is sqrt(a_prev) x0_hat + sqrt(1 - a_prev - std^2) eps_hat and std = eta * sqrt(variance(t, t_prev)),
    both in float32. use_clipped_model_output is diffusers' default (False); thresholding is refused.
    """
    if _is_flow_scheduler(scheduler):
        raise ValueError(f"ddim_step: {type(scheduler).__name__} is a flow-matching scheduler; DDIM's eta posterior "
                         "is defined for the DDPM forward process only (use flow_sde_step / flow_euler_step)")
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("ddim_step: call scheduler.set_timesteps(num_steps) first (sampling_timesteps does)")
    if scheduler.config.get("thresholding", False):
        raise ValueError("ddim_step: dynamic thresholding is not supported (its x0 is not a smooth function)")
    if eta < 0:
        raise ValueError(f"ddim_step: eta must be >= 0, got {eta}")
    model_output = model_output.float()
    sample = sample.float()
    t = torch.as_tensor(timestep, device="cpu").reshape(-1).long()
    if t.numel() == 1:
        t = t.expand(sample.shape[0])
    t_prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.to(torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
    a_t = alphas[t]
    a_prev = torch.where(t_prev >= 0, alphas[t_prev.clamp(min=0)], final)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    a_t, a_prev = _rows(a_t, sample), _rows(a_prev, sample)
    std = eta * _rows(variance, sample).sqrt()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0 = (sample - (1 - a_t).sqrt() * model_output) / a_t.sqrt()
        eps = model_output
    elif kind == "sample":
        x0 = model_output
        eps = (sample - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    elif kind == "v_prediction":
        x0 = a_t.sqrt() * sample - (1 - a_t).sqrt() * model_output
        eps = a_t.sqrt() * model_output + (1 - a_t).sqrt() * sample
    else:
        raise ValueError(f"ddim_step: prediction_type {kind!r} is not epsilon, sample or v_prediction")
    if scheduler.config.get("clip_sample", False):
        limit = scheduler.config.clip_sample_range
        x0 = x0.clamp(-limit, limit)
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    if prev_sample is None:
        if noise is None:
            noise = torch.randn_like(mean)
        prev_sample = mean + std * noise.to(mean)
    return GaussianStep(prev_sample, mean, std, _log_prob_or_nan(prev_sample, mean, std), x0)


# ---------------------------------------------------------------------------------------------- flow


def flow_sde_step(sigma, sigma_next, velocity: torch.Tensor, sample: torch.Tensor, *, noise_level: float = 0.7,
                  prev_sample: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                  sigma_max: float | None = None) -> GaussianStep:
    """Flow-GRPO's SDE step from sigma to sigma_next < sigma (scalars or (N,)) for a rectified flow
    x_sigma = (1 - sigma) x0 + sigma eps whose model predicts the velocity eps - x0.

    The reverse SDE with the same marginals as the ODE dx = v dsigma, with diffusion coefficient
    g = noise_level * sqrt(sigma / (1 - sigma)), discretised with Euler-Maruyama (dt = sigma_next - sigma < 0):
        mean = x (1 + g^2 dt / (2 sigma)) + v (1 + g^2 (1 - sigma) / (2 sigma)) dt,   std = g sqrt(-dt).
    At sigma = 1, g is infinite: as Flow-GRPO, sigma_max (the schedule's second sigma) replaces sigma in the
    denominator (an error if it is needed and not given). noise_level 0 is the ODE's Euler step.
    """
    velocity = velocity.float()
    sample = sample.float()
    s = _rows(sigma, sample)
    s_next = _rows(sigma_next, sample)
    dt = s_next - s
    if bool((dt >= 0).any()):
        raise ValueError("flow_sde_step: sigma_next must be smaller than sigma (sampling runs from noise to data)")
    if bool((s >= 1).any()):
        if sigma_max is None:
            raise ValueError("flow_sde_step: sigma = 1 needs sigma_max (the schedule's second sigma) to keep the "
                             "noise level finite")
        denominator = 1 - torch.where(s >= 1, torch.full_like(s, float(sigma_max)), s)
    else:
        denominator = 1 - s
    g = noise_level * (s / denominator).sqrt()
    mean = sample * (1 + g**2 / (2 * s) * dt) + velocity * (1 + g**2 * (1 - s) / (2 * s)) * dt
    std = g * (-dt).sqrt()
    if prev_sample is None:
        if noise is None:
            noise = torch.randn_like(mean)
        prev_sample = mean + std * noise.to(mean)
    x0 = sample - s * velocity
    return GaussianStep(prev_sample, mean, std, _log_prob_or_nan(prev_sample, mean, std), x0)


def flow_euler_step(sigma, sigma_next, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The flow ODE's Euler step x + v (sigma_next - sigma) (FlowMatchEulerDiscreteScheduler.step), differentiable;
    in the sample's dtype as diffusers computes it in float32 and casts back."""
    dt = _rows(sigma_next, sample) - _rows(sigma, sample)
    return (sample.float() + velocity.float() * dt).to(sample.dtype)


# ---------------------------------------------------------------------------------------------- schedules


@dataclass
class SamplingSchedule:
    """The timesteps a sampler visits (the denoiser's units), and for flow models the sigmas (num_steps + 1,
    ending in 0). `scheduler` is a private copy with set_timesteps applied (what ddim_step reads)."""

    scheduler: Any
    timesteps: torch.Tensor  # (S,) int64 (DDIM) or float32 (flow), CPU
    sigmas: torch.Tensor | None  # (S + 1,) float32, CPU; flow only
    flow: bool

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def sigma_max(self) -> float | None:
        """Flow-GRPO's stand-in for sigma = 1 in the noise level: the schedule's second sigma."""
        if self.sigmas is None or self.sigmas.shape[0] < 2:
            return None
        return float(self.sigmas[1])


def sampling_timesteps(bundle_or_scheduler, num_steps: int) -> SamplingSchedule:
    """The sampling schedule of `num_steps` steps: DDIM (built from the model's training DDPM config, so betas,
    prediction type and steps_offset agree) for eps / v families, the model's own flow Euler scheduler (its shift)
    for flow families. A scheduler passed in is copied, never modified."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    from fastpref.utils.imports import require

    diffusers = require("diffusers", "building a sampling schedule")
    if hasattr(bundle_or_scheduler, "noise_scheduler"):
        bundle = bundle_or_scheduler
        if bundle.prediction_type == "flow":
            scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(bundle.sample_scheduler.config)
        else:
            scheduler = diffusers.DDIMScheduler.from_config(bundle.noise_scheduler.config)
    else:
        scheduler = copy.deepcopy(bundle_or_scheduler)
    flow = _is_flow_scheduler(scheduler)
    if flow and scheduler.config.get("use_dynamic_shifting", False):
        raise ValueError("sampling_timesteps: a flow scheduler with use_dynamic_shifting needs the image-size "
                         "dependent mu, which fastpref does not compute; use a static shift")
    scheduler.set_timesteps(num_steps, device="cpu")
    if flow:
        return SamplingSchedule(scheduler, scheduler.timesteps.float().cpu(), scheduler.sigmas.float().cpu(), True)
    return SamplingSchedule(scheduler, scheduler.timesteps.long().cpu(), None, False)


# ---------------------------------------------------------------------------------------------- guidance


def _cat_conditioning(cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if set(cond) != set(uncond):
        raise ValueError(f"guided_prediction: cond keys {sorted(cond)} != uncond keys {sorted(uncond)}")
    return {key: torch.cat([uncond[key], cond[key]]) for key in cond}


def guided_prediction(bundle, latents: torch.Tensor, t, cond: dict[str, torch.Tensor],
                      uncond: dict[str, torch.Tensor] | None, guidance_scale: float, *,
                      detach_uncond: bool = False) -> torch.Tensor:
    """Classifier-free guidance u + w (c - u) with one batched denoiser call on [uncond; cond].

    cond / uncond: Conditioning dicts with one row per latent row (ModelBundle.encode_prompt, repeated); t: a
    scalar or (N,) in the denoiser's units. guidance_scale <= 1 or uncond None: the conditional prediction alone
    (one call on N rows). detach_uncond: no gradient through the unconditional half (Flow-GRPO's training step).
    """
    n = latents.shape[0]
    t = torch.as_tensor(t, device=latents.device)
    if t.ndim == 0:
        t = t.expand(n)
    if uncond is None or guidance_scale <= 1.0:
        return bundle.denoise(latents, t, cond)
    pred = bundle.denoise(torch.cat([latents, latents]), torch.cat([t, t]), _cat_conditioning(cond, uncond))
    pred_uncond, pred_cond = pred[:n], pred[n:]
    if detach_uncond:
        pred_uncond = pred_uncond.detach()
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)


# ---------------------------------------------------------------------------------------------- noise


def seeded_normal(seed: int, epoch: int, prompt_ids, per_prompt: int, shape: tuple[int, ...], what: str
                  ) -> torch.Tensor:
    """(len(prompt_ids) * per_prompt, *shape) float32 standard-normal noise on the CPU, prompt-major.

    Prompt p's block is drawn from its own generator seeded by (seed, epoch, p, "online/" + what), e.g.
    what = "init" for the initial latents or f"step{i}" for step i's variance noise, so it does not depend on
    which other prompts share the batch or the rank.
    """
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.reshape(-1).tolist()
    # ids are prompt-file ids (strings such as "train-00012") or integers; both key the generator as text
    blocks = [torch.randn((per_prompt, *shape), generator=group_generator(seed, epoch, p, f"online/{what}"))
              for p in prompt_ids]
    if not blocks:
        return torch.zeros((0, *shape))
    return torch.cat(blocks)
