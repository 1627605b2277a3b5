"""NCP: preference losses measured in the feature space of the frozen initial denoiser's U-Net encoder.

Noise-Conditioned Perception (Gambashidze, Kulikov, Sosnin, Makarov 2024, "Aligning Diffusion Models with
Noise-Conditioned Perception", arXiv:2406.17636). Followed: the authors' code,
github.com/sakharok13/Aligning-Stable-Diffusion-with-Noise-Conditioned-Perception, `src/train/train_sd15.py` and
`train_SDXL.py` with `--method encoder` and the default `--timestep t-1` (SDXL: `--timestep_type -1`), the
DDPM step of `src/train/scheduler_utils.py` (`ddpm_scheduler_step_batched`) and the encoder pass of
`src/train/model_utils.py` (`get_unet_middle_states`). Re-implemented here, not copied.

Per group (one t, one eps and one extra noise z shared by its images, all drawn from (seed, epoch, group id)):

    s = max(t - 1, 0)                                           the encoder's timestep ("t-1")
    x0_hat(o) = (x_t - sqrt(1 - abar_t) o) / sqrt(abar_t)       epsilon models
              = sqrt(abar_t) x_t - sqrt(1 - abar_t) o           v-prediction models
              (clamped to +-clip_sample_range when the scheduler clips)
    a = abar_t / abar_s,  b = 1 - a
    mu(o) = sqrt(abar_s) b / (1 - abar_t) * x0_hat(o) + sqrt(a) (1 - abar_s) / (1 - abar_t) * x_t
    sigma^2 = max((1 - abar_s) / (1 - abar_t) * b, 1e-20)       variance_type fixed_small (SD / SDXL)
            = b                                                 variance_type fixed_large
    sigma = 0 where t = 0                                       (then s = 0, a = 1, mu = x_t: the group gets margin 0)
    x_s(o) = mu(o) + sigma z                                    the DDPM posterior step t -> t-1

    o is the policy's prediction, the reference's prediction, or the true target (eps or v: then x0_hat = x0).
    F(x) = features of x at timestep s, prompt c, of the frozen *initial* denoiser E (LoRA: the policy with its
    adapters disabled; full fine-tuning: the frozen copy): with H_0 = conv_in output, H_1..H_n = the down blocks'
    outputs, H_mid = the mid block's output (fastpref.models.bundle.unet_encoder_features),
        "multiscale" (default): concat_i (D_mid / D_i) * H_i over [H_0, H_1, ..., H_n, H_mid], D_i = per-sample
                     numel of H_i; the authors' multi-head run (`--use_middle_states
                     --collect_intermediate_steps=True --normalize_intermediate_steps=True`; their reshape of each
                     H_i to the smallest resolution does not change the mean squared error);
        "mid":       H_mid (`--use_middle_states`);
        "down":      H_n, the last down block's output (their default, as in `train_sdxl_dpo_encoder.sh`).

    e_pol = mean (F(x_s(pred)) - F(x_s(target)))^2,   e_ref = mean (F(x_s(ref_pred)) - F(x_s(target)))^2

and e_pol / e_ref go into the same fastpref.ops objective as in latent space (dpo, rankdpo, cpo, sft), which
`ncp_features` achieves by handing the ops the flattened features (N, D) in place of (pred, target, ref_pred).
Gradients reach the policy through E (E's weights get none: frozen, or base weights under disabled adapters);
F(x_s(target)) and F(x_s(ref_pred)) carry no gradient.

Differences from the reference code, on purpose: z is drawn per group from (seed, epoch, group id) like eps (so a
resumed run is exact and a group's images share it, as their pairs do); the RankDPO composition is ours (they
train DPO, CPO and SFT).

Not supported (refused by `check_supported`): flow-matching models (SD3's MMDiT has no encoder half and no DDPM
posterior step; an analogue such as the first transformer blocks at sigma - 1/T would be our invention, not NCP),
cached reference errors (latent-space errors of the reference), schedulers with thresholding or learned variance.
"""

from __future__ import annotations

import torch

from fastpref.config import ConfigError
from fastpref.data.noise import group_generator

NCP_LAYERS = ("multiscale", "mid", "down")
LIVE_REFERENCE_MODES = ("adapters_off", "frozen_copy")
VARIANCE_TYPES = ("fixed_small", "fixed_large")


def check_supported(bundle, reference_mode: str) -> None:
    """ConfigError unless NCP can run on this model with this reference (before any step runs)."""
    if reference_mode not in LIVE_REFERENCE_MODES:
        raise ConfigError(
            f"reference: {reference_mode!r} cannot serve objective.feature_space: ncp, which runs the frozen initial "
            f"denoiser live (its encoder is the feature extractor and the reference's x_(t-1) must be re-encoded); "
            f"set reference to one of {list(LIVE_REFERENCE_MODES)} ('adapters_off' for mode: lora, 'frozen_copy' for "
            "mode: full). 'auto' picks 'cached' when the dataset holds cached e_ref: name the live mode explicitly."
        )
    if bundle.prediction_type not in ("epsilon", "v_prediction"):
        raise ConfigError(
            f"objective.feature_space: ncp needs a DDPM-trained U-Net (families sd, sdxl); the {bundle.family!r} "
            f"model predicts {bundle.prediction_type!r}: a flow-matching transformer (SD3's MMDiT) has neither an "
            "encoder half nor the DDPM posterior step NCP is defined with"
        )
    if not hasattr(bundle.denoiser, "down_blocks"):
        raise ConfigError(f"objective.feature_space: ncp needs a U-Net denoiser, got {type(bundle.denoiser).__name__}")
    config = bundle.noise_scheduler.config
    if getattr(config, "thresholding", False):
        raise ConfigError("objective.feature_space: ncp does not support a scheduler with thresholding")
    variance_type = getattr(config, "variance_type", "fixed_small")
    if variance_type not in VARIANCE_TYPES:
        raise ConfigError(f"objective.feature_space: ncp supports scheduler variance_type {list(VARIANCE_TYPES)}, "
                          f"not {variance_type!r}")


def draw_variance_noise(seed: int, epoch: int, group_ids, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """(G, *latent_shape): the z of each group's DDPM step t -> t-1, a pure function of (seed, epoch, group id)."""
    ids = group_ids.reshape(-1).tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)
    noises = [torch.randn(tuple(latent_shape), generator=group_generator(seed, epoch, int(g), "ncp-variance"))
              for g in ids]
    return torch.stack(noises) if noises else torch.zeros((0, *latent_shape))


def previous_timesteps(t: torch.Tensor) -> torch.Tensor:
    """s = max(t - 1, 0), the encoder's timestep (as the reference code clamps it)."""
    return (t.long() - 1).clamp_min(0)


def ddpm_previous_sample(scheduler, prediction_type: str, model_output: torch.Tensor, x_t: torch.Tensor,
                         t: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x_s = mu(x0_hat(model_output), x_t) + sigma z, the DDPM posterior step t -> s (formulas in the module doc),
    in float32 (float64 for float64 inputs), differentiable with respect to model_output."""
    config = scheduler.config
    dtype = torch.promote_types(model_output.dtype, torch.float32)
    alphas_cumprod = scheduler.alphas_cumprod.to(device=x_t.device, dtype=dtype)
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    abar_t = alphas_cumprod[t.long()].view(shape)
    abar_s = alphas_cumprod[s.long()].view(shape)
    x_t = x_t.to(dtype)
    out = model_output.to(dtype)
    if prediction_type == "epsilon":
        x0_hat = (x_t - (1 - abar_t).sqrt() * out) / abar_t.sqrt()
    elif prediction_type == "v_prediction":
        x0_hat = abar_t.sqrt() * x_t - (1 - abar_t).sqrt() * out
    else:
        raise ValueError(f"the DDPM step t -> t-1 needs an epsilon or v_prediction model, not {prediction_type!r}")
    if getattr(config, "clip_sample", False):
        x0_hat = x0_hat.clamp(-config.clip_sample_range, config.clip_sample_range)
    alpha = abar_t / abar_s
    beta = 1 - alpha
    mean = (abar_s.sqrt() * beta / (1 - abar_t)) * x0_hat + (alpha.sqrt() * (1 - abar_s) / (1 - abar_t)) * x_t
    if getattr(config, "variance_type", "fixed_small") == "fixed_large":
        variance = beta
    else:
        variance = ((1 - abar_s) / (1 - abar_t) * beta).clamp_min(1e-20)
    sigma = torch.where(t.long().view(shape) == 0, torch.zeros_like(variance), variance.sqrt())
    return mean + sigma * z.to(dtype)


def flatten_features(features: list[torch.Tensor], layers: str) -> torch.Tensor:
    """(N, D): the encoder features [H_0, H_1..H_n, H_mid] as the vector NCP compares (see the module doc)."""
    if layers == "down":
        return features[-2].flatten(1)
    if layers == "mid":
        return features[-1].flatten(1)
    if layers != "multiscale":
        raise ValueError(f"unknown ncp_layers {layers!r} (expected one of {NCP_LAYERS})")
    final = features[-1][0].numel()
    return torch.cat([h.flatten(1) * (final / h[0].numel()) for h in features], dim=1)


def ncp_features(bundle, encode, noisy: torch.Tensor, t: torch.Tensor, cond: dict, z: torch.Tensor,
                 pred: torch.Tensor, target: torch.Tensor, ref_pred: torch.Tensor | None,
                 layers: str = "multiscale") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(F(x_s(pred)), F(x_s(target)), F(x_s(ref_pred)) or None), each (N, D), for the fastpref.ops losses.

    `encode(latents, timesteps, cond)` runs the frozen initial denoiser's encoder on float32 (or float64) latents (a list of
    hidden states, e.g. ReferenceModel.encoder_features); only the policy's features keep a graph (through `pred`).
    """
    s = previous_timesteps(t)

    def step(output: torch.Tensor) -> torch.Tensor:
        return ddpm_previous_sample(bundle.noise_scheduler, bundle.prediction_type, output, noisy, t, s, z)

    policy = flatten_features(encode(step(pred), s, cond), layers)
    with torch.no_grad():
        # each in a pass of the policy's own N rows, never one pass of 2N: the same inputs then give bitwise the same
        # features, so a policy equal to the reference (LoRA at its start) has e_pol == e_ref exactly and RankDPO's
        # policy ranks tie-break by row index. A 2N-row pass rounds differently from the N-row one; that noise then
        # decided the ranks, and the step depended on the per-process batch (1 process != 2 with the same global batch)
        fixed = flatten_features(encode(step(target.detach()), s, cond), layers)
        reference = flatten_features(encode(step(ref_pred.detach()), s, cond), layers) if ref_pred is not None else None
    return policy, fixed, reference
