"""Losses of the online methods, whose policy is a Gaussian step x_{t-1} ~ N(mean_i, std_i^2 I) per
row (DDIM with eta > 0, Flow-GRPO's SDE step): SPO's clipped step-wise preference loss and GRPO's
clipped-ratio loss with a KL to the reference.

Both are written on the fused per-sample passes, so the only reads of the big tensors are one pass
over policy mean, sample (and reference mean) forward and one backward pass writing the gradient:

    log N(x_i; m_i, s_i^2) averaged over the D dims = -e_i / (2 s_i^2) - log s_i - log sqrt(2 pi),
    e_i = mean((x_i - m_i)^2)

SPO:  log r_i = logp_pol_i - logp_ref_i = (e_ref_i - e_pol_i) / (2 s_i^2)   -> sample_errors
GRPO: log_prob_i from e_pol_i; KL_i = mean((m_pol_i - m_ref_i)^2) / (2 s_i^2) -> step_errors
The rest is arithmetic on (N,) vectors. The semantics (the oracles) are reference.spo_loss_reference
and reference.grpo_loss_reference; DRaFT+'s KL is sample_errors(eps_pol, eps_ref) directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastpref.ops import library
from fastpref.ops.losses import PreferenceLossOutput, _pair_layout, _pair_metrics
from fastpref.ops.reference import LOG_SQRT_2PI, accumulation_dtype, row_std


@dataclass
class PolicyLossOutput:
    """loss: scalar to backpropagate. log_prob: (N,) per-row log-density of the sample under the
    policy (averaged over dims; carries the gradient). metrics: detached scalars by name."""

    loss: torch.Tensor
    log_prob: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    def log_dict(self, prefix: str = "") -> dict[str, float]:
        values = {"loss": self.loss, **self.metrics}
        return {prefix + name: float(value.detach()) for name, value in values.items()}


def _check_std(std, pred: torch.Tensor, name: str = "std") -> torch.Tensor:
    if isinstance(std, torch.Tensor) and std.requires_grad:
        raise ValueError(f"{name} requires grad, but the online losses treat it as a constant; pass {name}.detach()")
    acc = accumulation_dtype(pred.dtype)
    try:
        sigma = row_std(std, pred.shape[0], acc, pred.device)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    if sigma.device.type == "cpu" and not torch.compiler.is_compiling() and sigma.numel():
        if not bool((sigma > 0).all()) or not bool(torch.isfinite(sigma).all()):
            raise ValueError(f"{name} must be positive and finite in every row, got min {float(sigma.min())}")
    return sigma


def _check_row_vector(value: torch.Tensor, name: str, pred: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(value, device=pred.device)
    if tuple(value.shape) != (pred.shape[0],):
        raise ValueError(f"{name} must have shape (N,) = ({pred.shape[0]},), got {tuple(value.shape)}")
    return value.detach().to(accumulation_dtype(pred.dtype))


def clamped_log_ratio(log_ratio: torch.Tensor, clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log clamp(exp(log_ratio), 1-eps, 1+eps), clipped mask), with SPO's gradient: 1 inside the
    interval and at its edges (torch.clamp passes the gradient at the bounds), 0 beyond them.
    Computed without the exp/log round trip inside, so unclipped rows keep full precision."""
    ratio = torch.exp(log_ratio.detach())
    low, high = 1.0 - clip_eps, 1.0 + clip_eps
    inside = (ratio >= low) & (ratio <= high)
    bound = torch.log(torch.clamp(ratio, low, high))
    return torch.where(inside, log_ratio, bound), ~inside


def spo_loss(
    policy_mean: torch.Tensor,
    reference_mean: torch.Tensor,
    sample: torch.Tensor,
    std,
    *,
    beta: float = 10.0,
    clip_eps: float = 0.1,
    backend: str = "auto",
) -> PreferenceLossOutput:
    """SPO (Liang et al., CVPR 2025; RockeyCoss/SPO) on step-wise winner-first pairs.

    Rows (w0, l0, w1, l1, ...): the two candidates x_{t-1} drawn from the same x_t; policy_mean /
    reference_mean: the Gaussian means of x_{t-1} given x_t under the policy and the reference
    (DDIM eta=1 in SPO); std: the step's std, one per row (number, (N,) or (N,1,..,1)).

        log r_i = logp_pol_i - logp_ref_i = (e_ref_i - e_pol_i) / (2 std_i^2)
        loss = mean over pairs of -log sigmoid(beta * (log r~_w - log r~_l)),
        r~ = clamp(r, 1 - clip_eps, 1 + clip_eps)

    beta=10, clip_eps=0.1: the SPO configs' train.beta / train.eps. Gradient into policy_mean only.
    Metrics: implicit_accuracy (pairs with log r~_w > log r~_l, ties 1/2), margin (mean
    beta*(log r~_w - log r~_l)), log_ratio (mean unclamped log r), clip_fraction (rows whose
    ratio is outside [1-eps, 1+eps]), ratio_win / ratio_lose (mean clamped ratio, as SPO logs),
    e_pol / e_ref. e_pol / e_ref of the output are the per-row errors.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= clip_eps < 1.0:
        raise ValueError(f"clip_eps must be in [0, 1), got {clip_eps}")
    sigma = _check_std(std, policy_mean)
    scores, offsets = _pair_layout(policy_mean.shape[0], policy_mean.device)
    # sample plays the regression target: log r only needs the two errors to the sample.
    e_pol, e_ref = library.sample_errors(policy_mean, sample, reference_mean, None, backend=backend)
    log_ratio = (e_ref - e_pol) / (2.0 * sigma.square())
    clamped, clipped = clamped_log_ratio(log_ratio, clip_eps)
    # s = -log r~ (lower = preferred); the pair margin s_l - s_w = log r~_w - log r~_l.
    loss_per_pair, stats = library.ranked_pair_loss(
        -clamped, scores, offsets, beta, "sigmoid", "uniform", max_group_size=2, backend=backend
    )
    metrics = _pair_metrics(stats, e_pol, e_ref)
    ratio = torch.exp(clamped.detach())
    metrics.update(
        log_ratio=log_ratio.detach().mean(),
        clip_fraction=clipped.to(log_ratio.dtype).mean(),
        ratio_win=ratio[0::2].mean(),
        ratio_lose=ratio[1::2].mean(),
    )
    return PreferenceLossOutput(loss_per_pair.mean(), metrics, e_pol, e_ref)


def grpo_loss(
    policy_mean: torch.Tensor,
    reference_mean: torch.Tensor | None,
    sample: torch.Tensor,
    std,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float,
    kl_beta: float,
    kl_std=None,
    backend: str = "auto",
) -> PolicyLossOutput:
    """GRPO's per-step loss (Flow-GRPO, yifan123/flow_grpo; DanceGRPO for DDIM samplers).

        log_prob_i = log N(sample_i; policy_mean_i, std_i^2 I) averaged over dims
        ratio_i = exp(log_prob_i - old_log_prob_i)
        loss = mean_i max(-A_i ratio_i, -A_i clamp(ratio_i, 1-clip, 1+clip)) + kl_beta * kl
        kl = mean_i mean_dims((policy_mean_i - reference_mean_i)^2) / (2 kl_std_i^2)

    One fused pass over policy_mean, sample and reference_mean (step_errors). kl_std defaults to
    std (the KL of the two step Gaussians); Flow-GRPO's SD3 code divides by its std_dev_t, which
    lacks the sqrt(dt) of the log-density's std: pass kl_std=std_dev_t to reproduce it.
    reference_mean=None: no KL (kl_beta must be 0). advantages are used as given (Flow-GRPO
    clamps them to +-adv_clip_max before this step).
    Metrics: policy_loss, kl, approx_kl = 0.5 mean((log_prob - old)^2), clip_fraction (rows with
    |ratio - 1| > clip), ratio (mean), as Flow-GRPO logs them.
    """
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if not kl_beta >= 0:
        raise ValueError(f"kl_beta must be >= 0, got {kl_beta}")
    if reference_mean is None and kl_beta != 0:
        raise ValueError(f"kl_beta={kl_beta} needs reference_mean (the reference model's step mean); got None")
    sigma = _check_std(std, policy_mean)
    old_log_prob = _check_row_vector(old_log_prob, "old_log_prob", policy_mean)
    advantages = _check_row_vector(advantages, "advantages", policy_mean)
    if reference_mean is None:
        e_pol, _ = library.sample_errors(policy_mean, sample, None, None, backend=backend)
        kl = torch.zeros((), dtype=e_pol.dtype, device=e_pol.device)
    else:
        e_pol, e_div = library.step_errors(policy_mean, sample, reference_mean, backend=backend)
        kl_sigma = sigma if kl_std is None else _check_std(kl_std, policy_mean, "kl_std")
        kl = (e_div / (2.0 * kl_sigma.square())).mean()
    log_prob = -e_pol / (2.0 * sigma.square()) - torch.log(sigma) - LOG_SQRT_2PI
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(-advantages * ratio, -advantages * clipped_ratio).mean()
    loss = policy_loss + kl_beta * kl if kl_beta else policy_loss
    ratio_d = ratio.detach()
    metrics = {
        "policy_loss": policy_loss.detach(),
        "kl": kl.detach(),
        "approx_kl": 0.5 * log_ratio.detach().square().mean(),
        "clip_fraction": ((ratio_d - 1.0).abs() > clip_range).to(ratio_d.dtype).mean(),
        "ratio": ratio_d.mean(),
    }
    return PolicyLossOutput(loss, log_prob, metrics)
