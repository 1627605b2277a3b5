"""One training step on a batch of prompt groups: noise, policy forward, reference errors, loss, backward.

The step never encodes images or text (the cache did) and, with cached reference errors, never runs the
reference model. Every group shares one (t, eps) drawn by fastpref.data.noise from (seed, epoch, group id),
the same draw the cache used for e_ref, so cached and live reference errors agree. With
objective.feature_space: ncp the policy, reference and target predictions are taken one DDPM step to t-1 (one
more noise z per group, from the same seed) and through the frozen initial denoiser's encoder before the loss
(fastpref/train/ncp.py); that needs the live reference.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from fastpref.data.noise import draw_timesteps_and_noise
from fastpref.train import ncp
from fastpref.train.objectives import ObjectiveConfig, compute_loss, min_snr_weight, select_images
# the reference model lives in train/reference.py; its names stay importable from here
from fastpref.train.reference import (ReferenceMode, ReferenceModel, adapters_disabled,  # noqa: F401
                                      checkpointing_paused, frozen_copy, with_denoiser)

@dataclass
class StepOutput:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    num_images: int


def expand_groups(x: torch.Tensor, kept: torch.Tensor, per_group: int) -> torch.Tensor:
    """(B, ...) per-group tensor -> (B' * per_group, ...) per-image rows of the kept groups."""
    return x.index_select(0, kept.to(x.device)).repeat_interleave(per_group, dim=0)


def gather_images(x: torch.Tensor, kept: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, K, ...) -> (B' * k, ...): the selected images of the kept groups, group by group."""
    rows = x.index_select(0, kept.to(x.device))
    index = index.to(x.device)
    picked = torch.gather(rows, 1, index.view(*index.shape, *([1] * (x.ndim - 2))).expand(*index.shape, *x.shape[2:]))
    return picked.flatten(0, 1)


class TrainStep:
    def __init__(self, bundle, denoiser: torch.nn.Module, objective: ObjectiveConfig, reference: ReferenceModel,
                 noise_seed: int, autocast: contextlib.AbstractContextManager | None = None, loss_backend: str = "auto"):
        self.bundle = bundle
        # the trained module may be wrapped (compiled, FSDP, DeepSpeed engine): the bundle's code runs on it
        self.policy = with_denoiser(bundle, denoiser)
        self.objective = objective
        self.reference = reference
        self.noise_seed = noise_seed
        self.autocast = autocast or contextlib.nullcontext()
        self.loss_backend = loss_backend
        # phase(name) -> context manager around the step's phases "data" (the noise draw) and "reference" (a live
        # reference forward): a profiler's hook (bench/step.py times them); by default nothing
        self.phase: Callable[[str], contextlib.AbstractContextManager] = lambda name: contextlib.nullcontext()
        if objective.feature_space == "ncp":
            ncp.check_supported(bundle, reference.mode)

    def preference_groups(self, batch: dict[str, Any]) -> int:
        """How many groups of `batch` its loss is a mean over, by the selection `forward` makes: the groups
        `select_images` keeps (pairwise objectives drop those whose images all tie in psi) and, for rankdpo, of
        those the ones with an ordered pair (rank_dpo_loss means over them). 0: `forward`'s loss is to be weighed 0.
        The loop weighs the micro-batches of an accumulated step by it."""
        psi = batch.get("psi")
        kept, _ = select_images(self.objective, psi, batch["latents"].shape[1])
        if self.objective.name == "rankdpo":
            return int((psi.amax(dim=1) > psi.amin(dim=1)).sum())  # select_images keeps every group
        return int(kept.numel())

    def forward(self, batch: dict[str, Any], epoch: int) -> StepOutput:
        """Loss of one batch (no backward); a loss to be weighed 0 when no group carries a preference."""
        latents = batch["latents"]
        group_size = latents.shape[1]
        psi = batch.get("psi")
        kept, index = select_images(self.objective, psi, group_size)
        if kept.numel() == 0:
            # no group carries a preference (preference_groups is 0: the loop weighs this loss 0); the forward on
            # two images of the first group still runs so that under DDP / FSDP2 / ZeRO every rank joins the
            # backward's collectives
            kept = torch.zeros(1, dtype=torch.long, device=psi.device)
            index = torch.tensor([[0, min(1, group_size - 1)]], device=psi.device)
        per_group = index.shape[1]
        device = self.bundle.device
        group_ids = batch["group_ids"][kept.to(batch["group_ids"].device)]
        with self.phase("data"):
            draw = draw_timesteps_and_noise(self.noise_seed, epoch, group_ids, tuple(latents.shape[2:]), self.bundle)
        x0 = gather_images(latents, kept, index).to(device, torch.float32)
        drawn = torch.arange(kept.numel())  # the draw covers the kept groups only
        noise = expand_groups(draw.noise, drawn, per_group).to(device)
        t = expand_groups(draw.timesteps, drawn, per_group).to(device)
        # the cache may store conditioning in fp16; the denoiser takes its own dtype
        cond = {key: expand_groups(value, kept, per_group).to(device, self.bundle.dtype if value.is_floating_point()
                                                                   else value.dtype)
                for key, value in batch["cond"].items()}
        for key, value in batch.get("image_cond", {}).items():  # per image (SDXL time_ids of imported images)
            cond[key] = gather_images(value, kept, index).to(device, self.bundle.dtype if value.is_floating_point()
                                                             else value.dtype)
        noisy = self.bundle.add_noise(x0, noise, t)
        target = self.bundle.target(x0, noise, t)
        weight = None
        if self.objective.min_snr_gamma is not None:
            weight = min_snr_weight(self.bundle.noise_scheduler.alphas_cumprod, t, self.objective.min_snr_gamma,
                                    self.bundle.prediction_type)
        # flow models: the error in objective.error_space (x0 by default, as diffusers' SD3 scripts) is a per-sample
        # weight on the velocity error, applied to e_pol and e_ref alike (the cached e_ref stay unweighted)
        space_weight = self.bundle.error_space_weight(t, getattr(self.objective, "error_space", "auto"))
        if space_weight is not None:
            weight = space_weight if weight is None else weight * space_weight
        scores = gather_images(psi, kept, index).to(device) if psi is not None else None
        e_ref = ref_pred = None
        if self.objective.compares_to_reference:
            if self.reference.mode == "cached":
                if "e_ref" not in batch:
                    raise RuntimeError("reference mode 'cached' but this batch has no e_ref: cache reference errors "
                                       "for every epoch trained (cache.reference_errors.epochs) or use another mode")
                e_ref = gather_images(batch["e_ref"], kept, index).to(device, torch.float32)
            else:
                with self.phase("reference"):
                    ref_pred = self.reference.predict(self.bundle, noisy, t, cond, self.autocast)
        with self.autocast:
            pred = self.policy.denoise(noisy, t, cond)
        if self.objective.feature_space == "ncp":
            z = expand_groups(ncp.draw_variance_noise(self.noise_seed, epoch, group_ids, tuple(latents.shape[2:])),
                              drawn, per_group).to(device)

            def encode(x, timesteps, conditioning):
                return self.reference.encoder_features(self.bundle, x, timesteps, conditioning, self.autocast)

            pred, target, ref_pred = ncp.ncp_features(self.bundle, encode, noisy, t, cond, z, pred, target, ref_pred,
                                                      self.objective.ncp_layers)
        out = compute_loss(self.objective, pred, target, scores, e_ref, ref_pred, weight, per_group, self.loss_backend)
        return StepOutput(out.loss, out.metrics, x0.shape[0])


def build_step(cfg, bundle, module: torch.nn.Module, reference: ReferenceModel, noise_seed: int,
               device: torch.device) -> TrainStep:
    """The training step of TrainConfig `cfg` (objective, autocast of speed.mixed_precision, loss_backend) on
    `module` (the denoiser as the strategy wrapped it) with `reference` (ReferenceModel of plan_reference's mode):
    the one way the Trainer and bench/step.py build it."""
    from fastpref.train.speed import autocast

    return TrainStep(bundle, module, cfg.objective, reference, noise_seed, autocast(device, cfg.speed.mixed_precision),
                     cfg.loss_backend)
