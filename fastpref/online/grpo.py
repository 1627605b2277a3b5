"""GRPO for diffusion (Flow-GRPO on flow models, DanceGRPO-style DDIM(eta) on eps / v models).

One rollout: online.prompts_per_rollout prompts x G images sampled by the current policy with the stochastic
sampler (fastpref.online.sampler; online.num_steps steps, CFG online.guidance_scale), rewarded by the weighted
fastpref rewards of online.reward. Advantages are group-relative: (r - mean of the prompt's rewards) / std, the std
of the whole rollout's rewards (grpo.global_std) or of the prompt's (per-prompt stat tracking as
flow_grpo/stat_tracking.py with its per-epoch clear), clamped to +-adv_clip_max. Samples with a zero advantage are
dropped (a few are added back to keep the split even, as the reference code does). The kept samples are spread over
grpo.steps_per_rollout optimizer steps and the processes (rollout.gather_permute_split), grpo.inner_epochs times in
a new order (Flow-GRPO's num_inner_epochs; passes after the first are off-policy); each optimizer step runs,
for every micro-batch of train_batch_size samples, one micro-step per trained sampling step j (the first
int(num_steps * timestep_fraction)): the policy's Gaussian for x_j -> x_{j+1} re-evaluated at the taken x_{j+1},
ratio = exp(log_prob - old_log_prob), fastpref.ops.grpo_loss (clipped ratio + kl_beta * KL on the means to the
reference: adapters off for LoRA, a frozen copy for full fine-tuning).

Where fastpref differs from yifan123/flow_grpo scripts/train_sd3.py: samples are split over optimizer steps and
processes by one global permutation (the reference code shuffles per process), so 1 and N processes train on the
same batches; the rollout's noise is keyed by (seed, epoch, prompt id) rather than a global generator.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from fastpref import ops
from fastpref.data.noise import group_generator
from fastpref.online.rollout import (
    RolloutPrompts,
    all_gather_rows,
    chunk_count,
    decode_images,
    expand_rows,
    gather_permute_split,
    global_sample_keys,
    latent_shape,
    sample_trajectories,
    step_stds,
    take_step,
)
from fastpref.online.sampler import guided_prediction, sampling_timesteps
from fastpref.train.step import StepOutput
from fastpref.utils.stats import sample_std

ADVANTAGE_EPS = 1e-4  # added to the std, as flow_grpo's stat tracker and its global branch do


def group_advantages(rewards: np.ndarray, prompts: list[str], *, stat_tracking: bool = True,
                     global_std: bool = True) -> tuple[np.ndarray, dict[str, float]]:
    """Flow-GRPO's advantages of one rollout (float64) and the statistics it logs.

    stat_tracking (flow_grpo PerPromptStatTracker.update, cleared every epoch): the rewards of each prompt text are
    centred on their mean and divided by (np.std of all rewards if global_std else of the prompt's) + 1e-4.
    Without it: (r - mean) / (torch's unbiased std of all rewards + 1e-4), the reference code's other branch.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    texts = np.asarray(prompts, dtype=object)
    if rewards.shape != (len(texts),):
        raise ValueError(f"group_advantages: {rewards.shape} rewards for {len(texts)} prompts")
    advantages = np.zeros_like(rewards)
    stds, means = [], []
    for text in dict.fromkeys(prompts):
        mask = texts == text
        stds.append(float(np.std(rewards[mask])))
        means.append(float(rewards[mask].mean()))
        if stat_tracking:
            std = np.std(rewards) if global_std else np.std(rewards[mask])
            advantages[mask] = (rewards[mask] - rewards[mask].mean()) / (std + ADVANTAGE_EPS)
    if not stat_tracking:
        std = sample_std(rewards)
        advantages = (rewards - rewards.mean()) / (std + ADVANTAGE_EPS)
    # per group (prompt text): the mean and max of the groups' reward std (GRPO learns only inside a group) and the
    # spread of the group means across prompts (how much of the reward's variance is the prompt, not the image)
    stats = {"zero_std_ratio": float(np.mean([s == 0 for s in stds])), "reward_std_mean": float(np.mean(stds)),
             "reward_std_max": float(np.max(stds)), "reward_group_mean_std": float(np.std(means))}
    return advantages, stats


class GRPOMethod:
    """The GRPO online method for the engine (fastpref/train/online.py; interface in fastpref/online/__init__)."""

    name = "grpo"

    def __init__(self, engine):
        self.engine = engine
        self.online = engine.cfg.online
        self.cfg = engine.cfg.online.grpo
        bundle = engine.bundle
        self.flow = bundle.prediction_type == "flow"
        if self.flow and not self.online.noise_level > 0:
            raise ValueError("online.noise_level: GRPO on a flow model needs a stochastic SDE step (> 0)")
        self.schedule = sampling_timesteps(bundle, self.online.num_steps)
        self.train_steps = self.cfg.num_train_timesteps(self.online.num_steps)
        stds = step_stds(self.schedule, eta=self.online.eta, noise_level=self.online.noise_level)
        stochastic = int(torch.cumprod(stds > 0, 0).sum())  # the leading steps with a log-density
        if stochastic == 0:
            raise ValueError("online: the sampler's first step is deterministic; GRPO needs eta > 0 (DDIM) or "
                             "noise_level > 0 (flow)")
        # a deterministic final step (DDIM to alpha = 1, e.g. SDXL's set_alpha_to_one) is never trained
        self.train_steps = min(self.train_steps, stochastic)
        world = engine.world_size
        samples = self.online.prompts_per_rollout * self.online.group_size
        split = world * self.cfg.steps_per_rollout
        if samples % split:
            raise ValueError(f"online.grpo.steps_per_rollout: the {samples} samples of a rollout "
                             f"(prompts_per_rollout x group_size) cannot be split evenly over {world} processes x "
                             f"{self.cfg.steps_per_rollout} optimizer steps")
        self.samples_per_part = samples // split  # per process and optimizer step, before dropping
        self.chunks = chunk_count(self.samples_per_part, self.cfg.train_batch_size)
        self.shape = latent_shape(bundle, self.online.resolution)
        self.rollout_metrics: dict[str, float] = {}
        # (decay, every) of the engine's EMA of the trainable weights (validation grids, exported weights)
        self.ema_settings = (self.cfg.ema_decay, self.cfg.ema_every) if self.cfg.ema else None

    # ------------------------------------------------------------------ what the engine asks
    @staticmethod
    def needs_reference(cfg) -> bool:
        """A reference model runs only for the KL term."""
        return cfg.online.grpo.kl_beta > 0

    @staticmethod
    def configured_steps_per_rollout(cfg) -> int:
        return cfg.online.grpo.steps_per_rollout * cfg.online.grpo.inner_epochs

    @property
    def steps_per_rollout(self) -> int:
        return self.cfg.steps_per_rollout * self.cfg.inner_epochs

    @property
    def micro_batches_per_step(self) -> int:
        return self.chunks * self.train_steps

    def state_dict(self) -> dict[str, Any]:
        return {}  # the stat tracker is cleared every rollout, as the reference code's: nothing to carry over

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def rollout(self, prompts: RolloutPrompts) -> list[list[dict[str, Any]]]:
        """Sample, reward and turn one rollout into this process's micro-batches: one list per optimizer step."""
        engine, online, g = self.engine, self.online, self.online.group_size
        mine = prompts.shard(engine.rank, engine.world_size)
        started = time.perf_counter()
        cond = engine.encode(mine.texts)
        traj = sample_trajectories(
            engine.sampling_policy, self.schedule, mine, cond, engine.uncond if online.guidance_scale > 1 else None,
            group_size=g, shape=self.shape, seed=engine.seed, guidance_scale=online.guidance_scale, eta=online.eta,
            noise_level=online.noise_level, batch_size=online.sample_batch_size, device=engine.device,
            dtype=engine.bundle.dtype, autocast=engine.autocast)
        sampled = time.perf_counter()
        pixels = decode_images(engine.bundle, traj.final.to(engine.device))
        rewards = engine.reward(pixels, traj.texts)
        rewarded = time.perf_counter()
        terms = {name: value.clone() for name, value in engine.reward.last_terms.items()}
        keys = global_sample_keys(mine, g)

        # every process computes the advantages of the whole rollout from the gathered rewards
        all_rewards = engine.gather(rewards.double())
        all_keys = engine.gather(keys)
        order = torch.argsort(all_keys)
        all_rewards, all_keys = all_rewards[order], all_keys[order]
        texts = [prompts.prompts[int(k) // g - prompts.start].text for k in all_keys]
        advantages, stats = group_advantages(all_rewards.numpy(), texts, stat_tracking=self.cfg.stat_tracking,
                                             global_std=self.cfg.global_std)
        unclipped = torch.from_numpy(advantages)
        advantages = unclipped.clamp(-self.cfg.adv_clip_max, self.cfg.adv_clip_max)
        keep = self._kept_samples(advantages, prompts)
        position = {int(k): i for i, k in enumerate(all_keys)}
        local = torch.tensor([position[int(k)] for k in keys])
        local_keep = keep[local]

        rows = {
            "latents": traj.latents[:, :self.train_steps + 1],
            "log_probs": traj.log_probs[:, :self.train_steps],
            "advantages": advantages[local].float(),
            **{f"cond.{key}": value.cpu() for key, value in traj.cond.items()},
        }
        kept_rows = {name: value[local_keep] for name, value in rows.items()}
        # one order per pass over the kept samples (inner epochs); the first pass keeps the tag runs had before
        # inner_epochs existed, so their rollouts train as they did
        passes = [group_generator(engine.seed, prompts.epoch, prompts.start,
                                  "online/grpo-permute" + (f"/{inner}" if inner else ""))
                  for inner in range(self.cfg.inner_epochs)]
        parts = gather_permute_split(kept_rows, keys[local_keep], passes, parts=self.cfg.steps_per_rollout)
        placeholder = {name: value[:1] for name, value in rows.items()}  # for empty micro-batches (weight 0)

        all_terms = {name: engine.gather(value.double()) for name, value in terms.items()}
        metrics = {
            "reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std(unbiased=False)),
            **{f"reward_{name}": float(value.mean()) for name, value in all_terms.items()},
            **stats,
            "advantage_abs_mean": float(advantages.abs().mean()),
            "advantage_std": float(advantages.std(unbiased=False)),
            "advantage_abs_max": float(advantages.abs().max()),
            "advantage_clip_fraction": float((unclipped.abs() > self.cfg.adv_clip_max).double().mean()),
            "kept_fraction": float(keep.float().mean()),
            # this process's seconds: encoding + sampling, decoding + reward (the step's own time is the rest)
            "rollout_sample_s": sampled - started, "rollout_reward_s": rewarded - sampled,
        }
        self.rollout_metrics = metrics
        return [self._micro_batches(part, placeholder) for part in parts]

    def _kept_samples(self, advantages: torch.Tensor, prompts: RolloutPrompts) -> torch.Tensor:
        """(N,) bool over the rollout: nonzero advantages, plus zero ones (chosen by a seeded permutation) until
        the count splits evenly over processes x optimizer steps, as the reference code fills its batches."""
        n = advantages.shape[0]
        if not self.cfg.drop_zero_advantage:
            return torch.ones(n, dtype=torch.bool)
        keep = advantages != 0
        split = self.engine.world_size * self.cfg.steps_per_rollout
        missing = (-int(keep.sum())) % split
        if missing:
            zeros = torch.nonzero(~keep).reshape(-1)
            generator = group_generator(self.engine.seed, prompts.epoch, prompts.start, "online/grpo-fill")
            keep[zeros[torch.randperm(len(zeros), generator=generator)[:missing]]] = True
        return keep

    def _micro_batches(self, part: dict[str, torch.Tensor], placeholder: dict[str, torch.Tensor]
                       ) -> list[dict[str, Any]]:
        n = part["advantages"].shape[0]
        size = self.cfg.train_batch_size
        batches = []
        for c in range(self.chunks):
            rows = {name: value[c * size:(c + 1) * size] for name, value in part.items()}
            count = rows["advantages"].shape[0]
            if count == 0:
                rows = placeholder
            for j in range(self.train_steps):
                batches.append({"rows": rows, "step": j, "count": count})
        assert n <= self.chunks * size
        return batches

    # ------------------------------------------------------------------ the loss
    def preference_groups(self, batch: dict[str, Any]) -> int:
        """The samples the micro-batch's loss is a mean over (0: a placeholder forward, weighed 0)."""
        return int(batch["count"])

    def forward(self, batch: dict[str, Any], epoch: int) -> StepOutput:
        engine, online = self.engine, self.online
        rows, j = batch["rows"], batch["step"]
        device, dtype = engine.device, engine.bundle.dtype
        x = rows["latents"][:, j].to(device)
        taken = rows["latents"][:, j + 1].to(device)
        n = x.shape[0]
        cond = {key[5:]: value.to(device) for key, value in rows.items() if key.startswith("cond.")}
        t = self.schedule.timesteps[j].to(device).expand(n)
        guided = self.cfg.cfg and online.guidance_scale > 1
        uncond = expand_rows(engine.uncond, n) if guided else None
        scale = online.guidance_scale if guided else 1.0
        with engine.autocast:
            prediction = guided_prediction(engine.policy, x.to(dtype), t, cond, uncond, scale, detach_uncond=True)
        step = take_step(self.schedule, j, prediction, x, eta=online.eta, noise_level=online.noise_level,
                         prev_sample=taken)
        reference_mean = None
        if self.cfg.kl_beta > 0:
            with torch.no_grad():
                reference_prediction = engine.reference_prediction(x.to(dtype), t, cond, uncond, scale)
                reference_mean = take_step(self.schedule, j, reference_prediction, x, eta=online.eta,
                                           noise_level=online.noise_level, prev_sample=taken).mean
        kl_std = None
        if self.flow and self.cfg.kl_form == "flow_grpo":
            # the reference code divides by its std_dev_t, the SDE coefficient g, not the step's std g sqrt(-dt)
            dt = float(self.schedule.sigmas[j] - self.schedule.sigmas[j + 1])
            kl_std = step.std.detach() / math.sqrt(dt)
        out = ops.grpo_loss(step.mean, reference_mean, taken, step.std.detach(), rows["log_probs"][:, j].to(device),
                            rows["advantages"].to(device), clip_range=self.cfg.clip_range, kl_beta=self.cfg.kl_beta,
                            kl_std=kl_std, backend=engine.loss_backend)
        return StepOutput(out.loss, out.metrics, n)
