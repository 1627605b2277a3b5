"""The online trainer: objective.name grpo / spo / draft on the same loop, checkpoints, parallel strategies, metrics
and validation grids as the offline objectives (fastpref.train.loop.Trainer, which this subclasses).

What changes is where the batches come from: instead of a cached dataset, `batches()` asks the online method for a
rollout (the current policy samples the next prompts of a PromptStream under torch.no_grad, a reward scores the
images) and yields the method's micro-batches; `optimizer_step` (the loop's, unchanged) runs the method's
`forward` (the loss) on `micro_batches_per_step` of them and steps. The contract with a method is documented in
fastpref/online/__init__.py.

Exact resume: a rollout is a pure function of the policy at rollout time and (seed, epoch, prompt id), and
checkpoints fall on rollout boundaries (checkpoint_every and max_steps are multiples of the method's
steps_per_rollout), so a checkpoint holds the prompt position (epoch, position in the epoch's order) and no buffered
samples; the run resumed from it draws exactly the rollouts of the uninterrupted one. A method whose steps per
rollout vary (`variable_steps`, SPO with pairs_per_step) may be checkpointed inside a rollout: the checkpoint then
also holds every process's micro-batches of that rollout not trained yet and the rollout's metrics (OnlineStream).
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import time
from pathlib import Path
from typing import Any

import torch

from fastpref.config import ConfigError
from fastpref.online.config import ONLINE_METHODS
from fastpref.online.rollout import PromptStream, WeightedReward, all_gather_rows, unconditional_conditioning
from fastpref.train.checkpoint import CheckpointManager
from fastpref.train.config import DTYPES, TrainConfig
from fastpref.train.loop import Trainer, add_lora, resolve_reference_dtype
from fastpref.train.parallel import build_parallel, local_device
from fastpref.train.speed import (
    apply_model_speedups, autocast, build_lr_scheduler, build_optimizer, check_speed_support, set_attention_backend)
from fastpref.train.step import ReferenceModel, with_denoiser
from fastpref.train.validation import Validator, resolve_prompts


def method_class(name: str):
    module, _, attribute = ONLINE_METHODS[name].partition(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"objective.name: {name!r}: its online method ({ONLINE_METHODS[name]}) is not available "
                          f"({err})") from None


class ParameterEMA:
    """Flow-GRPO's EMA of the trainable weights (flow_grpo/ema.py EMAModuleWrapper): every `every` optimizer steps,
    shadow += (1 - d) (weight - shadow) with d = min((1 + step) / (10 + step), decay). The reference code calls it
    once per training sample-batch; fastpref once per optimizer step (step = optimizer steps done before it)."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float, every: int):
        self.parameters = parameters
        self.decay, self.every = decay, every
        self.shadow = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def update(self, step: int) -> None:
        if (step + 1) % self.every:
            return
        weight = 1.0 - min((1 + step) / (10 + step), self.decay)
        for shadow, parameter in zip(self.shadow, self.parameters):
            shadow.add_(weight * (parameter.detach() - shadow))

    @contextlib.contextmanager
    def applied(self):
        """The EMA weights in the model for the duration (validation grids, exported weights)."""
        saved = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for parameter, shadow in zip(self.parameters, self.shadow):
                parameter.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, value in zip(self.parameters, saved):
                    parameter.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for shadow, saved in zip(self.shadow, state["shadow"], strict=True):
            shadow.copy_(saved)


class OnlineStream:
    """The trainer's `stream` for checkpoints: the prompt position, the method's own state and the EMA, and the
    micro-batches of the current rollout not trained yet (`pending`, this process's; with a fixed number of steps per
    rollout it is empty at every checkpoint, a method with variable steps (SPO's pairs_per_step) may checkpoint
    inside a rollout) with that rollout's metrics."""

    def __init__(self, prompts: PromptStream, method=None, ema: ParameterEMA | None = None, world_size: int = 1):
        self.prompts = prompts
        self.method = method
        self.ema = ema
        self.world_size = world_size
        self.pending: collections.deque = collections.deque()  # (epoch, micro-batch)

    @property
    def epoch(self) -> int:
        return self.prompts.epoch

    def state_dict(self) -> dict[str, Any]:
        """Every process calls it (a checkpoint is collective): the processes' pending micro-batches are gathered."""
        method = self.method.state_dict() if self.method is not None else {}
        ema = self.ema.state_dict() if self.ema is not None else None
        mine = [[epoch, batch] for epoch, batch in self.pending]
        if self.world_size > 1:
            import torch.distributed as dist

            pending = [None] * self.world_size
            dist.all_gather_object(pending, mine)
        else:
            pending = [mine]
        state = {**self.prompts.state_dict(), "method": method, "ema": ema}
        if any(pending):
            state["pending"] = pending
            state["rollout_metrics"] = dict(getattr(self.method, "rollout_metrics", {}))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts.load_state_dict(state)
        if self.method is not None:
            self.method.load_state_dict(state.get("method", {}))
        if self.ema is not None:
            if state.get("ema") is None:
                raise ConfigError("ema: the checkpoint holds no EMA weights (the run was started without the EMA)")
            self.ema.load_state_dict(state["ema"])
        self.pending.clear()
        if "pending" in state:
            if len(state["pending"]) != self.world_size:
                raise ConfigError(f"the checkpoint was written inside a rollout by {len(state['pending'])} processes; "
                                  f"resume it with as many (this run has {self.world_size})")
            self.pending.extend((int(epoch), batch) for epoch, batch in state["pending"][state.get("rank", 0)])
            if self.method is not None:
                self.method.rollout_metrics = dict(state["rollout_metrics"])


class OnlineTrainer(Trainer):
    """Trainer whose batches are rollouts of the policy (see the module docstring)."""

    def __init__(self, cfg: TrainConfig):
        from fastpref.data.prompts import PromptSource, read_prompts
        from fastpref.models import load, resolve_path
        from fastpref.models.bundle import pipeline_call_kwargs

        created = time.perf_counter()
        self.cfg = cfg
        name = cfg.objective.name
        if name not in ONLINE_METHODS:
            raise ConfigError(f"objective.name: {name!r} is not an online method ({sorted(ONLINE_METHODS)})")
        method_cls = method_class(name)
        self.device = local_device(cfg.device)
        check_speed_support(cfg.speed, self.device, DTYPES[cfg.model.dtype])
        self.parallel = build_parallel(cfg.parallel, self.device, cfg.max_grad_norm, cfg.speed.mixed_precision)
        self.rank, self.world_size = self.parallel.rank, self.parallel.world_size
        torch.manual_seed(cfg.seed)
        self.seed = cfg.seed
        cfg.online.check_method(name, self.world_size)
        steps_per_rollout = method_cls.configured_steps_per_rollout(cfg)
        for key in ("checkpoint_every", "max_steps"):
            if getattr(cfg, key) % steps_per_rollout:
                raise ConfigError(f"{key}: {getattr(cfg, key)} is not a multiple of the {steps_per_rollout} optimizer "
                                  "steps of a rollout; checkpoints must fall between rollouts for an exact resume")
        if cfg.grad_accumulation != 1:
            raise ConfigError(f"grad_accumulation: {cfg.grad_accumulation}; online methods accumulate over the "
                              "micro-batches of their rollout (e.g. online.grpo.steps_per_rollout / train_batch_size) "
                              "instead: leave it at 1")
        prompts = read_prompts(PromptSource(cfg.online.prompts, limit=cfg.online.prompt_limit))
        prompt_stream = PromptStream(prompts, cfg.seed, cfg.online.prompts_per_rollout)
        self.reference_mode = "none"
        if method_cls.needs_reference(cfg):
            self.reference_mode = "adapters_off" if cfg.mode == "lora" else "frozen_copy"
        self.reference_dtype = None
        if self.reference_mode == "frozen_copy":
            self.reference_dtype = resolve_reference_dtype(cfg.reference_dtype, self.device, DTYPES[cfg.model.dtype],
                                                           cfg.speed.mixed_precision)
        self.reward = WeightedReward(cfg.online.reward, self.device, cfg.online.reward_batch_size,
                                     cfg.online.reward_paths, cfg.online.resolve_toy_world(cfg.model.path),
                                     cfg.online.reward_kwargs)

        self.bundle = load(cfg.model.path, family=cfg.model.family, dtype=DTYPES[cfg.model.dtype], device=self.device)
        self.family = self.bundle.family
        # the VAE decodes every rollout and the text encoders encode its prompts: kept, frozen, in eval mode
        for module in [self.bundle.vae, *self.bundle.text_modules()]:
            module.requires_grad_(False).eval()
        self.out = Path(cfg.output_dir)
        self.validator = None
        if cfg.validation.enabled:
            if cfg.validation.prompts == "dataset":  # an online run's dataset is its prompt list
                validation_prompts = [p.text for p in prompts[:cfg.validation.num_prompts]]
            else:
                validation_prompts = resolve_prompts(cfg.validation, cfg.data.root, cfg.model.path)
            self.validator = Validator(cfg.validation, self.bundle, validation_prompts, self.out,
                                       pipeline_call_kwargs(resolve_path(cfg.model.path)))
        self.uncond = {key: value.to(self.device) for key, value in unconditional_conditioning(self.bundle).items()}
        denoiser = self.bundle.denoiser
        self.reference = ReferenceModel(self.reference_mode, denoiser, self.reference_dtype)
        if cfg.mode == "lora":
            add_lora(denoiser, cfg.lora)
        denoiser.train()
        self.speedups = apply_model_speedups(denoiser, cfg.speed, self.device)
        self.attention = set_attention_backend(denoiser, cfg.speed.attention, self.device, cfg.speed.mixed_precision)
        module, self.optimizer, self.scheduler = self.parallel.wrap(
            denoiser,
            lambda params: build_optimizer(params, cfg.speed.optimizer, cfg.lr, cfg.weight_decay),
            lambda opt: build_lr_scheduler(opt, cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_steps),
        )
        self.autocast = autocast(self.device, cfg.speed.mixed_precision)
        self.loss_backend = cfg.loss_backend
        # training forwards go through the strategy's wrapper (DDP hooks, FSDP2 / ZeRO); rollouts run the denoiser
        # itself under no_grad (no gradient, nothing to synchronise; FSDP2 shards still gather in its forward)
        self.policy = with_denoiser(self.bundle, module)
        self.sampling_policy = self.bundle
        self.method = method_cls(self)
        self.step_fn = self.method
        self.ema = None
        if (settings := getattr(self.method, "ema_settings", None)) is not None:
            if self.parallel.strategy in ("fsdp2", "zero3"):
                raise ConfigError(f"ema: not supported with parallel: {self.parallel.strategy} (sharded weights); use "
                                  "ddp, zero1 / zero2, or turn the EMA off")
            self.ema = ParameterEMA([p for p in denoiser.parameters() if p.requires_grad], *settings)
        self.stream = OnlineStream(prompt_stream, self.method, self.ema, self.world_size)
        self.checkpoints = CheckpointManager(self.out / "checkpoints", cfg.keep_checkpoints)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self.setup_seconds = time.perf_counter() - created

    # ------------------------------------------------------------------ what methods use
    @torch.no_grad()
    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Per-prompt conditioning on the device (the family pipeline's encode_prompt)."""
        return {key: value.detach() for key, value in self.bundle.encode_prompt(list(texts)).items()}

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's rows in rank order, on the CPU (the tensor itself with one process)."""
        if self.world_size == 1:
            return tensor.cpu()
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        return all_gather_rows(tensor.to(device)).cpu()

    @torch.no_grad()
    def reference_prediction(self, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                             uncond: dict[str, torch.Tensor] | None, guidance_scale: float) -> torch.Tensor:
        """The reference model's (classifier-free guided) prediction: adapters off (LoRA) or the frozen copy."""
        if uncond is None or guidance_scale <= 1.0:
            return self.reference.predict(self.bundle, latents, t, cond, self.autocast)
        n = latents.shape[0]
        both = {key: torch.cat([uncond[key], cond[key]]) for key in cond}
        prediction = self.reference.predict(self.bundle, torch.cat([latents, latents]), torch.cat([t, t]), both,
                                            self.autocast)
        return prediction[:n] + guidance_scale * (prediction[n:] - prediction[:n])

    @contextlib.contextmanager
    def sampling_mode(self):
        """The denoiser in eval mode for a rollout (as the reference code samples), its mode restored after."""
        denoiser = self.bundle.denoiser
        was_training = denoiser.training
        denoiser.eval()
        try:
            yield
        finally:
            denoiser.train(was_training)

    # ------------------------------------------------------------------ the loop's hooks
    @property
    def micro_batches_per_step(self) -> int:
        return self.method.micro_batches_per_step

    def batches(self):
        """(epoch, micro-batch) forever: one rollout per method.steps_per_rollout optimizer steps. The rollout's
        micro-batches wait in stream.pending (checkpointed) until the loop takes them."""
        pending = self.stream.pending
        while True:
            if not pending:
                prompts = self.stream.prompts.next()
                with self.sampling_mode(), self.attention:
                    parts = self.method.rollout(prompts)
                variable = getattr(self.method, "variable_steps", False)
                if (not parts or (not variable and len(parts) != self.method.steps_per_rollout)
                        or any(len(part) != self.micro_batches_per_step for part in parts)):
                    raise RuntimeError(f"{type(self.method).__name__}.rollout returned {[len(p) for p in parts]} "
                                       f"micro-batches; expected {self.method.steps_per_rollout} steps of "
                                       f"{self.micro_batches_per_step}")
                pending.extend((prompts.epoch, micro_batch) for part in parts for micro_batch in part)
            yield pending.popleft()

    def optimizer_step(self, batches) -> tuple[dict, int]:
        """The loop's step, its metrics joined by the statistics of the rollout its micro-batches came from (reward
        mean / std, advantages, ...; logged even when the step had nothing to learn and was skipped)."""
        metrics, images = super().optimizer_step(batches)
        if self.ema is not None and not metrics.get("skipped"):
            self.ema.update(self.step)
        return {**self.method.rollout_metrics, **metrics}, images

    def validate(self, logger=None) -> Path | None:
        """The validation grid, of the EMA weights when the method keeps an EMA (as the reference code evaluates)."""
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
            return self.validator.run(self.bundle, self.step, self.parallel.is_main, logger, autocast=self.autocast,
                                      attention=self.attention)

    def save_checkpoint(self) -> Path | None:
        """The loop's checkpoint (raw weights: the resume continues from them), plus with an EMA its weights in the
        diffusers formats under <checkpoint>/ema/ (lora/ or denoiser/), written aside and renamed into place."""
        import shutil

        from fastpref.train.loop import save_lora

        path = super().save_checkpoint()
        if self.ema is not None and path is not None:  # the main rank (the EMA is replicated)
            tmp = path / ".ema.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            with self.ema.applied():
                if self.cfg.mode == "lora":
                    save_lora(self.bundle, tmp / "lora")
                else:
                    self.bundle.denoiser.save_pretrained(str(tmp / "denoiser"))
            tmp.rename(path / "ema")
        return path
