"""Objective name -> which images of each prompt group enter the step, and the fastpref.ops call on them.

A batch holds B prompt groups of K images with Syn-Pic scores psi (B, K). Pairwise objectives (dpo, cpo, mapo)
train on the best and the worst image of each group (the RankDPO paper's DPO baseline on the same data) and
never run the denoiser on the others; sft trains on the best image only; rankdpo and kto use all K.

`feature_space` says where the per-sample errors are measured: "latent" (the denoiser's output against its
target, as Diffusion-DPO / RankDPO publish) or "ncp" (Noise-Conditioned Perception: the features of the frozen
initial U-Net's encoder at t-1, fastpref/train/ncp.py) for dpo, rankdpo, cpo and sft. Both go through the same
fastpref.ops call: NCP only replaces (pred, target, ref_pred) by their flattened features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fastpref import ops
from fastpref.config import ConfigError

# grpo / spo / draft: online methods (the policy samples while training), trained by fastpref/train/online.py with
# their settings in the train config's `online:` section; whether they run a reference depends on those settings
ObjectiveName = Literal["rankdpo", "dpo", "cpo", "sft", "mapo", "kto", "grpo", "spo", "draft"]
NEEDS_REFERENCE = {"rankdpo": True, "dpo": True, "kto": True, "cpo": False, "sft": False, "mapo": False,
                   "grpo": True, "spo": True, "draft": True}
# the objectives NCP composes with: the paper's DPO, CPO and SFT, and RankDPO (its margins are DPO's)
NCP_OBJECTIVES = ("rankdpo", "dpo", "cpo", "sft")
# beta when the recipe sets none, per objective: Diffusion-DPO's published SD1.5/SDXL setting in this convention
# (their 0.5 * beta_dpo with beta_dpo = 5000) for dpo / rankdpo / cpo, Diffusion-KTO's 1000 for kto (as
# ops.kto_loss). mapo's coefficient is mapo_beta, sft has none: beta stays null for them.
DEFAULT_BETA = {"rankdpo": 2500.0, "dpo": 2500.0, "cpo": 2500.0, "kto": 1000.0}


@dataclass
class ObjectiveConfig:
    name: ObjectiveName = "rankdpo"
    # margin coefficient of dpo / rankdpo / cpo / kto; null: the objective's default (DEFAULT_BETA), resolved at
    # construction so that the run's saved config.yaml shows the value used
    beta: float | None = None
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    weighting: Literal["dcg", "uniform"] = "dcg"  # rankdpo pair weights
    cpo_sft_weight: float = 1.0
    mapo_beta: float = 0.1
    mapo_snr_value: float = 0.5
    kto_desirable_threshold: float = 0.5  # psi >= threshold is "desirable"
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    min_snr_gamma: float | None = None  # per-sample min-SNR weight (epsilon / v models only)
    # "ncp": errors in the frozen initial U-Net encoder's features at t-1 (fastpref/train/ncp.py; sd / sdxl,
    # live reference only); ncp_layers: "multiscale" (conv_in + every down block + mid block), "mid", "down"
    feature_space: Literal["latent", "ncp"] = "latent"
    ncp_layers: Literal["multiscale", "mid", "down"] = "multiscale"
    # flow models (sd3): what the per-sample error measures (ModelBundle.error_space_weight), a per-timestep weight on
    # the velocity error: x0 = sigma^2 x, eps = (1 - sigma)^2 x, velocity = 1 x; auto = x0, what diffusers' SD3
    # scripts train (--precondition_outputs 1). eps / v-prediction models: auto only
    error_space: Literal["auto", "velocity", "x0", "eps"] = "auto"

    def __post_init__(self):
        if self.beta is None:
            self.beta = DEFAULT_BETA.get(self.name)

    def validate(self):
        if self.beta is not None and self.beta <= 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        # a setting the chosen objective would silently ignore is a mistake in the recipe, not a no-op
        if self.loss_type != "sigmoid" and self.name not in ("dpo", "rankdpo"):
            raise ConfigError(f"loss_type: {self.loss_type!r} applies to objectives dpo and rankdpo only; "
                              f"{self.name!r} has one loss (leave loss_type: sigmoid)")
        if self.weighting != "dcg" and self.name != "rankdpo":
            raise ConfigError(f"weighting: {self.weighting!r} applies to rankdpo only (its pair weights); "
                              f"{self.name!r} has none (leave weighting: dcg)")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ConfigError(f"min_snr_gamma: must be > 0 or null, got {self.min_snr_gamma}")
        if self.feature_space == "ncp":
            if self.name not in NCP_OBJECTIVES:
                raise ConfigError(f"feature_space: 'ncp' composes with objectives {list(NCP_OBJECTIVES)}, "
                                  f"not {self.name!r}")
            if self.min_snr_gamma is not None:
                raise ConfigError("min_snr_gamma: must be null with feature_space: ncp (min-SNR weights latent-space "
                                  "errors at t; NCP's errors are encoder features at t-1)")

    @property
    def needs_reference(self) -> bool:
        """Whether training needs a reference model: for the reference errors, or (NCP) for the frozen initial
        denoiser whose encoder is the feature extractor, reference-free objectives included."""
        return NEEDS_REFERENCE[self.name] or self.feature_space == "ncp"

    @property
    def compares_to_reference(self) -> bool:
        """Whether the loss takes reference errors (e_ref or ref_pred)."""
        return NEEDS_REFERENCE[self.name]


def select_images(cfg: ObjectiveConfig, psi: torch.Tensor | None, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept group indices (B',), image index per kept group (B', k)) for this objective.

    Pairwise objectives drop groups whose images all tie (no preference to learn from).
    """
    num_groups = psi.shape[0] if psi is not None else None
    if cfg.name in ("rankdpo", "kto"):
        if psi is None:
            raise ValueError(f"objective {cfg.name} needs psi scores: label the dataset first")
        return torch.arange(num_groups, device=psi.device), torch.arange(group_size, device=psi.device).expand(num_groups, -1)
    if psi is None:
        raise ValueError(f"objective {cfg.name} needs psi scores to pick the best/worst images: label the dataset first")
    best = psi.argmax(dim=1)
    if cfg.name == "sft":
        return torch.arange(num_groups, device=psi.device), best[:, None]
    worst = psi.argmin(dim=1)
    kept = (psi.max(dim=1).values > psi.min(dim=1).values).nonzero().flatten()
    return kept, torch.stack([best[kept], worst[kept]], dim=1)


def compute_loss(
    cfg: ObjectiveConfig,
    pred: torch.Tensor,
    target: torch.Tensor,
    psi: torch.Tensor,
    e_ref: torch.Tensor | None,
    ref_pred: torch.Tensor | None,
    weight: torch.Tensor | None,
    group_size: int,
    backend: str,
) -> ops.PreferenceLossOutput:
    """The objective on rows laid out group by group as `select_images` ordered them (best first for pairs)."""
    reference = {"ref_pred": ref_pred, "ref_errors": e_ref}
    if cfg.name == "rankdpo":
        return ops.rank_dpo_loss(pred, target, psi, **reference, group_size=group_size, weight=weight, beta=cfg.beta,
                                 loss_type=cfg.loss_type, weighting=cfg.weighting, backend=backend)
    if cfg.name == "dpo":
        return ops.diffusion_dpo_loss(pred, target, **reference, weight=weight, beta=cfg.beta,
                                      loss_type=cfg.loss_type, backend=backend)
    if cfg.name == "kto":
        desirable = psi >= cfg.kto_desirable_threshold
        return ops.kto_loss(pred, target, desirable, **reference, weight=weight, beta=cfg.beta,
                            desirable_weight=cfg.kto_desirable_weight,
                            undesirable_weight=cfg.kto_undesirable_weight, backend=backend)
    if cfg.name == "cpo":
        return ops.cpo_loss(pred, target, weight=weight, beta=cfg.beta, sft_weight=cfg.cpo_sft_weight, backend=backend)
    if cfg.name == "mapo":
        return ops.mapo_loss(pred, target, weight=weight, beta=cfg.mapo_beta, snr_value=cfg.mapo_snr_value,
                             backend=backend)
    if cfg.name == "sft":
        return ops.sft_loss(pred, target, scores=None, group_size=1, weight=weight, backend=backend)
    raise ValueError(f"unknown objective {cfg.name!r}")


def min_snr_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """min(SNR, gamma) / SNR for epsilon targets, min(SNR, gamma) / (SNR + 1) for v targets (Hang et al. 2023)."""
    alpha_bar = alphas_cumprod.to(t.device)[t.long()]
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"min_snr_gamma is defined for epsilon / v_prediction models, not {prediction_type!r}")
