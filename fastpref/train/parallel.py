"""Data parallelism: one process, DDP, FSDP2 (`fully_shard`) or DeepSpeed ZeRO-1/2/3, behind one small interface.

Launch with torchrun (or the deepspeed launcher); RANK / WORLD_SIZE / LOCAL_RANK come from the environment. On CPU
the process group uses gloo (DeepSpeed needs DS_ACCELERATOR=cpu there), on GPUs nccl. Each rank streams its own
share of every global batch (fastpref.data.dataset shards the epoch plan by rank), so `data.batch_groups` is per
process and the global batch is batch_groups x world size.

fp16 (speed.mixed_precision: fp16, or fp16 weights) trains with dynamic loss scaling. Strategies none / ddp / fsdp2
use torch.amp.GradScaler: `backward` scales the loss, `clip_grad_norm` unscales the gradients first (so the norm, the
clipping and the reported grad_norm are the true ones; an overflow makes the norm inf and the loop skips the step on
every rank like any non-finite gradient), `skip_step` then halves the scale, `step` steps through the scaler and lets
the scale grow after growth_interval clean steps. FSDP2's DTensor gradients work with the plain scaler: DTensor
all-reduces (max) the found-inf flag of the unscale op over the mesh, so every rank backs off together. DeepSpeed ZeRO
uses its own fp16 block (dynamic loss scale with the same schedule); its overflow check runs inside engine.step, which
then skips the update: `last_step_skipped` says so. The scale and its growth tracker are checkpointed.
bf16 and fp32 have no scaler (`scaler` is None) and run exactly as before.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from fastpref.train.checkpoint import CheckpointError, load_state, save_state
from fastpref.train.config import Strategy  # noqa: F401 (the strategy names, re-exported)
from fastpref.train.speed import (REGIONAL_BLOCK_LISTS, REGIONAL_SINGLE_BLOCKS, UnsupportedSpeedOption,
                                  init_adafactor_state_on_dtensors, is_adafactor, make_grad_scaler)
from fastpref.utils.imports import require

# Below this loss scale an overflow is the model's, not the scale's (DeepSpeed's min_loss_scale is the same).
MIN_LOSS_SCALE = 1.0
STATE_FILE = "trainer_state.pt"


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); starts the process group when launched with WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def local_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


@dataclass
class StepResult:
    """What one optimizer step did, the same for every strategy (and on every rank)."""

    applied: bool  # the weights were updated
    grad_norm: float | None  # this step's global gradient norm before clipping (None: not computed)
    # an fp16 overflow made the loss scaler back off (scale still >= MIN_LOSS_SCALE): the scale finding its range,
    # not a diverging run
    overflow: bool = False


class Parallel:
    """One process (also the base class): what the loop calls around forward / backward / step / checkpoint.

    A strategy changes `_distribute` (wrap the module: DDP, FSDP2's fully_shard), `_wrap_optimizer` (DeepSpeed's
    engine), the backward / step / skip of its loss scaling, and how the optimizer state is gathered for a checkpoint.
    """

    strategy: str = "none"

    def __init__(self, device: torch.device, mixed_precision: str = "no", max_grad_norm: float = 1.0):
        self.device = device
        self.mixed_precision = mixed_precision
        self.max_grad_norm = max_grad_norm
        self.rank, self.world_size = init_distributed(device)
        self.scaler: torch.amp.GradScaler | None = None  # set by wrap when the gradients are computed in fp16
        self.last_step_skipped = False  # the last step() / skip_step() left the weights unchanged
        # the last skip was an fp16 overflow that halved the loss scale (still >= MIN_LOSS_SCALE): the scaler
        # looking for its range, not a diverging run
        self.scaler_backed_off = False
        self._unscaled = False  # clip_grad_norm unscaled this step's gradients: the scaler expects an update
        self._grads_overflowed = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, denoiser: torch.nn.Module, build_optimizer: Callable, build_scheduler: Callable):
        """(module to run forward on, optimizer, lr scheduler)."""
        self.module = denoiser
        self._setup_loss_scaling(denoiser)  # before any wrapper: it reads the parameters' own dtype
        module = self._distribute(denoiser)
        optimizer = build_optimizer(denoiser.parameters())
        module, self.optimizer, self.scheduler = self._wrap_optimizer(module, optimizer, build_scheduler(optimizer))
        return module, self.optimizer, self.scheduler

    def _distribute(self, denoiser: torch.nn.Module) -> torch.nn.Module:
        """The module the forward runs on (the strategy's wrapper, or the denoiser sharded in place)."""
        return denoiser

    def _wrap_optimizer(self, module, optimizer, scheduler):
        return module, optimizer, scheduler

    def _computes_in_fp16(self, denoiser: torch.nn.Module) -> bool:
        """fp16 autocast, or fp16 weights outside a bf16 autocast (bf16 runs never get a loss scaler)."""
        if self.mixed_precision in ("fp16", "bf16"):
            return self.mixed_precision == "fp16"
        return any(p.dtype == torch.float16 for p in denoiser.parameters())

    def _setup_loss_scaling(self, denoiser: torch.nn.Module) -> None:
        """A dynamic loss scaler when the backward runs in fp16 (fp16 autocast or fp16 weights); none otherwise."""
        if self._computes_in_fp16(denoiser):
            self.scaler = make_grad_scaler(self.device)

    @property
    def loss_scale(self) -> float | None:
        """The current loss scale (None: no loss scaling)."""
        return self.scaler.get_scale() if self.scaler is not None else None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, last_of_step: bool = True) -> None:
        """Accumulate the loss's gradient; last_of_step: the step's last micro-batch (DeepSpeed reduces there)."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the (unscaled) gradients to max_norm; returns their global norm before clipping (inf or nan when a
        gradient overflowed)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            self._unscaled = True
        norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), max_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self._grads_overflowed = self.scaler is not None and not math.isfinite(float(norm))
        return norm

    def step(self) -> StepResult:
        """Clip to max_grad_norm and update, or, when any rank's gradient norm is not finite, skip on every rank
        (with loss scaling: an overflow halves the scale). The schedule advances either way."""
        grad_norm = float(self.clip_grad_norm(self.max_grad_norm))
        if not self.all_true(math.isfinite(grad_norm)):
            self.skip_step()
            return StepResult(applied=False, grad_norm=grad_norm, overflow=self.scaler_backed_off)
        self.scaler_backed_off = False
        if self.scaler is None:
            self.optimizer.step()
            self.last_step_skipped = False
            self.scheduler.step()
            return StepResult(applied=True, grad_norm=grad_norm)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)  # skips optimizer.step itself on an inf / nan clip_grad_norm did not see
        self.scaler.update()
        self.last_step_skipped = self.scaler.get_scale() < scale  # it backs off exactly when it skipped
        self._unscaled = self._grads_overflowed = False
        self.advance_schedule()
        return StepResult(applied=not self.last_step_skipped, grad_norm=grad_norm, overflow=self.last_step_skipped)

    def skip_step(self, unfinished_loss: torch.Tensor | None = None) -> None:
        """A skipped step still advances the schedule, so that all ranks and resumed runs stay in lockstep.
        unfinished_loss: the loss of the micro-batch that stopped the step before its backward (DeepSpeed needs it).

        With loss scaling: gradients that overflowed (clip_grad_norm saw a non-finite norm) halve the scale; any
        other skip (a non-finite loss before backward, a batch without preferences) leaves scale and growth
        tracker as they were."""
        self.scaler_backed_off = False
        if self.scaler is not None and self._unscaled:
            if self._grads_overflowed:
                self.scaler.update()  # found inf: scale x backoff_factor, growth tracker reset
                self.scaler_backed_off = self.scaler.get_scale() >= MIN_LOSS_SCALE
            else:
                self.scaler.update(self.scaler.get_scale())  # same scale; only clears this step's inf checks
        self._unscaled = self._grads_overflowed = False
        self.last_step_skipped = True
        self.zero_grad()
        self.advance_schedule()

    def advance_schedule(self) -> None:
        with warnings.catch_warnings():  # a skip before the first update is intended, not a misordered call
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()

    def all_true(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        value = torch.tensor([0.0 if flag else 1.0])
        dist.all_reduce(value)  # gloo and nccl both sum; any rank's 1 means "not all true"
        return value.item() == 0.0

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1 or not values:
            return values
        keys = sorted(values)
        tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(tensor)
        return {k: float(v) / self.world_size for k, v in zip(keys, tensor.tolist())}

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    @contextlib.contextmanager
    def gathered(self):
        """Inside: module.named_parameters() are full tensors on every rank (a no-op without sharding)."""
        yield

    def load_trainable(self, path: Path) -> None:
        from fastpref.train.checkpoint import load_trainable

        load_trainable(self.module, path)

    # The training state beyond the trainable weights (which the loop saves from `gathered` parameters), as plain
    # data that loads with weights_only=True (fastpref.train.checkpoint.save_state / load_state).
    def save_state(self, directory: Path, extra: dict[str, Any]) -> None:
        optimizer = self._optimizer_state()  # a collective for sharded strategies: every rank calls it
        if self.is_main:
            save_state({"optimizer": optimizer, "scheduler": self.scheduler.state_dict(), **self._scaler_state(),
                        **extra}, directory / STATE_FILE)

    def load_state(self, directory: Path) -> dict[str, Any]:
        state = load_state(directory / STATE_FILE)
        self._load_optimizer_state(state.pop("optimizer"))
        self.scheduler.load_state_dict(state.pop("scheduler"))
        self._load_scaler_state(state, directory)
        return state

    def _optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def _load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def _scaler_state(self) -> dict[str, Any]:
        return {"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def _load_scaler_state(self, state: dict[str, Any], directory: Path) -> None:
        saved = state.pop("grad_scaler", None)
        if self.scaler is None:
            return  # a bf16 / fp32 resume of an fp16 run: the loss scale has no use
        if saved is None:
            warnings.warn(f"checkpoint {directory}: no loss-scaler state (it was not written by an fp16 run); "
                          f"the loss scale restarts at {self.scaler.get_scale():g}", stacklevel=3)
            return
        self.scaler.load_state_dict(saved)

    def close(self) -> None:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


class DDP(Parallel):
    strategy = "ddp"

    def _distribute(self, denoiser):
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(denoiser, device_ids=ids) if self.world_size > 1 else denoiser


class FSDP2(Parallel):
    """Per-parameter sharding with torch.distributed.fsdp.fully_shard on each repeated block, then the root.
    The sharded gradients stay DTensors: the plain GradScaler handles them."""

    strategy = "fsdp2"

    def _distribute(self, denoiser):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs = {}
        if self.mixed_precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.mixed_precision == "bf16" else torch.float16
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        blocks = [b for name in REGIONAL_BLOCK_LISTS for b in (getattr(denoiser, name, None) or [])]
        blocks += [getattr(denoiser, n) for n in REGIONAL_SINGLE_BLOCKS if getattr(denoiser, n, None) is not None]
        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(denoiser, **kwargs)
        return denoiser

    def _wrap_optimizer(self, module, optimizer, scheduler):
        if is_adafactor(optimizer):
            init_adafactor_state_on_dtensors(optimizer)
        return module, optimizer, scheduler

    @contextlib.contextmanager
    def gathered(self):
        from torch.distributed.tensor import DTensor

        params = dict(self.module.named_parameters())
        full = {name: p.full_tensor() for name, p in params.items() if isinstance(p, DTensor) and p.requires_grad}
        sharded = {}
        for name, tensor in full.items():
            module_name, _, attr = name.rpartition(".")
            owner = self.module.get_submodule(module_name) if module_name else self.module
            sharded[name] = (owner, attr, owner._parameters[attr])
            owner._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=True)
        try:
            yield
        finally:
            for owner, attr, param in sharded.values():
                owner._parameters[attr] = param

    def load_trainable(self, path):
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        saved = load_file(str(path))
        expected = {n for n, p in self.module.named_parameters() if p.requires_grad}
        if set(saved) != expected:
            raise RuntimeError(f"checkpoint {path}: trainable parameters do not match the model")
        set_model_state_dict(self.module, saved, options=StateDictOptions(full_state_dict=True, strict=False))

    def _optimizer_state(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.module, self.optimizer, options=options)

    def _load_optimizer_state(self, state):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.module, self.optimizer, state, options=StateDictOptions(full_state_dict=True))


# DeepSpeed's dynamic loss scale with torch.amp.GradScaler's schedule: start at 2**16, halve at every overflow
# (hysteresis 1), double after 2000 clean steps.
DEEPSPEED_FP16 = {"enabled": True, "auto_cast": False, "loss_scale": 0, "initial_scale_power": 16,
                  "loss_scale_window": 2000, "hysteresis": 1, "min_loss_scale": 1}


class DeepSpeedZero(Parallel):
    """DeepSpeed ZeRO stage 1/2/3 around the same torch optimizer and LR schedule.

    fp16 uses DeepSpeed's fp16 block (fp16 module, fp32 master weights in the ZeRO optimizer, dynamic loss scale),
    never a torch GradScaler: engine.backward scales; engine.step computes the global norm, clips, checks for
    overflow on all ranks and skips.
    """

    def __init__(self, device: torch.device, stage: int, max_grad_norm: float, mixed_precision: str = "no"):
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self.deepspeed = require("deepspeed", f"parallel: zero{stage}")
        if mixed_precision == "fp16":
            from deepspeed.accelerator import get_accelerator

            accelerator = get_accelerator()
            if not accelerator.is_fp16_supported():
                raise UnsupportedSpeedOption(
                    f"speed.mixed_precision=fp16: DeepSpeed's {accelerator.device_name()} accelerator has no fp16 "
                    f"support on this machine, so parallel=zero{stage} cannot train in fp16; allowed values here: "
                    "no, bf16")
        super().__init__(device, mixed_precision, max_grad_norm)
        self.stage = stage
        self.strategy = f"zero{stage}"
        self.config = {
            "train_micro_batch_size_per_gpu": 1,  # batches are built by fastpref; DeepSpeed only needs a number
            "gradient_accumulation_steps": 1,
            "gradient_clipping": max_grad_norm,
            "zero_optimization": {"stage": stage},
            "bf16": {"enabled": mixed_precision == "bf16", "check_grad_overflow": True},  # skip NaN / inf updates
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.fp16 = False
        self.accumulating = False  # a backward of this step was not its last micro-batch's

    def _setup_loss_scaling(self, denoiser):
        # DeepSpeed scales the loss itself (the fp16 block); no torch GradScaler next to it
        self.fp16 = self._computes_in_fp16(denoiser)
        if self.fp16:
            self.config["fp16"] = dict(DEEPSPEED_FP16)

    @property
    def loss_scale(self):
        return float(self.engine.optimizer.loss_scale) if self.fp16 else None  # the ZeRO optimizer keeps it

    def _wrap_optimizer(self, module, optimizer, scheduler):
        self.engine, optimizer, _, scheduler = self.deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=self.config,
            model_parameters=[p for p in module.parameters() if p.requires_grad],
        )
        return self.engine, optimizer, scheduler

    def zero_grad(self):
        self.engine.zero_grad()

    def backward(self, loss, last_of_step=True):
        # DeepSpeed's own accumulation counter is configured for 1 micro-batch per step (fastpref counts them), so
        # every backward would be a boundary: ZeRO-1/2 then keep only the last micro-batch's reduced gradient
        # (measured: GRPO's 3 timesteps per step gave a grad norm of 0.0041 instead of 0.0054, 1 process too).
        self.engine.set_gradient_accumulation_boundary(last_of_step)
        self.engine.backward(loss)
        self.accumulating = not last_of_step

    def clip_grad_norm(self, max_norm):
        # DeepSpeed clips inside engine.step (config gradient_clipping); report the norm it computed last
        norm = self.engine.get_global_grad_norm()
        return torch.tensor(float("nan") if norm is None else float(norm))

    def step(self) -> StepResult:
        schedule = self.scheduler.last_epoch
        self.engine.step()
        norm = self.engine.get_global_grad_norm()  # this step's: engine.step computed it just now
        grad_norm = None if norm is None else float(norm)
        applied = self.engine.was_step_applied()
        self.last_step_skipped = not applied
        if not applied:
            # an fp16 overflow or a non-finite gradient norm (the same on every rank): DeepSpeed skipped the update
            # and its LR step; every step advances the schedule once, skipped or not
            if self.scheduler.last_epoch == schedule:
                self.advance_schedule()
            return StepResult(applied=False, grad_norm=grad_norm, overflow=self.fp16)
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise FloatingPointError(
                f"DeepSpeed applied an update with a non-finite gradient norm ({grad_norm}): the weights may hold "
                "NaN / inf now; its overflow check is off (bf16.check_grad_overflow: false, or a DeepSpeed without "
                "it). Resume from the last checkpoint with a DeepSpeed that checks")
        return StepResult(applied=True, grad_norm=grad_norm)

    def skip_step(self, unfinished_loss=None):
        self.last_step_skipped = True
        schedule = self.scheduler.last_epoch
        if self.accumulating and unfinished_loss is not None:
            # ZeRO-2/3 hold the step's earlier micro-batches in partitioned buffers that only engine.step() resets
            # (engine.zero_grad() left them in the next step's gradient: its norm 0.00494 instead of 0.00517): the
            # step is finished with a NaN gradient, which DeepSpeed's overflow check discards without an update.
            # Under fp16 that also halves DeepSpeed's loss scale.
            self.engine.set_gradient_accumulation_boundary(True)
            self.engine.backward(unfinished_loss * float("nan"))
            self.engine.step()
            self.accumulating = False
            if self.engine.was_step_applied():
                raise FloatingPointError("DeepSpeed applied an update with a NaN gradient while discarding a step "
                                         "with a non-finite loss: its overflow check is off (bf16.check_grad_overflow)")
        self.engine.zero_grad()
        if self.scheduler.last_epoch == schedule:
            self.advance_schedule()

    @contextlib.contextmanager
    def gathered(self):
        if self.stage == 3:
            params = [p for p in self.module.parameters() if p.requires_grad]
            with self.deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield
        else:
            yield

    def load_trainable(self, path):
        pass  # engine.load_checkpoint (load_state) restores the module, partitioned as DeepSpeed keeps it

    def save_state(self, directory, extra):
        # DeepSpeed writes its own module / optimizer partitions; everything of fastpref's goes to STATE_FILE
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False)
        if self.is_main:
            save_state(extra, directory / STATE_FILE)

    def load_state(self, directory):
        state = load_state(directory / STATE_FILE)
        ds_dir = directory / "deepspeed"
        # DeepSpeed unpickles its files with weights_only=False: each must first pass the weights_only check, with
        # the plain DeepSpeed records its ZeRO optimizer state holds allowed
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        for path in sorted(ds_dir.rglob("*.pt")):  # DynamicLossScaler: fp16's dynamic loss scaling
            load_state(path, allowed=(fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum))
        if not ds_dir.is_dir():
            raise CheckpointError(f"checkpoint {directory}: no DeepSpeed state in {ds_dir}")
        self.engine.load_checkpoint(str(ds_dir), tag="state")
        return state


def build_parallel(strategy: str, device: torch.device, max_grad_norm: float, mixed_precision: str) -> Parallel:
    if strategy == "none":
        return Parallel(device, mixed_precision, max_grad_norm)
    if strategy == "ddp":
        return DDP(device, mixed_precision, max_grad_norm)
    if strategy == "fsdp2":
        return FSDP2(device, mixed_precision, max_grad_norm)
    if strategy in ("zero1", "zero2", "zero3"):
        return DeepSpeedZero(device, int(strategy[-1]), max_grad_norm, mixed_precision)
    raise ValueError(f"parallel must be one of none, ddp, fsdp2, zero1, zero2, zero3; got {strategy!r}")
