"""`fastpref train --config configs/<recipe>.yaml [key=value ...]`: the training loop.

Reads a cached Syn-Pic / imported dataset (fastpref.data.dataset), trains the denoiser of a model bundle with one
objective (fastpref.train.objectives) in LoRA or full mode, checkpoints atomically and resumes exactly.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from fastpref.config import ConfigError, load_config, save_config, to_dict
from fastpref.train.checkpoint import CheckpointManager, rng_state, save_trainable, set_rng_state
from fastpref.train.metrics import MetricsLogger
from fastpref.train.objectives import ObjectiveConfig
from fastpref.train.parallel import Strategy, build_parallel, local_device
from fastpref.train.speed import (SpeedConfig, apply_model_speedups, autocast, build_optimizer,
                                  check_speed_support, set_attention_backend)
from fastpref.train.step import ReferenceModel, TrainStep
from fastpref.train.validation import ValidationConfig, Validator, resolve_prompts
from fastpref.utils.imports import require

# Resume tests kill a real run with SIGKILL right after this step (0: never).
KILL_AFTER_STEP = int(os.environ.get("FASTPREF_KILL_AFTER_STEP", "0"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    output_dir: str = "runs/train"
    seed: int = 0
    max_steps: int = 100
    lr: float = 1e-4
    lr_warmup_steps: int = 0
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
    loss_backend: Literal["auto", "triton", "native", "reference"] = "auto"
    parallel: Strategy = "none"  # launched with torchrun when not "none"
    # image grids of the policy on fixed prompts / seeds at step 0 and every N steps (off by default)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def validate(self):
        if not self.data.root:
            raise ConfigError("data.root: required (a dataset folder made by `fastpref cache`)")
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
        if self.objective.feature_space == "ncp" and self.reference == "cached":
            raise ConfigError("reference: 'cached' cannot serve objective.feature_space: ncp (it runs the frozen "
                              "initial model live); use auto, adapters_off (lora) or frozen_copy (full)")
        if not self.speed.fused_loss and self.loss_backend != "reference":
            self.loss_backend = "reference"


def add_lora(denoiser: torch.nn.Module, cfg: LoraConfig) -> None:
    peft = require("peft", "mode: lora")
    denoiser.requires_grad_(False)
    denoiser.add_adapter(peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, lora_dropout=cfg.dropout,
                                         init_lora_weights="gaussian", target_modules=list(cfg.target_modules)))


def save_lora(bundle, out_dir: Path) -> None:
    """pytorch_lora_weights.safetensors in the layout diffusers' load_lora_weights reads."""
    from peft.utils import get_peft_model_state_dict
    from diffusers.utils import convert_state_dict_to_diffusers

    from fastpref.models import FAMILY_OF_PIPELINE

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(bundle.denoiser))
    pipeline_name = next(name for name, family in FAMILY_OF_PIPELINE.items() if family == bundle.family)
    pipeline_cls = getattr(require("diffusers", "saving LoRA weights"), pipeline_name)
    key = "transformer_lora_layers" if bundle.family == "sd3" else "unet_lora_layers"
    pipeline_cls.save_lora_weights(str(out_dir), **{key: layers}, safe_serialization=True)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        from fastpref.data.dataset import CachedDataset
        from fastpref.models import load

        self.cfg = cfg
        self.device = local_device(cfg.device)
        check_speed_support(cfg.speed, self.device, DTYPES[cfg.model.dtype])  # before minutes of loading
        self.parallel = build_parallel(cfg.parallel, self.device, cfg.max_grad_norm, cfg.speed.mixed_precision)
        torch.manual_seed(cfg.seed)
        self.dataset = CachedDataset(cfg.data.root, verify=cfg.data.verify)
        self.bundle = load(cfg.model.path, family=cfg.model.family or self.dataset.family,
                           dtype=DTYPES[cfg.model.dtype], device=self.device)
        self.out = Path(cfg.output_dir)
        self.validator = None
        if cfg.validation.enabled:  # encodes its prompts now and keeps the VAE (grids need pixels)
            from fastpref.models import resolve_path
            from fastpref.models.bundle import pipeline_call_kwargs

            self.validator = Validator(cfg.validation, self.bundle, resolve_prompts(cfg.validation, cfg.data.root),
                                       self.out, pipeline_call_kwargs(resolve_path(cfg.model.path)))
        # The cache holds latents and text embeddings: the VAE and text encoders (T5-XXL alone is ~19 GB in fp32
        # for SD3) would only take device memory.
        self.bundle.vae = None
        self.bundle.text_encoders = [None] * len(self.bundle.text_encoders)
        self.bundle._pipeline = None  # a pipeline built to encode the validation prompts holds the encoders
        denoiser = self.bundle.denoiser
        self.reference_mode = self._reference_mode()
        reference = ReferenceModel(self.reference_mode, denoiser)  # copies the denoiser before any change
        if cfg.mode == "lora":
            add_lora(denoiser, cfg.lora)
        denoiser.train()
        self.speedups = apply_model_speedups(denoiser, cfg.speed, self.device)
        self.attention = set_attention_backend(denoiser, cfg.speed.attention, self.device,
                                               cfg.speed.mixed_precision)
        warmup = cfg.lr_warmup_steps
        module, self.optimizer, self.scheduler = self.parallel.wrap(
            denoiser,
            lambda params: build_optimizer(params, cfg.speed.optimizer, cfg.lr, cfg.weight_decay),
            lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0),
        )
        self.step_fn = TrainStep(self.bundle, module, cfg.objective, reference, self.dataset.noise_seed,
                                 autocast(self.device, cfg.speed.mixed_precision), cfg.loss_backend)
        self.stream = self.dataset.stream(cfg.data.batch_groups, seed=cfg.seed, rank=self.parallel.rank,
                                          world_size=self.parallel.world_size, backend=cfg.data.loader,
                                          num_workers=cfg.data.num_workers, device="cpu")
        self.checkpoints = CheckpointManager(self.out / "checkpoints", cfg.keep_checkpoints)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0

    def _reference_mode(self) -> str:
        cfg = self.cfg
        if not cfg.objective.needs_reference:
            return "none"
        if cfg.reference != "auto":
            if cfg.reference == "cached":
                if self.dataset.e_ref is None:
                    raise ConfigError(f"reference: 'cached' but {cfg.data.root} holds no reference errors "
                                      "(run `fastpref cache` with reference_errors.epochs > 0)")
                if too_short := self._cached_reference_too_short():
                    raise ConfigError(f"reference: cached, but {too_short}")
                if mismatch := self._cached_reference_mismatch():
                    warnings.warn(f"reference: cached, but {mismatch}; the margins start biased", stacklevel=2)
            return cfg.reference
        live = "adapters_off" if cfg.mode == "lora" else "frozen_copy"
        if self.dataset.e_ref is None or cfg.objective.feature_space == "ncp":
            return live
        mismatch = self._cached_reference_mismatch() or self._cached_reference_too_short()
        if mismatch:
            warnings.warn(f"{mismatch}: running the reference live ({live}) instead; cache the reference errors "
                          "with the training precision to skip it", stacklevel=2)
            return live
        return "cached"

    def _cached_reference_too_short(self) -> str | None:
        """Why the cached e_ref would run out before max_steps (None: it covers the run)."""
        cfg = self.cfg
        per_epoch = len(self.dataset.stream(cfg.data.batch_groups, seed=cfg.seed, rank=self.parallel.rank,
                                            world_size=self.parallel.world_size))
        epochs = math.ceil(cfg.max_steps * cfg.grad_accumulation / max(per_epoch, 1))
        if epochs > self.dataset.reference_epochs:
            return (f"the cache holds reference errors for {self.dataset.reference_epochs} epochs and training "
                    f"needs {epochs} (max_steps={cfg.max_steps} at {per_epoch} batches per epoch)")
        return None

    def _cached_reference_mismatch(self) -> str | None:
        """Why the cached e_ref would not equal the live reference's (None: it would).

        beta (2500 for SD) magnifies a precision gap between cache and training into a biased margin at step 0.
        """
        cfg = self.cfg
        cache_dtype = self.dataset.manifest.config.get("dtype", "float32")
        training = {"bf16": "bfloat16", "fp16": "float16"}.get(cfg.speed.mixed_precision, cfg.model.dtype)
        if cfg.speed.fp8:
            training = "fp8"
        if training != cache_dtype:
            return f"cached reference errors were computed in {cache_dtype}, training runs in {training}"
        return None

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        parallel = self.parallel
        tmp = self.checkpoints.begin(self.step, parallel.is_main)
        parallel.barrier()
        with parallel.gathered():
            if parallel.is_main:
                save_trainable(self.bundle.denoiser, tmp / "trainable.safetensors")
                if self.cfg.mode == "lora":
                    save_lora(self.bundle, tmp / "lora")
                else:
                    self.bundle.denoiser.save_pretrained(str(tmp / "denoiser"))
        parallel.save_state(tmp, {
            "step": self.step,
            "stream": self.stream.state_dict(),
            "rng": rng_state(),
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
        })
        parallel.barrier()
        path = None
        if parallel.is_main:
            path = self.checkpoints.commit(self.step, tmp, meta={"config": to_dict(self.cfg),
                                                                 "world_size": parallel.world_size})
        parallel.barrier()
        return path

    def load_checkpoint(self, path: Path) -> None:
        self.parallel.load_trainable(path / "trainable.safetensors")
        state = self.parallel.load_state(path)
        self.stream.load_state_dict({**state["stream"], "rank": self.parallel.rank})
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])

    # ------------------------------------------------------------------ training
    def batches(self):
        """(epoch, batch) forever; a resumed stream may start at the very end of an epoch."""
        while True:
            fresh_epoch = self.stream.position == 0
            yielded = False
            for batch in self.stream:
                yielded = True
                yield self.stream.epoch, batch
            if fresh_epoch and not yielded:
                raise RuntimeError(f"{self.cfg.data.root}: an epoch yielded no batch (fewer groups than "
                                   f"data.batch_groups={self.cfg.data.batch_groups} x world size?)")

    def train(self, resume: bool = False) -> dict:
        cfg, main = self.cfg, self.parallel.is_main
        self.out.mkdir(parents=True, exist_ok=True)
        resumed_from = None
        if resume and (latest := self.checkpoints.latest()) is not None:
            self.load_checkpoint(latest)
            resumed_from = self.step
        logger = progress = None
        if main:
            save_config(cfg, self.out / "config.yaml")
            logger = MetricsLogger(self.out, resume_step=self.step, tensorboard=cfg.tensorboard,
                                   wandb_project=cfg.wandb_project, config=to_dict(cfg))
            if cfg.progress:
                from tqdm.auto import tqdm

                progress = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        batches = self.batches()
        start, images_seen = time.perf_counter(), 0
        try:
            if self.validator is not None and self.step == 0:
                self.validate(logger)  # the starting point, before any update
            while self.step < cfg.max_steps:
                metrics, images = self.optimizer_step(batches)
                metrics = self.parallel.mean(metrics)
                images_seen += images * self.parallel.world_size
                self.step += 1
                if main and (self.step % cfg.log_every == 0 or self.step == cfg.max_steps):
                    elapsed = time.perf_counter() - start - (self.validator.seconds if self.validator else 0.0)
                    metrics.update(lr=self.scheduler.get_last_lr()[0], images_per_s=images_seen / max(elapsed, 1e-9),
                                   nonfinite_total=self.nonfinite_total)
                    if self.parallel.loss_scale is not None:  # fp16
                        metrics["loss_scale"] = self.parallel.loss_scale
                    if torch.cuda.is_available():
                        metrics["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                    logger.log(self.step, metrics)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics.get('implicit_accuracy', 0):.2f}")
                if self.validator is not None and self.validator.due(self.step, cfg.max_steps):
                    self.validate(logger)  # before the checkpoint: a run resumed from it has this grid
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                    self.save_checkpoint()
                if self.step == KILL_AFTER_STEP:
                    os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the resume tests
        finally:
            if logger is not None:
                logger.close()
            if progress is not None:
                progress.close()
        return {"steps": self.step, "resumed_from": resumed_from, "nonfinite_total": self.nonfinite_total,
                "output_dir": str(self.out), "speedups": self.speedups, "reference": self.reference_mode,
                "parallel": self.parallel.strategy, "world_size": self.parallel.world_size}

    def validate(self, logger: MetricsLogger | None = None) -> Path | None:
        """The validation grid of the current policy (every rank samples, the main rank writes); the training RNG
        stream and the denoiser's mode are left untouched (fastpref/train/validation.py)."""
        return self.validator.run(self.bundle, self.step, self.parallel.is_main, logger,
                                  autocast=self.step_fn.autocast, attention=self.attention)

    def optimizer_step(self, batches) -> tuple[dict, int]:
        """grad_accumulation micro-batches, then one optimizer step, skipped on every rank when any rank's loss
        or gradient is not finite."""
        cfg, parallel = self.cfg, self.parallel
        parallel.zero_grad()
        totals: dict[str, float] = {}
        images, finite, counted = 0, True, 0
        with self.attention:
            for _ in range(cfg.grad_accumulation):
                epoch, batch = next(batches)
                out = self.step_fn.forward(batch, epoch)
                loss = out.loss if out is not None else None
                # all ranks agree before any backward, or DDP / ZeRO collectives would wait forever
                if not parallel.all_true(loss is None or bool(torch.isfinite(loss))):
                    finite = False
                    break
                if loss is None:
                    loss = sum(p.sum() * 0.0 for p in parallel.trainable_parameters())  # keeps collectives in step
                else:
                    images += out.num_images
                    counted += 1
                    for key, value in {"loss": out.loss, **out.metrics}.items():
                        totals[key] = totals.get(key, 0.0) + float(value.detach())
                parallel.backward(loss / cfg.grad_accumulation)
        if finite:
            grad_norm = parallel.clip_grad_norm(cfg.max_grad_norm)
            finite = parallel.all_true(bool(torch.isfinite(grad_norm)) or parallel.strategy.startswith("zero"))
            totals["grad_norm"] = float(grad_norm) * max(counted, 1)
        if not finite:
            self.nonfinite_total += 1
            parallel.skip_step()
            # an fp16 overflow that made the loss scaler back off is the scale finding its range, not a diverging
            # run: logged as skipped, but not counted towards max_nonfinite_in_a_row
            if not parallel.scaler_backed_off:
                self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= cfg.max_nonfinite_in_a_row:
                raise FloatingPointError(
                    f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (step {self.step}); "
                    "lower the learning rate or beta, or check the data (max_nonfinite_in_a_row)")
            return {"loss": math.nan, "skipped": 1.0}, images
        self.nonfinite_in_a_row = 0
        if parallel.all_true(counted == 0):
            parallel.skip_step()  # no group of the batch carried a preference: nothing to learn, not even momentum
            return {"loss": math.nan, "skipped": 1.0}, images
        parallel.step()
        if parallel.last_step_skipped:  # DeepSpeed fp16: its loss scaler found an overflow inside engine.step
            self.nonfinite_total += 1
            return {"loss": math.nan, "skipped": 1.0}, images
        return {key: value / max(counted, 1) for key, value in totals.items()}, images


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    return Trainer(cfg).train(resume=resume)


def train_config_of_recipe(path: str, overrides: list[str]) -> TrainConfig:
    """A plain TrainConfig YAML, or a `fastpref run` recipe (its main training, on the data `run` caches)."""
    import yaml

    try:
        is_recipe = "train" in (yaml.safe_load(Path(path).read_text()) or {})
    except (OSError, yaml.YAMLError):
        is_recipe = False  # load_config reports it, naming the file
    if not is_recipe:
        return load_config(TrainConfig, path, overrides)
    from fastpref.pipeline import RunConfig, build_stages

    run_cfg = load_config(RunConfig, path, [o if o.split("=", 1)[0].split(".")[0] in RUN_KEYS else f"train.{o}"
                                            for o in overrides])
    return build_stages(run_cfg).trains[run_cfg.main_variant]


RUN_KEYS = ("output_dir", "synth", "label", "importer", "data_root", "cache", "train", "variants", "main_variant", "eval",
            "progress")


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastpref train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. lr=1e-5 objective.name=dpo")
    args = parser.parse_args(argv)
    cfg = train_config_of_recipe(args.config, args.overrides)
    summary = train(cfg, resume=args.resume)
    print(f"[fastpref train] done: {summary}")
    return 0
