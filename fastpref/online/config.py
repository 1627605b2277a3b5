"""The `online:` section of a train config: what the online methods (objective.name grpo / spo / draft) share
(prompts, rollout size, sampler, reward) and one sub-section per method (`online.grpo`, ...).

Only configuration lives here (no torch model is touched), so fastpref.train.config can import it.
A method adds its own sub-section as a field of OnlineConfig (e.g. `spo: SPOConfig`), validated by its dataclass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from fastpref.config import ConfigError
from fastpref.online.spo_config import SPOConfig, check_spo

# objective.name values trained by the online engine (fastpref/train/online.py), and where each method lives
ONLINE_METHODS = {
    "grpo": "fastpref.online.grpo:GRPOMethod",
    "spo": "fastpref.online.spo:SPOMethod",
    "draft": "fastpref.online.draft:DRaFTMethod",
}


@dataclass
class GRPOConfig:
    """Flow-GRPO's training settings (yifan123/flow_grpo config/base.py and config/grpo.py; names in brackets).

    Defaults are the reference code's base values except where its SD3 recipes (geneval_sd3 / pickscore_sd3) all
    agree (timestep_fraction 0.99, global_std true); configs/sd3-grpo-*.yaml cite every value.
    """

    clip_range: float = 1e-4  # PPO clip of the per-step ratio [train.clip_range]
    adv_clip_max: float = 5.0  # advantages clamped to +-adv_clip_max [train.adv_clip_max]
    kl_beta: float = 0.0  # weight of the KL on the Gaussian means [train.beta]: 0.04 GenEval, 0.01 PickScore
    # flow models: "flow_grpo" divides the squared mean difference by 2 g^2 with g the SDE's noise coefficient, as
    # the reference code does (no sqrt(dt)); "gaussian" by 2 std^2 of the step (the exact KL of the two Gaussians).
    # DDIM families have no g: always "gaussian".
    kl_form: Literal["flow_grpo", "gaussian"] = "flow_grpo"
    # train on the first int(num_steps * timestep_fraction) sampling steps of every trajectory
    timestep_fraction: float = 0.99
    global_std: bool = True  # advantages divided by the std of all rewards of the rollout [sample.global_std]
    # advantages from the mean (and, global_std false, std) of the rewards of the same prompt text in the rollout,
    # else from the rollout's mean and std [per_prompt_stat_tracking]
    stat_tracking: bool = True
    # samples whose advantage is 0 (a prompt whose images all scored the same) are dropped, as the reference code
    # does (it adds back a few to keep the batch divisible; so does fastpref)
    drop_zero_advantage: bool = True
    steps_per_rollout: int = 1  # optimizer steps per rollout (Flow-GRPO's SD3 recipes: 2 per epoch)
    # passes over each rollout's kept samples, reshuffled every pass [train.num_inner_epochs]: pass e > 0 trains off
    # the policy that sampled them, so its ratio moves and clip_range binds; steps_per_rollout x inner_epochs
    # optimizer steps per rollout
    inner_epochs: int = 1
    train_batch_size: int = 8  # samples per training micro-batch, per process [train.batch_size]
    cfg: bool = True  # classifier-free guidance in the training forward too, uncond half detached [train.cfg]
    ema: bool = False  # an EMA of the trainable weights for validation grids and the exported weights [train.ema]
    ema_decay: float = 0.9  # EMAModuleWrapper(decay=0.9, update_step_interval=8) of the reference code
    ema_every: int = 8

    def validate(self) -> None:
        if not self.clip_range > 0:
            raise ConfigError(f"clip_range: must be > 0, got {self.clip_range}")
        if not self.adv_clip_max > 0:
            raise ConfigError(f"adv_clip_max: must be > 0, got {self.adv_clip_max}")
        if not (self.kl_beta >= 0 and math.isfinite(self.kl_beta)):
            raise ConfigError(f"kl_beta: must be >= 0, got {self.kl_beta}")
        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError(f"timestep_fraction: must be in (0, 1], got {self.timestep_fraction}")
        for key in ("steps_per_rollout", "inner_epochs", "train_batch_size", "ema_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")

    def num_train_timesteps(self, num_steps: int) -> int:
        """How many (the first) sampling steps are trained: Flow-GRPO's int(num_steps * timestep_fraction), >= 1."""
        return max(1, int(num_steps * self.timestep_fraction))


@dataclass
class DRaFTConfig:
    """The `online.draft` section (objective.name: draft): DRaFT-K / DRaFT-LV / DRaFT+ / AlignProp-style truncation
    (fastpref/online/draft.py). Defaults: NeMo-Aligner's examples/mm/stable_diffusion/conf/draftp_sd.yaml (names in
    brackets); the sampler settings it shares with the other methods live in `online:` (num_steps [infer.
    inference_steps], guidance_scale [infer.unconditional_guidance_scale], eta 0 [infer.eta]), the reward in
    online.reward (it must be differentiable)."""

    variant: Literal["k", "lv", "alignprop"] = "k"
    k: int = 1  # differentiable (last) sampling steps [model.truncation_steps]; alignprop: the largest K drawn
    k_min: int = 1  # alignprop: K is drawn uniformly from [k_min, k] for every optimizer step (seeded)
    lv_samples: int = 2  # DRaFT-LV: re-noisings n of the stop-grad x0 at the last step (the paper's n = 2)
    # DRaFT+: weight of the mean over the last K steps of mean((eps_pol - eps_ref)^2) [model.kl_coeff]; 0: DRaFT
    kl_coeff: float = 0.0
    batch_size: int = 1  # images per micro-batch, per process [model.micro_batch_size]
    vae_batch_size: int = 8  # images per differentiable VAE decode [infer.vae_batch_size]
    # every differentiable denoiser call and VAE decode recomputed in the backward instead of keeping activations
    checkpointing: bool = True

    def validate(self) -> None:
        for key in ("k", "k_min", "lv_samples", "batch_size", "vae_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.variant == "alignprop" and self.k_min > self.k:
            raise ConfigError(f"k_min: {self.k_min} must be <= k ({self.k}), the range K is drawn from")
        if self.variant == "lv" and self.k != 1:
            raise ConfigError(f"k: DRaFT-LV differentiates the last step only (k: 1), got {self.k}")
        if not (self.kl_coeff >= 0 and math.isfinite(self.kl_coeff)):
            raise ConfigError(f"kl_coeff: must be >= 0, got {self.kl_coeff}")


def check_draft(online) -> None:
    """What DRaFT needs of the shared `online:` settings, before any model loads; errors name the key."""
    from fastpref.rewards.base import require_differentiable

    for name in online.reward:
        require_differentiable(name, f"online.reward.{name}")
    draft = online.draft
    if draft.k > online.num_steps:
        raise ConfigError(f"online.draft.k: {draft.k} differentiable steps > online.num_steps ({online.num_steps})")
    if online.eta != 0:
        raise ConfigError(f"online.eta: DRaFT samples deterministically (DDIM eta 0, NeMo's infer.eta), set it to 0, "
                          f"got {online.eta}")
    if (online.prompts_per_rollout * online.group_size) % draft.batch_size:
        raise ConfigError(f"online.draft.batch_size: {draft.batch_size} does not divide the "
                          f"{online.prompts_per_rollout * online.group_size} images of a step (prompts_per_rollout x "
                          "group_size)")


@dataclass
class OnlineConfig:
    # the training prompts: a .txt / .jsonl / .parquet file or toy:train / toy:train-balanced (fastpref.data.prompts)
    prompts: str = "toy:train"
    prompt_limit: int | None = None  # keep the first N prompts
    prompts_per_rollout: int = 4  # prompts sampled per rollout, over all processes (divisible by the world size)
    group_size: int = 4  # G images per prompt [sample.num_image_per_prompt]
    num_steps: int = 10  # denoising steps while training [sample.num_steps]; eval / validation use their own (40)
    guidance_scale: float = 4.5  # [sample.guidance_scale]
    resolution: int | None = None  # pixels; null: the denoiser's native sample size
    sample_batch_size: int = 8  # rows per sampling denoiser call (x2 with guidance), per process
    eta: float = 1.0  # DDIM stochasticity for eps / v families (> 0 for GRPO and SPO, 0 for DRaFT's DDIM)
    noise_level: float = 0.7  # flow families: Flow-GRPO's SDE noise level a [sample.noise_level]
    # reward name (fastpref.rewards registry) -> weight; the reward is the weighted sum [reward_fn]
    reward: dict[str, float] = field(default_factory=lambda: {"verifier": 1.0})
    # reward name -> weights folder or hub id (build_reward's path_or_hub_id); a reward not listed loads its default
    reward_paths: dict[str, str] = field(default_factory=dict)
    # reward name -> keyword arguments of its from_pretrained, e.g. {verifier: {partial_credit: true}} (the fraction
    # of the verifier's checks passed: a denser signal than pass / fail); a toy reward's world comes from toy_world
    reward_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    reward_batch_size: int = 64
    # the toy world (fastpref.toy.world.WORLDS) of the toy rewards (verifier, shapeclip, quality): their grammar,
    # ShapeCLIP weights and palette; null: the model's world (fastpref.models.model_world), else v1. `fastpref run`
    # sets it to the recipe's (fastpref.pipeline.recipe_world)
    toy_world: str | None = None
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    spo: SPOConfig = field(default_factory=SPOConfig)
    draft: DRaFTConfig = field(default_factory=DRaFTConfig)

    def validate(self) -> None:
        for key in ("prompts_per_rollout", "group_size", "num_steps", "sample_batch_size", "reward_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.prompt_limit is not None and self.prompt_limit < 1:
            raise ConfigError(f"prompt_limit: must be >= 1 or null, got {self.prompt_limit}")
        if self.resolution is not None and self.resolution < 8:
            raise ConfigError(f"resolution: must be >= 8 pixels or null, got {self.resolution}")
        if self.guidance_scale < 0:
            raise ConfigError(f"guidance_scale: must be >= 0, got {self.guidance_scale}")
        if self.eta < 0:
            raise ConfigError(f"eta: must be >= 0, got {self.eta}")
        if self.noise_level < 0:
            raise ConfigError(f"noise_level: must be >= 0, got {self.noise_level}")
        if not self.reward:
            raise ConfigError("reward: give at least one reward name with its weight, e.g. {verifier: 1.0}")
        from fastpref.rewards.base import available_rewards

        for name, weight in self.reward.items():
            if name not in available_rewards():
                raise ConfigError(f"reward.{name}: unknown reward; known rewards: {', '.join(available_rewards())}")
            if not math.isfinite(weight):
                raise ConfigError(f"reward.{name}: weight must be a finite number, got {weight}")
        for name in self.reward_paths:
            if name not in self.reward:
                raise ConfigError(f"reward_paths.{name}: not a reward of this run (reward: {sorted(self.reward)})")
        for name, kwargs in self.reward_kwargs.items():
            if name not in self.reward:
                raise ConfigError(f"reward_kwargs.{name}: not a reward of this run (reward: {sorted(self.reward)})")
            if not isinstance(kwargs, dict):
                raise ConfigError(f"reward_kwargs.{name}: a mapping of keyword arguments, got {kwargs!r}")
            if "world" in kwargs:
                raise ConfigError(f"reward_kwargs.{name}.world: set online.toy_world instead (one world per run)")
        from fastpref.toy.world import WORLDS

        if self.toy_world is not None and self.toy_world not in WORLDS:
            raise ConfigError(f"toy_world: {self.toy_world!r} is not one of {tuple(WORLDS)} (or null: the model's)")

    def resolve_toy_world(self, model_path: str) -> str:
        """The toy world of this run's toy rewards: toy_world, else the model's, else v1. A toy model of another
        world is refused (its captions and colors would be misread)."""
        from fastpref.models import model_world

        its_world = model_world(model_path)
        world = self.toy_world or its_world or "v1"
        if its_world is not None and its_world != world:
            raise ConfigError(f"online.toy_world: {world!r}, but the model {model_path!r} is toy world {its_world}: "
                              "its images would be scored in another grammar and palette (leave toy_world out)")
        return world

    def check_method(self, method: str, world_size: int = 1) -> None:
        """What a method needs of the shared settings, checked before the model loads; errors name the key."""
        if self.prompts_per_rollout % world_size:
            raise ConfigError(f"online.prompts_per_rollout: {self.prompts_per_rollout} prompts cannot be split "
                              f"evenly over {world_size} processes (make it a multiple of {world_size})")
        if method == "spo":
            check_spo(self, world_size)
        if method == "draft":
            check_draft(self)
        if method == "grpo":
            if self.group_size < 2:
                raise ConfigError(f"online.group_size: GRPO compares the images of a prompt, it needs >= 2, got "
                                  f"{self.group_size}")
            if self.eta == 0:
                raise ConfigError("online.eta: GRPO needs a stochastic DDIM step (eta > 0) for its log-probabilities "
                                  "on eps / v families")
            samples, split = self.prompts_per_rollout * self.group_size, world_size * self.grpo.steps_per_rollout
            if samples % split:
                raise ConfigError(f"online.grpo.steps_per_rollout: the {samples} samples of a rollout (prompts_per_"
                                  f"rollout x group_size) cannot be split evenly over {world_size} processes x "
                                  f"{self.grpo.steps_per_rollout} optimizer steps")
