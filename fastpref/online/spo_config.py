"""The `online.spo` section of a train config (objective.name: spo); configuration only, no torch.

SPO's values (RockeyCoss/SPO spo_training_and_inference/configs/basic_config.py; names in brackets). The sampler
settings SPO shares with the other online methods live in `online:` itself: num_steps [sample.num_steps: 20],
guidance_scale [sample.guidance_scale: 5.0], eta [sample.eta: 1.0], prompts_per_rollout [sample.sample_batch_size x
processes]; the step-aware preference model is the reward `spm` of `online.reward` (weights: online.reward_paths.spm).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastpref.config import ConfigError


@dataclass
class SPOConfig:
    divert_start_step: int = 4  # [train.divert_start_step]
    num_candidates: int = 4  # k candidates x_{t-1} per step [sample.num_sample_each_step]: SD1.5 4, SDXL 2
    num_inner_step: int = 0  # further single steps of each candidate before scoring [sample.num_inner_step]: SDXL 3
    threshold: float = 0.3  # keep a pair if p_best - p_worst > threshold [compare_func_cfg.threshold]: SDXL 0.4
    beta: float = 10.0  # [train.beta]
    clip_eps: float = 0.1  # the ratio's clamp [train.eps]
    train_batch_size: int = 10  # pairs per training micro-batch, per process [train.train_batch_size]
    # optimizer steps per rollout; the kept pairs are spread evenly over them
    steps_per_rollout: int = 1
    # SPO's own rule instead (it steps every train_batch_size x gradient_accumulation_steps pairs): one optimizer step
    # per pairs_per_step kept pairs of the rollout (all processes), ceil(kept / pairs_per_step) steps (at least 1),
    # the kept pairs spread evenly over them, so the steps per rollout vary with the pairs kept; null: steps_per_rollout
    pairs_per_step: int | None = None
    cfg: bool = True  # classifier-free guidance in the training forward too [train.cfg]

    def validate(self) -> None:
        check_candidates(self.threshold, self.num_candidates)
        if self.divert_start_step < 0:
            raise ConfigError(f"divert_start_step: must be >= 0, got {self.divert_start_step}")
        if self.num_inner_step < 0:
            raise ConfigError(f"num_inner_step: must be >= 0, got {self.num_inner_step}")
        if not self.beta > 0:
            raise ConfigError(f"beta: must be > 0, got {self.beta}")
        if not 0.0 <= self.clip_eps < 1.0:
            raise ConfigError(f"clip_eps: must be in [0, 1), got {self.clip_eps}")
        for key in ("train_batch_size", "steps_per_rollout"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.pairs_per_step is not None:
            if self.pairs_per_step < 1:
                raise ConfigError(f"pairs_per_step: must be >= 1 or null, got {self.pairs_per_step}")
            if self.steps_per_rollout != 1:
                raise ConfigError(f"steps_per_rollout: {self.steps_per_rollout} with pairs_per_step "
                                  f"{self.pairs_per_step}: the kept pairs decide the steps; set one of the two")


def check_candidates(threshold: float, num_candidates: int) -> None:
    """The resampler's pair rule, shared by the trainer's `online.spo` section and the resampler's own config."""
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold: must be in [0, 1] (a difference of two softmax probabilities), got {threshold}")
    if num_candidates < 2:
        raise ConfigError(f"num_candidates: must be >= 2 (a best and a worst candidate per step), got {num_candidates}")


def check_spo(online, world_size: int = 1) -> None:
    """What SPO needs of the shared `online:` settings (an OnlineConfig), before any model loads."""
    spo = online.spo
    if spo.pairs_per_step is not None and spo.pairs_per_step % world_size:
        raise ConfigError(f"online.spo.pairs_per_step: {spo.pairs_per_step} pairs cannot be split evenly over "
                          f"{world_size} processes (make it a multiple of {world_size})")
    if not spo.divert_start_step < online.num_steps:
        raise ConfigError(f"online.spo.divert_start_step: {spo.divert_start_step} must be < online.num_steps "
                          f"({online.num_steps})")
    if not online.eta > 0:
        raise ConfigError(f"online.eta: SPO's ratio is of the DDIM step's Gaussian, it needs eta > 0 (SPO: 1.0), got "
                          f"{online.eta}")
    if "spm" not in online.reward:
        raise ConfigError(f"online.reward: SPO scores its candidates with the step-aware preference model; give "
                          f"reward: {{spm: 1.0}} (weights in reward_paths.spm; none: the toy SPM shipped for the run's "
                          f"world), got {sorted(online.reward)}")
    if len(online.reward) != 1:
        raise ConfigError(f"online.reward: SPO compares candidates with the SPM alone, got {sorted(online.reward)}")
