"""Pure-PyTorch reference of the preference-loss ops: the oracle for every kernel, and the CPU fallback.

Conventions (one prompt group g = K samples that share timestep t_g and noise eps_g; pairs are K=2):
- samples are laid out as N rows, groups contiguous, described by `offsets` (B+1,) int64 with
  group g = rows offsets[g]:offsets[g+1] (uniform groups: offsets = arange(0, N+1, K));
- per-sample error e_i = w_i * mean over (C,H,W) of (pred_i - target_i)^2, accumulated in float32
  (float64 for float64 inputs); e^ref likewise from the reference prediction;
- s_i = e^pol_i - e^ref_i: lower means the policy prefers sample i more than the reference does;
- a pair (i, j) of one group is "ordered" when scores_i > scores_j (i is better); its margin is
  m_ij = s_j - s_i and the pair loss is, with x = beta * m_ij,
      sigmoid: softplus(-x) = -log sigmoid(x)      hinge: relu(1 - x)      ipo: (m_ij - 1/(2 beta))^2
- group loss = sum_ij D_ij f(m_ij) / sum_ij D_ij over ordered pairs (0 when that sum is 0), with
      uniform weighting: D_ij = 1
      dcg weighting (RankDPO): D_ij = |G_i - G_j| * |1/log2(1 + tau_i) - 1/log2(1 + tau_j)|,
      G_i = 2^scores_i - 1 and tau_i = 1-based rank of i in the group sorted by ascending s
      (the policy's own ordering; ties broken by row index; no gradient flows through tau).
  With K=2 and scores (1, 0) both weightings reduce to Diffusion-DPO on the pair (winner first).
- beta multiplies the margin directly: the published SD1.5/SDXL Diffusion-DPO setting
  (`-0.5 * beta_dpo * (model_diff - ref_diff)` with beta_dpo = 5000) is beta = 2500 here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = {"sigmoid": 0, "hinge": 1, "ipo": 2}
PAIR_WEIGHTINGS = {"uniform": 0, "dcg": 1}
# Per-group statistics returned next to the loss, in this column order.
STAT_COLUMNS = ("weight_sum", "num_pairs", "num_correct", "margin_sum")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sample_errors_reference(
    pred: torch.Tensor,
    target: torch.Tensor,
    ref_pred: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(e_pol, e_ref): weighted per-sample mean squared errors, shape (N,), float32 (float64 for float64)."""
    acc = accumulation_dtype(pred.dtype)
    target = target.to(acc)

    def error(prediction: torch.Tensor) -> torch.Tensor:
        err = (prediction.to(acc) - target).square().flatten(1).mean(dim=1)
        return err * weight.to(acc) if weight is not None else err

    e_ref = error(ref_pred.detach()) if ref_pred is not None else None
    return error(pred), e_ref


def uniform_offsets(num_samples: int, group_size: int, device=None) -> torch.Tensor:
    if group_size < 1 or num_samples % group_size != 0:
        raise ValueError(
            f"group_size={group_size} must be >= 1 and divide the number of samples N={num_samples}"
        )
    return torch.arange(0, num_samples + 1, group_size, device=device, dtype=torch.int64)


def pad_groups(values: torch.Tensor, offsets: torch.Tensor, fill: float = 0.0):
    """Scatter a (N,) vector into a (B, K_max) matrix by group, with the validity mask."""
    lengths = offsets[1:] - offsets[:-1]
    k_max = int(lengths.max()) if lengths.numel() else 0
    slot = torch.arange(k_max, device=values.device)
    mask = slot[None, :] < lengths[:, None]
    rows = (offsets[:-1, None] + slot[None, :]).clamp(max=max(values.shape[0] - 1, 0))
    padded = torch.where(mask, values[rows], torch.full_like(values[rows], fill))
    return padded, mask


def pair_loss(margin: torch.Tensor, beta: float, loss_type: str) -> torch.Tensor:
    x = beta * margin
    if loss_type == "sigmoid":
        return F.softplus(-x)
    if loss_type == "hinge":
        return F.relu(1.0 - x)
    if loss_type == "ipo":
        return (margin - 1.0 / (2.0 * beta)).square()
    raise ValueError(f"loss_type must be one of {sorted(LOSS_TYPES)}, got {loss_type!r}")


def policy_ranks(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1-based rank of each slot when its group is sorted by ascending s (ties by index)."""
    s_i, s_j = s[:, :, None], s[:, None, :]
    slot = torch.arange(s.shape[1], device=s.device)
    before = (s_j < s_i) | ((s_j == s_i) & (slot[None, None, :] < slot[None, :, None]))
    return 1 + (before & mask[:, None, :]).sum(dim=2)


def _ordered_pair_terms(s, scores, offsets, weighting):
    """Padded (B, K, K) pair terms shared by the loss and its analytic gradient."""
    if weighting not in PAIR_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {sorted(PAIR_WEIGHTINGS)}, got {weighting!r}")
    acc = accumulation_dtype(s.dtype)
    s_pad, mask = pad_groups(s.to(acc), offsets)
    psi, _ = pad_groups(scores.to(acc), offsets)
    valid = mask[:, :, None] & mask[:, None, :]
    ordered = valid & (psi[:, :, None] > psi[:, None, :])
    margin = s_pad[:, None, :] - s_pad[:, :, None]  # m_ij = s_j - s_i
    if weighting == "dcg":
        gain = torch.exp2(psi) - 1.0
        discount = 1.0 / torch.log2(1.0 + policy_ranks(s_pad.detach(), mask).to(acc))
        pair_weight = (gain[:, :, None] - gain[:, None, :]).abs() * (
            discount[:, :, None] - discount[:, None, :]
        ).abs()
    else:
        pair_weight = torch.ones_like(margin)
    pair_weight = torch.where(ordered, pair_weight, torch.zeros_like(pair_weight))
    return mask, ordered, margin, pair_weight


def _group_stats(ordered, margin, pair_weight, beta):
    acc = margin.dtype
    x = (beta * margin).detach()
    correct = (x > 0).to(acc) + 0.5 * (x == 0).to(acc)
    return torch.stack(
        [
            pair_weight.sum(dim=(1, 2)).detach(),
            ordered.sum(dim=(1, 2)).to(acc),
            torch.where(ordered, correct, torch.zeros_like(correct)).sum(dim=(1, 2)),
            torch.where(ordered, x, torch.zeros_like(x)).sum(dim=(1, 2)),
        ],
        dim=1,
    )


def ranked_pair_loss_reference(
    s: torch.Tensor,
    scores: torch.Tensor,
    offsets: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    weighting: str = "dcg",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per group (B,), stats (B, 4) as STAT_COLUMNS); differentiable w.r.t. s by autograd."""
    mask, ordered, margin, pair_weight = _ordered_pair_terms(s, scores, offsets, weighting)
    acc = margin.dtype
    losses = torch.where(ordered, pair_loss(margin, beta, loss_type), torch.zeros_like(margin))
    weight_sum = pair_weight.sum(dim=(1, 2))
    loss = (pair_weight * losses).sum(dim=(1, 2)) / weight_sum.clamp_min(torch.finfo(acc).tiny)
    loss = torch.where(weight_sum > 0, loss, torch.zeros_like(loss))
    return loss, _group_stats(ordered, margin, pair_weight, beta)


def pair_loss_derivative(margin: torch.Tensor, beta: float, loss_type: str) -> torch.Tensor:
    """d pair_loss / d margin, matching autograd of `pair_loss` (relu'(0) = 0, softplus in closed form)."""
    x = beta * margin
    if loss_type == "sigmoid":
        return -beta * torch.sigmoid(-x)
    if loss_type == "hinge":
        return torch.where(1.0 - x > 0, torch.full_like(x, -beta), torch.zeros_like(x))
    if loss_type == "ipo":
        return 2.0 * (margin - 1.0 / (2.0 * beta))
    raise ValueError(f"loss_type must be one of {sorted(LOSS_TYPES)}, got {loss_type!r}")


def ranked_pair_loss_with_grad_reference(
    s: torch.Tensor,
    scores: torch.Tensor,
    offsets: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    weighting: str = "dcg",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel contract in closed form: (loss per group (B,), grad_s (N,), stats (B, 4)).

    grad_s = d(sum_g loss_g)/ds without autograd (usable where autograd is off, e.g. inside a
    custom op): with G_ij = D_ij f'(m_ij) / sum D and m_ij = s_j - s_i,
    dL/ds_k = sum_i G_ik - sum_j G_kj.
    """
    loss, stats = ranked_pair_loss_reference(s.detach(), scores, offsets, beta, loss_type, weighting)
    mask, ordered, margin, pair_weight = _ordered_pair_terms(s.detach(), scores, offsets, weighting)
    weight_sum = pair_weight.sum(dim=(1, 2))
    scale = torch.where(weight_sum > 0, 1.0 / weight_sum.clamp_min(torch.finfo(margin.dtype).tiny), 0.0)
    slope = pair_weight * torch.where(
        ordered, pair_loss_derivative(margin, beta, loss_type), torch.zeros_like(margin)
    )
    slope = slope * scale[:, None, None]
    grad_pad = slope.sum(dim=1) - slope.sum(dim=2)
    slot = torch.arange(mask.shape[1], device=s.device)
    rows = offsets[:-1, None] + slot[None, :]
    grad_s = torch.zeros(s.shape[0], dtype=margin.dtype, device=s.device)
    grad_s[rows[mask]] = grad_pad[mask]
    return loss, grad_s, stats


def sample_errors_backward_reference(
    grad_e: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """d(sum_i grad_e_i * e_pol_i)/d pred = grad_e_i * w_i * 2/D * (pred_i - target_i), in pred's dtype."""
    acc = accumulation_dtype(pred.dtype)
    scale = grad_e.to(acc) * (2.0 / max(pred[0].numel() if pred.shape[0] else 1, 1))
    if weight is not None:
        scale = scale * weight.to(acc)
    scale = scale.reshape((-1,) + (1,) * (pred.dim() - 1))
    return (scale * (pred.to(acc) - target.to(acc))).to(pred.dtype)


# ---------------------------------------------------------------------------------------------
# Online methods: per-step Gaussian policies (SPO, GRPO). One step x_{t-1} ~ N(mean_i, std_i^2 I)
# per row i; log-densities are averaged (not summed) over the non-batch dims, as the SPO and
# Flow-GRPO code do, so their scale does not depend on the resolution.
# ---------------------------------------------------------------------------------------------

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def row_std(std, num_rows: int, dtype: torch.dtype, device) -> torch.Tensor:
    """std as an (N,) vector: a number, a 0-d / 1-element tensor, (N,), or (N, 1, ..., 1)."""
    std = torch.as_tensor(std, dtype=dtype, device=device)
    if std.numel() == 1:
        return std.reshape(1).expand(num_rows)
    if std.shape[0] != num_rows or std.numel() != num_rows:
        raise ValueError(
            f"std must be one value per row (a number, (N,) or (N, 1, ..., 1) with N={num_rows}), "
            f"got shape {tuple(std.shape)}"
        )
    return std.reshape(num_rows)


def gaussian_log_prob_reference(x: torch.Tensor, mean: torch.Tensor, std) -> torch.Tensor:
    """(N,) log N(x_i; mean_i, std_i^2 I) averaged over the non-batch dims (the oracle's way, elementwise)."""
    acc = accumulation_dtype(mean.dtype)
    sigma = row_std(std, mean.shape[0], acc, mean.device).reshape((-1,) + (1,) * (mean.dim() - 1))
    density = -(x.to(acc) - mean.to(acc)).square() / (2.0 * sigma.square()) - torch.log(sigma) - LOG_SQRT_2PI
    return density.flatten(1).mean(dim=1)


def spo_loss_reference(
    policy_mean: torch.Tensor,
    reference_mean: torch.Tensor,
    sample: torch.Tensor,
    std,
    beta: float = 10.0,
    clip_eps: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPO's loss written as its code does (RockeyCoss/SPO train_spo.py), rows winner first:

        ratio_i = clamp(exp(logp_pol_i - logp_ref_i), 1 - eps, 1 + eps)
        loss = mean over pairs of -log sigmoid(beta * log ratio_w - beta * log ratio_l)

    (with softplus in place of -log(sigmoid(.)), which underflows to inf for very negative
    arguments). Returns (loss, unclamped log ratio (N,)); differentiable w.r.t. policy_mean.
    """
    log_ratio = gaussian_log_prob_reference(sample, policy_mean, std) - gaussian_log_prob_reference(
        sample, reference_mean.detach(), std
    )
    ratio = torch.clamp(torch.exp(log_ratio), 1.0 - clip_eps, 1.0 + clip_eps)
    log_clamped = torch.log(ratio)
    loss = F.softplus(-(beta * log_clamped[0::2] - beta * log_clamped[1::2])).mean()
    return loss, log_ratio


def grpo_loss_reference(
    policy_mean: torch.Tensor,
    reference_mean: torch.Tensor | None,
    sample: torch.Tensor,
    std,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    kl_beta: float,
    kl_std=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flow-GRPO's per-step loss (yifan123/flow_grpo scripts/train_sd3.py):

        log_prob_i = log N(sample_i; policy_mean_i, std_i^2) averaged over dims
        ratio_i = exp(log_prob_i - old_log_prob_i)
        policy_loss = mean_i max(-A_i ratio_i, -A_i clamp(ratio_i, 1 - clip, 1 + clip))
        kl = mean_i mean_dims((policy_mean_i - reference_mean_i)^2) / (2 kl_std_i^2)
        loss = policy_loss + kl_beta * kl

    kl_std defaults to std; Flow-GRPO's SD3 code divides by its std_dev_t, the SDE's sigma_t
    *without* the sqrt(dt) factor that its log-density's std has, so pass kl_std for that.
    Returns (loss, log_prob (N,), policy_loss, kl); differentiable w.r.t. policy_mean.
    """
    acc = accumulation_dtype(policy_mean.dtype)
    log_prob = gaussian_log_prob_reference(sample, policy_mean, std)
    ratio = torch.exp(log_prob - old_log_prob.to(acc))
    adv = advantages.to(acc)
    policy_loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)).mean()
    if reference_mean is None:
        kl = torch.zeros((), dtype=acc, device=policy_mean.device)
    else:
        sigma = row_std(std if kl_std is None else kl_std, policy_mean.shape[0], acc, policy_mean.device)
        div = (policy_mean.to(acc) - reference_mean.detach().to(acc)).square().flatten(1).mean(dim=1)
        kl = (div / (2.0 * sigma.square())).mean()
    return policy_loss + kl_beta * kl, log_prob, policy_loss, kl


def step_errors_reference(
    pred: torch.Tensor, target: torch.Tensor, ref_pred: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(e_pol, e_div): mean over the non-batch dims of (pred - target)^2 and of (pred - ref_pred)^2.

    The fused pass of a per-step Gaussian policy: pred = policy mean, target = the taken sample,
    ref_pred = reference mean; e_pol gives the log-density, e_div the KL between the two Gaussians.
    """
    acc = accumulation_dtype(pred.dtype)
    pred_acc = pred.to(acc)
    e_pol = (pred_acc - target.to(acc)).square().flatten(1).mean(dim=1)
    e_div = (pred_acc - ref_pred.detach().to(acc)).square().flatten(1).mean(dim=1)
    return e_pol, e_div


def step_errors_backward_reference(
    grad_pol: torch.Tensor, grad_div: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, ref_pred: torch.Tensor
) -> torch.Tensor:
    """d(sum_i grad_pol_i e_pol_i + grad_div_i e_div_i)/d pred, in pred's dtype."""
    acc = accumulation_dtype(pred.dtype)
    shape = (-1,) + (1,) * (pred.dim() - 1)
    two_over_d = 2.0 / max(pred[0].numel() if pred.shape[0] else 1, 1)
    pred_acc = pred.to(acc)
    grad = (grad_pol.to(acc) * two_over_d).reshape(shape) * (pred_acc - target.to(acc)) + (
        grad_div.to(acc) * two_over_d
    ).reshape(shape) * (pred_acc - ref_pred.to(acc))
    return grad.to(pred.dtype)
