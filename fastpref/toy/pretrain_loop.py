"""The step loop shared by the toy trainers (VAE, diffusion families, ShapeCLIP): run arguments, the --minutes /
--steps budget, the lr schedule and the optimizer steps."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastpref.utils.imports import require

FAMILIES = ("vae", "toy-sd", "toy-sdxl", "toy-sd3")
STEPS_TIMED_BEFORE_FIXING_SCHEDULE = 10


@dataclass
class PretrainArgs:
    family: str
    out: Path
    seed: int = 0
    minutes: float | None = None
    steps: int | None = None
    batch_size: int = 64
    lr: float | None = None
    vae: Path | None = None
    work_dir: Path | None = None
    checkpoint_every: int = 200
    resume: bool = False
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    early_fraction: float | None = None
    early_out: Path | None = None
    link_vae: bool = False
    latent_cache: Path | None = None
    size: str = "toy"  # "toy" (shipped) or "tiny" (tests)
    world: str = "v1"  # the toy world (fastpref.toy.world.WORLDS) whose images and captions the model learns
    threads: int = 2
    progress: bool = True
    init: Path | None = None  # a saved pipeline of the family to continue from (default: random weights)
    color_confusion: float = 0.0  # probability of swapping each color word for its confusable partner
    freeze_text: bool = False  # train the denoiser only (as SD's pretraining keeps CLIP frozen)


def command_line() -> str:
    import shlex
    import sys

    return "python -m fastpref.toy.pretrain " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], the diffusers VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(pixels: torch.Tensor) -> np.ndarray:
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.05) -> float:
    """Multiplier of the base lr: linear warm-up, then cosine decay to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class StepBudget:
    """Turns --minutes into a step count (or takes --steps as given).

    The CPU is shared, so speed drifts: the count is first fixed after a few timed steps, then
    re-estimated every RE_ESTIMATE_EVERY steps during the first half of the budget. The final count
    is recorded in metrics.json; --steps with it reruns the schedule (up to those early re-estimates).
    """

    RE_ESTIMATE_EVERY = 25

    def __init__(self, steps: int | None, minutes: float | None):
        if (steps is None) == (minutes is None):
            raise ValueError("pretrain: give exactly one of --steps and --minutes")
        self.total = steps
        self.minutes = minutes
        self.start = time.perf_counter()

    def settle(self, step: int) -> None:
        """Call after each step (0-based `step` just finished)."""
        if self.minutes is None:
            return
        done = step + 1
        elapsed = time.perf_counter() - self.start
        first_fix = self.total is None and done == STEPS_TIMED_BEFORE_FIXING_SCHEDULE
        re_estimate = self.total is not None and done % self.RE_ESTIMATE_EVERY == 0 and elapsed < 30 * self.minutes
        if first_fix or re_estimate:
            remaining_seconds = max(0.0, self.minutes * 60 - elapsed)
            self.total = max(done + 1, done + int(remaining_seconds / (elapsed / done)))

    @property
    def provisional_total(self) -> int:
        # until the schedule is fixed, the lr warm-up needs some horizon: a short, harmless guess
        return self.total if self.total is not None else 10**6

    def elapsed_minutes(self) -> float:
        return (time.perf_counter() - self.start) / 60


def loss_summary(losses: list[float]) -> dict:
    """Mean loss over the first and the last quarter of the run (at most 100 steps each)."""
    if not losses:
        return {"first_loss": None, "final_loss": None}
    window = max(1, min(100, len(losses) // 4))
    return {"first_loss": float(np.mean(losses[:window])), "final_loss": float(np.mean(losses[-window:]))}


def resumed_budget(args: PretrainArgs, state: dict) -> "StepBudget":
    """--steps wins (it may extend a resumed run); else a resumed run keeps its step count."""
    if args.steps is not None or not state["total"]:
        return StepBudget(args.steps, args.minutes if args.steps is None else None)
    return StepBudget(state["total"], None)


def _progress(total_hint: int | None, enabled: bool, desc: str, done: int = 0):
    tqdm = require("tqdm", "toy training progress bars")
    # a resumed run's bar starts where the run is, so its rate and ETA are about the steps left
    return tqdm.tqdm(total=total_hint, initial=done, desc=desc, disable=not enabled, mininterval=5.0)


def optimizer_steps(
    budget: StepBudget,
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    next_loss: Callable[[], torch.Tensor],
    losses: list[float],
    *,
    base_lr: float,
    warmup: int,
    floor: float = 0.05,
    start_step: int = 0,
    desc: str,
    progress: bool,
    loss_window: int = 50,
    show_loss_every: int = 1,
    loss_digits: int = 4,
) -> Iterator[int]:
    """The step loop of the toy trainers (VAE, diffusion families, ShapeCLIP), until `budget` is spent.

    Each step sets the lr to base_lr x cosine_lr(step, ...), computes next_loss(), zeroes the grads,
    backpropagates, clips the gradient norm of `params` to 1 and steps the optimizer; the loss is
    appended to `losses`, the budget settles and the progress bar moves (the mean of the last
    `loss_window` losses, every `show_loss_every` steps). Then it yields the number of steps done, for
    the caller's per-step work (EMA update, checkpoints, snapshots); the bar closes when the budget is spent.
    """
    bar = _progress(budget.total, progress, desc, done=start_step)
    step = start_step
    while budget.total is None or step < budget.total:
        for group in optimizer.param_groups:
            group["lr"] = base_lr * cosine_lr(step, budget.provisional_total, warmup=warmup, floor=floor)
        loss = next_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        budget.settle(step)
        step += 1
        bar.total = budget.total
        bar.update(1)
        if step % show_loss_every == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-loss_window:]):.{loss_digits}f}")
        yield step
    bar.close()
