"""The `fastpref train` config: plain dataclasses read by fastpref.config (YAML + key=value overrides).

Only configuration lives here (no model, data or process group is touched), so that the recipe layer
(fastpref.pipeline) and the trainer (fastpref.train.loop) both import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from fastpref.config import ConfigError
from fastpref.models.bundle import FlowTimestepsConfig
from fastpref.online.config import ONLINE_METHODS, OnlineConfig
from fastpref.train.objectives import ObjectiveConfig
from fastpref.train.speed import SpeedConfig
from fastpref.train.validation import ValidationConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Strategy = Literal["none", "ddp", "fsdp2", "zero1", "zero2", "zero3"]


@dataclass
class ModelConfig:
    path: str = "toy-sd"  # local diffusers folder, hub id, or a shipped toy model name
    family: Literal["sd", "sdxl", "sd3"] | None = None  # read from model_index.json when null
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights of the trained denoiser


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float | None = None  # defaults to rank
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class DataConfig:
    root: str = ""  # dataset root with cache/ (fastpref cache)
    batch_groups: int = 4  # prompt groups per step per process
    loader: Literal["torch", "dali"] = "torch"
    num_workers: int = 0
    verify: Literal["none", "size", "checksum"] = "size"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    mode: Literal["lora", "full"] = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    # auto: cached e_ref when the dataset has it, else adapters_off (lora) / frozen_copy (full)
    reference: Literal["auto", "cached", "adapters_off", "frozen_copy"] = "auto"
    # full fine-tuning's frozen copy, on the policy's device; auto: the policy's compute dtype on CUDA, the weights'
    # on CPU (why: docs/decisions.md, "reference_dtype")
    reference_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    output_dir: str = "runs/train"
    seed: int = 0
    max_steps: int = 100
    lr: float = 1e-4
    lr_warmup_steps: int = 0
    # after the warm-up: constant, or a linear / cosine decay to 0 at max_steps (diffusers' get_scheduler)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_accumulation: int = 1
    log_every: int = 1
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    max_nonfinite_in_a_row: int = 5
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = True
    wandb_project: str | None = None
    # auto: Triton on CUDA, the C++ ops on CPU; speed.fused_loss: false means reference (and refuses another value)
    loss_backend: Literal["auto", "triton", "native", "reference"] = "auto"
    parallel: Strategy = "none"  # launched with torchrun when not "none"
    # image grids of the policy on fixed prompts / seeds at step 0 and every N steps (off by default)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    # flow (sd3) families: how training timesteps are drawn (the shift is the model scheduler's); must equal the cache's
    # flow_timesteps for the cached e_ref to be used. sd / sdxl: must stay at the defaults
    flow_timesteps: FlowTimestepsConfig = field(default_factory=FlowTimestepsConfig)
    # objective.name grpo / spo / draft: prompts, rollout, sampler and reward of the online methods
    online: OnlineConfig = field(default_factory=OnlineConfig)

    def validate(self):
        if not self.data.root and self.objective.name not in ONLINE_METHODS:  # online methods sample their own data
            raise ConfigError("data.root: required (a dataset folder made by `fastpref cache`)")
        if self.objective.name not in ONLINE_METHODS and self.online != OnlineConfig():
            raise ConfigError(f"online: set, but objective.name {self.objective.name!r} trains on a cached dataset and "
                              f"would ignore it (the online methods: {sorted(ONLINE_METHODS)}); remove the section")
        if self.objective.name == "draft":  # a reward without gradients is refused here, before any model loads
            from fastpref.online.config import check_draft

            check_draft(self.online)
        for key in ("max_steps", "grad_accumulation", "log_every", "checkpoint_every", "data.batch_groups"):
            value = self
            for part in key.split("."):
                value = getattr(value, part)
            if value < 1:
                raise ConfigError(f"{key}: must be >= 1, got {value}")
        if self.mode == "full" and self.reference == "adapters_off":
            raise ConfigError("reference: 'adapters_off' needs mode: lora (full fine-tuning has no adapters)")
        if self.mode == "lora" and self.reference == "frozen_copy":
            raise ConfigError("reference: 'frozen_copy' is for mode: full; LoRA uses the adapters-off network")
        if self.mode == "lora" and self.reference_dtype != "auto":
            raise ConfigError(f"reference_dtype: {self.reference_dtype!r} sets the dtype of the frozen reference copy of "
                              "mode: full; LoRA's reference is the policy itself with its adapters off (allowed "
                              "with mode: lora: auto)")
        if self.objective.feature_space == "ncp" and self.reference == "cached":
            raise ConfigError("reference: 'cached' cannot serve objective.feature_space: ncp (it runs the frozen "
                              "initial model live); use auto, adapters_off (lora) or frozen_copy (full)")
        if self.model.family is not None:  # else the dataset's family, checked by the Trainer before loading
            self.flow_timesteps.check_family(self.model.family)
        if not self.speed.fused_loss:
            if self.loss_backend not in ("auto", "reference"):
                raise ConfigError(f"loss_backend: {self.loss_backend!r} contradicts speed.fused_loss: false (which "
                                  "means the unfused reference loss); drop one of the two settings")
            self.loss_backend = "reference"  # auto, resolved by the one setting that was given
        if self.speed.optimizer == "adafactor" and self.parallel in ("zero1", "zero2", "zero3"):
            # measured with DeepSpeed's untested-optimizer guard lifted (zero1/2): each rank's Adafactor stepped one
            # flat tensor of 10752 elements for the 112 LoRA matrices; step 4's loss left the 1-process run's by
            # 4.5e-3 relative (fsdp2 / ddp: 5e-5)
            raise ConfigError(
                f"speed.optimizer: adafactor cannot run under parallel: {self.parallel}: DeepSpeed ZeRO hands the "
                "optimizer one flat partition of all trainable tensors per rank, so Adafactor would factor no matrix "
                "and clip its update by the partition's RMS instead of each tensor's (another optimizer than the "
                "one process's); use parallel: fsdp2 or ddp with adafactor, or speed.optimizer: adamw under ZeRO")
