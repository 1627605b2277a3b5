"""The training loop behind `fastpref train` (its CLI and recipe reading: fastpref.pipeline).

Reads a cached Syn-Pic / imported dataset (fastpref.data.dataset), trains the denoiser of a model bundle with one
objective (fastpref.train.objectives) in LoRA or full mode, checkpoints atomically and resumes exactly.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from fastpref.config import ConfigError, flat_differences, from_dict, save_config, to_dict
from fastpref.online.config import ONLINE_METHODS as ONLINE_OBJECTIVES
from fastpref.train.checkpoint import CheckpointManager, rng_state, save_trainable, set_rng_state
from fastpref.train.config import DTYPES, DataConfig, LoraConfig, ModelConfig, TrainConfig  # noqa: F401 (re-exported)
from fastpref.train.metrics import (MetricsLogger, RunHistory, format_summary, host_identity, memory_usage,
                                    progress_postfix, write_summary)
from fastpref.train.parallel import build_parallel, local_device
from fastpref.train.reference import (ReferenceModel, plan_reference, reference_precision_gap,  # noqa: F401
                                      resolve_reference_dtype, training_flow_timesteps)
from fastpref.train.speed import (
    apply_model_speedups, build_lr_scheduler, build_optimizer, check_speed_support, set_attention_backend)
from fastpref.train.step import build_step
from fastpref.train.validation import Validator, resolve_prompts
from fastpref.utils.imports import require

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

        created = time.perf_counter()
        self.cfg = cfg
        self.device = local_device(cfg.device)
        check_speed_support(cfg.speed, self.device, DTYPES[cfg.model.dtype])  # before minutes of loading
        self.parallel = build_parallel(cfg.parallel, self.device, cfg.max_grad_norm, cfg.speed.mixed_precision)
        torch.manual_seed(cfg.seed)
        self.dataset = CachedDataset(cfg.data.root, verify=cfg.data.verify)
        self.family = cfg.model.family or self.dataset.family
        cfg.flow_timesteps.check_family(self.family)
        from fastpref.models.bundle import FLOW_FAMILIES

        if self.family not in FLOW_FAMILIES and cfg.objective.error_space != "auto":
            raise ConfigError(f"objective.error_space: {cfg.objective.error_space!r} is for the flow-matching families "
                              f"{list(FLOW_FAMILIES)}; family {self.family!r} has one error space (leave it auto)")
        # before minutes of model loading: `reference: cached` on a dataset that cannot serve it fails now
        plan = plan_reference(cfg, self.dataset, self.family, self.device, self.parallel.rank,
                              self.parallel.world_size, stacklevel=3)
        self.reference_mode, self.reference_dtype = plan.mode, plan.dtype
        self.bundle = load(cfg.model.path, family=self.family, dtype=DTYPES[cfg.model.dtype], device=self.device)
        if self.bundle.prediction_type == "flow":  # before any draw
            self.bundle.flow_timestep_sampling = cfg.flow_timesteps.sampling()
        expected = training_flow_timesteps(cfg, self.family)
        if self.reference_mode == "cached" and self.bundle.flow_timestep_record != expected:
            raise RuntimeError(f"{cfg.model.path}: the loaded model draws flow timesteps with "
                               f"{self.bundle.flow_timestep_record}, its scheduler config said {expected} (what the "
                               "cached e_ref was checked against)")
        self.out = Path(cfg.output_dir)
        self.validator = None
        if cfg.validation.enabled:  # encodes its prompts now and keeps the VAE (grids need pixels)
            from fastpref.models import resolve_path
            from fastpref.models.bundle import pipeline_call_kwargs

            prompts = resolve_prompts(cfg.validation, cfg.data.root, cfg.model.path)
            self.validator = Validator(cfg.validation, self.bundle, prompts, self.out,
                                       pipeline_call_kwargs(resolve_path(cfg.model.path)))
        # The cache holds latents and text embeddings: the VAE and text encoders (T5-XXL alone is ~19 GB in fp32
        # for SD3) would only take device memory.
        self.bundle.vae = None
        self.bundle.text_encoders = [None] * len(self.bundle.text_encoders)
        self.bundle._pipeline = None  # a pipeline built to encode the validation prompts holds the encoders
        denoiser = self.bundle.denoiser
        # copies the denoiser before any change, on its device (never offloaded), in reference_dtype
        reference = ReferenceModel(self.reference_mode, denoiser, self.reference_dtype)
        if cfg.mode == "lora":
            add_lora(denoiser, cfg.lora)
        denoiser.train()
        self.speedups = apply_model_speedups(denoiser, cfg.speed, self.device)
        self.attention = set_attention_backend(denoiser, cfg.speed.attention, self.device,
                                               cfg.speed.mixed_precision)
        module, self.optimizer, self.scheduler = self.parallel.wrap(
            denoiser,
            lambda params: build_optimizer(params, cfg.speed.optimizer, cfg.lr, cfg.weight_decay),
            lambda opt: build_lr_scheduler(opt, cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_steps),
        )
        self.step_fn = build_step(cfg, self.bundle, module, reference, self.dataset.noise_seed, self.device)
        self.stream = self.dataset.stream(cfg.data.batch_groups, seed=cfg.seed, rank=self.parallel.rank,
                                          world_size=self.parallel.world_size, backend=cfg.data.loader,
                                          num_workers=cfg.data.num_workers, device="cpu")
        self.checkpoints = CheckpointManager(self.out / "checkpoints", cfg.keep_checkpoints)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self.setup_seconds = time.perf_counter() - created  # loading the model and the data, copying the reference

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
        """Train to max_steps; returns the summary, which the main rank also prints and writes to summary.json."""
        cfg, main = self.cfg, self.parallel.is_main
        wall_start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        resumed_from = None
        if not resume:
            refuse_to_start_over(self.checkpoints)
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
        history = RunHistory()
        try:
            if self.validator is not None and self.step == 0:
                self.validate(logger)  # the starting point, before any update
            while self.step < cfg.max_steps:
                metrics, images = self.optimizer_step(batches)
                metrics = self.parallel.mean(metrics)
                images_seen += images * self.parallel.world_size
                self.step += 1
                history.add(metrics)
                elapsed = self._training_seconds(start)
                images_per_s = images_seen / max(elapsed, 1e-9)
                memory = memory_usage(self.device) if main else {}
                if main and (self.step % cfg.log_every == 0 or self.step == cfg.max_steps):
                    metrics.update(lr=self.scheduler.get_last_lr()[0], images_per_s=images_per_s,
                                   nonfinite_total=self.nonfinite_total)
                    if self.parallel.loss_scale is not None:  # fp16
                        metrics["loss_scale"] = self.parallel.loss_scale
                    logger.log(self.step, metrics, measurements=memory)
                if progress is not None:
                    progress.update(1)
                    # refresh=False: the bar redraws at its own interval (a log file gets a line per few s)
                    progress.set_postfix(progress_postfix(metrics, images_per_s, memory), refresh=False)
                if self.validator is not None and self.validator.due(self.step, cfg.max_steps):
                    self.validate(logger)  # before the checkpoint: a run resumed from it has this grid
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                    self.save_checkpoint()
        finally:
            if logger is not None:
                logger.close()
            if progress is not None:
                progress.close()
        train_seconds = self._training_seconds(start)
        summary = {"steps": self.step, "resumed_from": resumed_from, "steps_this_run": history.steps,
                   "nonfinite_total": self.nonfinite_total, "skipped_this_run": history.skipped,
                   **history.summary(),
                   "setup_time_s": self.setup_seconds, "wall_time_s": time.perf_counter() - wall_start,
                   "train_time_s": train_seconds,
                   "images": images_seen, "images_per_s": images_seen / max(train_seconds, 1e-9),
                   **(memory_usage(self.device) if main else {}),
                   "output_dir": str(self.out), "speedups": self.speedups, "reference": self.reference_mode,
                   "reference_dtype": str(self.reference_dtype).removeprefix("torch.") if self.reference_dtype else None,
                   "parallel": self.parallel.strategy, "world_size": self.parallel.world_size,
                   # what a rerun must match to repeat this run bit for bit: float reductions differ across thread
                   # counts and CPUs, and a long online run turns that into another trajectory of the same seed
                   "host": host_identity()}
        if main:
            write_summary(self.out / "summary.json", summary)
            print(format_summary(summary), flush=True)
        return summary

    def _training_seconds(self, start: float) -> float:
        """Seconds since `start` spent training (validation sampling excluded): the images/s denominator."""
        return time.perf_counter() - start - (self.validator.seconds if self.validator else 0.0)

    def validate(self, logger: MetricsLogger | None = None) -> Path | None:
        """The validation grid of the current policy (every rank samples, the main rank writes); the training RNG
        stream and the denoiser's mode are left untouched (fastpref/train/validation.py)."""
        return self.validator.run(self.bundle, self.step, self.parallel.is_main, logger,
                                  autocast=self.step_fn.autocast, attention=self.attention)

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches per optimizer step: grad_accumulation (the online trainer's follow from its rollout)."""
        return self.cfg.grad_accumulation

    def optimizer_step(self, batches) -> tuple[dict, int]:
        """grad_accumulation micro-batches, then one optimizer step, skipped on every rank when any rank's loss
        or gradient is not finite. The strategy (self.parallel) clips, checks the gradient norm and steps; the
        logged grad_norm is this step's global norm before clipping.

        Each micro-batch's loss is a mean over the groups it keeps (pairwise objectives drop groups whose images all
        tie in psi; rankdpo means over the groups with an ordered pair), so the step draws its micro-batches first,
        counts their kept groups (step_fn.preference_groups) and weighs micro-batch i by kept_i / sum(kept): the
        gradient, and the logged metrics, are means over the step's kept groups, as one batch of grad_accumulation x
        data.batch_groups groups gives. A micro-batch that keeps no group still runs its forward and backward with
        weight 0, so that every rank joins the same collectives. A step skipped for a non-finite loss still consumes
        all its micro-batches.
        """
        parallel = self.parallel
        parallel.zero_grad()
        micro_batches = [next(batches) for _ in range(self.micro_batches_per_step)]
        # a step function without preference_groups (test probes) weighs its micro-batches equally
        count = getattr(self.step_fn, "preference_groups", None)
        kept = [count(batch) if count is not None else 1 for _, batch in micro_batches]
        # Per rank only: DDP / FSDP2 / ZeRO average the ranks' gradients equally whatever their kept counts (weighing
        # ranks by them would need an all-reduce of the counts), so across ranks the same imbalance remains.
        total = sum(kept)
        totals: dict[str, float] = {}
        images = 0
        with self.attention:
            for index, ((epoch, batch), groups) in enumerate(zip(micro_batches, kept)):
                out = self.step_fn.forward(batch, epoch)
                # all ranks agree before any backward, or DDP / ZeRO collectives would wait forever
                if not parallel.all_true(bool(torch.isfinite(out.loss))):
                    parallel.skip_step(unfinished_loss=out.loss)
                    return self._nonfinite_step(counts_in_a_row=True), images
                images += out.num_images
                if groups == 0:  # no group with a preference: a loss without gradient, weighed 0
                    loss = out.loss * 0.0
                else:
                    for key, value in {"loss": out.loss, **out.metrics}.items():
                        totals[key] = totals.get(key, 0.0) + float(value.detach()) * groups
                    # loss * groups / total, written so that it is loss / grad_accumulation to the last bit when
                    # every micro-batch keeps as many groups (loss itself at grad_accumulation 1)
                    loss = out.loss / (total / groups)
                parallel.backward(loss, last_of_step=index == len(micro_batches) - 1)
        if parallel.all_true(total == 0):
            self.nonfinite_in_a_row = 0
            parallel.skip_step()  # no group of the batch carried a preference: nothing to learn, not even momentum
            return {"loss": math.nan, "skipped": 1.0}, images
        result = parallel.step()
        if not result.applied:
            # an fp16 overflow that made the loss scaler back off is the scale finding its range, not a diverging
            # run: logged as skipped, but not counted towards max_nonfinite_in_a_row
            return self._nonfinite_step(counts_in_a_row=not result.overflow), images
        self.nonfinite_in_a_row = 0
        metrics = {key: value / total for key, value in totals.items()}  # means over the step's kept groups
        if result.grad_norm is not None:
            metrics["grad_norm"] = result.grad_norm
        return metrics, images

    def _nonfinite_step(self, counts_in_a_row: bool) -> dict[str, float]:
        """Count a step skipped for a non-finite loss or gradient; abort after max_nonfinite_in_a_row in a row."""
        self.nonfinite_total += 1
        if counts_in_a_row:
            self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_in_a_row:
            raise FloatingPointError(
                f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (step {self.step}); "
                "lower the learning rate or beta, or check the data (max_nonfinite_in_a_row)")
        return {"loss": math.nan, "skipped": 1.0}


def refuse_to_start_over(checkpoints: CheckpointManager) -> None:
    """A fresh run in a directory holding checkpoints would have its own first checkpoints pruned at once (the
    older run's steps are higher) and a later --resume would continue the older run: refuse, before any work."""
    if (latest := checkpoints.latest()) is not None:
        raise ConfigError(f"output_dir: {checkpoints.directory} already holds checkpoints of a run (latest "
                          f"{latest.name}); pass --resume to continue it, or choose another output_dir (or delete "
                          "this one) to start over")


# settings a resumed training may change: how long it runs, how it checkpoints, logs, validates and where, how fast
# (backends, parallel strategy, compile / fp8, loader); everything else made the checkpoints it continues
RESUMABLE_CHANGES = ("output_dir", "max_steps", "log_every", "checkpoint_every", "keep_checkpoints",
                     "max_nonfinite_in_a_row", "device", "progress", "tensorboard", "wandb_project", "loss_backend",
                     "parallel", "validation", "speed", "data.root", "data.loader", "data.num_workers", "data.verify")


def refuse_to_resume_other_settings(cfg: TrainConfig, checkpoints: CheckpointManager) -> None:
    """A resume continues the checkpoints of the settings in the training's config.yaml: asked with other ones (say
    another lr, rerun into the same output_dir), it would keep the old training and label it with the new settings.
    Refused, naming each changed key, before any work."""
    import yaml

    saved = Path(cfg.output_dir) / "config.yaml"
    if checkpoints.latest() is None or not saved.is_file():
        return
    old, new = yaml.safe_load(saved.read_text()) or {}, to_dict(cfg)
    try:  # a key added since that training was saved reads as its default: the behaviour the training had
        old = to_dict(from_dict(type(cfg), old))
    except ConfigError:  # a key since removed or renamed: compared as saved, so it is named below
        pass
    now, was = flat_differences(old, new), flat_differences(new, old)  # the differing keys' new and saved values
    changed = [key for key in now if not any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES)]
    if changed:
        listed = ", ".join(f"{key}: {was[key]!r} -> {now[key]!r}" for key in changed[:5])
        raise ConfigError(f"output_dir: {cfg.output_dir} holds a training made with other settings ({listed}"
                          f"{', ...' if len(changed) > 5 else ''}; its config.yaml); resuming would continue that "
                          "training under these settings: choose another output_dir, or delete this one to start over")


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    checkpoints = CheckpointManager(Path(cfg.output_dir) / "checkpoints")
    if resume:
        refuse_to_resume_other_settings(cfg, checkpoints)
    else:
        refuse_to_start_over(checkpoints)
    if cfg.objective.name in ONLINE_OBJECTIVES:  # grpo / spo / draft: the policy samples its own training data
        from fastpref.train.online import OnlineTrainer

        return OnlineTrainer(cfg).train(resume=resume)
    return Trainer(cfg).train(resume=resume)
