"""Reproducible pretraining of the toy world's models (a shared VAE, then toy-sd / toy-sdxl / toy-sd3).

    python -m fastpref.toy.pretrain --family vae --minutes 11 --seed 0 --out fastpref/toy/weights/vae
    python -m fastpref.toy.pretrain --family toy-sd --minutes 20 --seed 0 \\
        --vae fastpref/toy/weights/vae --out fastpref/toy/weights/toy-sd

--minutes is a budget: the first steps are timed and fixed the step count (printed and written to
the run's metrics.json); --steps N reruns the same schedule exactly. Images come fresh from
world.sample_batch (train split) every step, so there is no epoch; the diffusion families train
their text encoders jointly with the denoiser, drop 10% of captions (for classifier-free guidance),
keep an EMA of the trainable weights and save a complete diffusers pipeline folder (denoiser in fp16,
text encoders and VAE in fp32: diffusers keeps a component in the dtype it was saved in, and a mixed
fp16/fp32 pipeline would fail in its matmuls). Resumable training state goes to --work-dir.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastpref.models.bundle import toy_vae_config
from fastpref.train.checkpoint import load_state
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
    threads: int = 2
    progress: bool = True


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


def _progress(total_hint: int | None, enabled: bool, desc: str):
    tqdm = require("tqdm", "toy training progress bars")
    return tqdm.tqdm(total=total_hint, desc=desc, disable=not enabled, mininterval=5.0)


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
    bar = _progress(budget.total, progress, desc)
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


# ------------------------------------------------------------------------------------------- VAE


# weight of pixels that belong to an object, relative to background pixels: objects cover ~10% of
# the image, and their corners and colors are what the verifier (and every caption) depends on
OBJECT_PIXEL_WEIGHT = 5.0
KL_WEIGHT = 1e-4


def vae_loss(vae, pixels: torch.Tensor, sample_generator: torch.Generator | None = None) -> torch.Tensor:
    from fastpref.toy import world

    posterior = vae.encode(pixels).latent_dist
    latents = posterior.sample(generator=sample_generator)
    recon = vae.decode(latents).sample
    background = images_to_tensor(np.array(world.BACKGROUND, dtype=np.uint8).reshape(1, 1, 1, 3))
    is_object = (pixels - background).abs().amax(dim=1, keepdim=True) > 0.05
    weight = 1.0 + (OBJECT_PIXEL_WEIGHT - 1.0) * is_object.float()
    error = recon - pixels
    reconstruction = (weight * (error.square() + error.abs())).mean()
    kl_per_element = posterior.kl().mean() / latents[0].numel()
    return reconstruction + KL_WEIGHT * kl_per_element


@torch.no_grad()
def latent_statistics(vae, rng: np.random.Generator, num_images: int = 2048, batch: int = 256) -> tuple[float, float]:
    """Mean and std of sampled latents over fresh train images: the VAE's shift/scaling factors."""
    from fastpref.toy import world

    chunks = []
    for start in range(0, num_images, batch):
        images, _ = world.sample_batch(rng, min(batch, num_images - start), split="train")
        chunks.append(vae.encode(images_to_tensor(images)).latent_dist.sample())
    latents = torch.cat(chunks).double()
    return latents.mean().item(), latents.std().item()


@torch.no_grad()
def reconstruction_pass_rate(vae, rng: np.random.Generator, split: str = "eval", num_images: int = 500) -> float:
    """Share of VAE reconstructions that the verifier still accepts for the rendered spec."""
    from fastpref.toy import verifier, world

    specs = [world.sample_spec(rng, split) for _ in range(num_images)]
    images = np.stack([world.render(spec, rng) for spec in specs])
    passed = 0
    for start in range(0, num_images, 250):
        pixels = images_to_tensor(images[start : start + 250])
        recon = tensor_to_images(vae.decode(vae.encode(pixels).latent_dist.mode()).sample)
        passed += sum(verifier.verify(img, spec) for img, spec in zip(recon, specs[start : start + 250]))
    return passed / num_images


def train_vae(args: PretrainArgs) -> dict:
    diffusers = require("diffusers", "toy VAE pretraining")
    from fastpref.toy import world

    rng = seed_everything(args.seed)
    vae = diffusers.AutoencoderKL(**toy_vae_config(args.size))
    base_lr = args.lr or 1e-3
    optimizer = torch.optim.AdamW(vae.parameters(), lr=base_lr, weight_decay=0.0)
    sample_generator = torch.Generator().manual_seed(args.seed + 1)
    state = _maybe_resume(args, {"vae": vae}, optimizer, rng, generator=sample_generator)
    start_step, rng = state["step"], state["rng"]
    budget = resumed_budget(args, state)

    def next_loss() -> torch.Tensor:
        images, _ = world.sample_batch(rng, args.batch_size, split="train")
        return vae_loss(vae, images_to_tensor(images), sample_generator)

    losses: list[float] = []
    step = start_step
    for step in optimizer_steps(budget, optimizer, list(vae.parameters()), next_loss, losses, base_lr=base_lr,
                                warmup=50, start_step=start_step, desc="vae", progress=args.progress, loss_window=20):
        if args.work_dir and step % args.checkpoint_every == 0:
            _save_checkpoint(args, {"vae": vae}, optimizer, rng, step, budget.total, generator=sample_generator)
    vae.eval()
    # fewer images for the tests' tiny runs: these are summaries, not what the run trains on
    stat_images, eval_images = (2048, 500) if args.size == "toy" else (128, 32)
    mean, std = latent_statistics(vae, np.random.default_rng(args.seed + 2), stat_images)
    # SD/SDXL pipelines multiply by scaling_factor only; SD3 subtracts shift_factor first. With
    # both set, one VAE folder serves every family (the bundle follows each family's convention).
    vae.register_to_config(scaling_factor=1.0 / std, shift_factor=mean)
    metrics = {
        "command": command_line(),
        "family": "vae",
        "steps": step,
        "seed": args.seed,
        "minutes": round(budget.elapsed_minutes(), 2),
        **loss_summary(losses),
        "latent_mean": mean,
        "latent_std": std,
        "recon_pass_rate_eval": reconstruction_pass_rate(vae, np.random.default_rng(args.seed + 3), "eval", eval_images),
        "recon_pass_rate_train": reconstruction_pass_rate(vae, np.random.default_rng(args.seed + 4), "train", eval_images),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    # fp16 halves the shipped size; diffusers upcasts to the dtype asked for on load
    copy.deepcopy(vae).half().save_pretrained(args.out, safe_serialization=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


# ------------------------------------------------------------------------------ diffusion models

DIFFUSION_LR = {"toy-sd": 8e-4, "toy-sdxl": 8e-4, "toy-sd3": 5e-4}
LATENT_POOL_IMAGES = 16_000
LR_WARMUP_STEPS = 100


def family_module(family: str):
    from fastpref.models import sd, sd3, sdxl

    modules = {"toy-sd": sd, "toy-sdxl": sdxl, "toy-sd3": sd3}
    if family not in modules:
        raise ValueError(f"pretrain: unknown diffusion family {family!r} (expected one of {sorted(modules)})")
    return modules[family]


def build_toy_bundle(family: str, vae, size: str = "toy", seed: int = 0):
    """A randomly initialised toy model of `family` around a trained VAE and the world tokenizer."""
    from fastpref.toy.tokenizer import build_tokenizer

    module = family_module(family)
    return module.build_random(module.tiny_config(size), build_tokenizer(), vae=vae, seed=seed)


def _file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


@torch.no_grad()
def latent_pool(vae, vae_dir: Path, seed: int, num_images: int, cache_dir: Path | None) -> dict:
    """Posterior mean/std of `num_images` fresh train images (and their captions), encoded once.

    Cached per VAE weights + seed + size so that the three families share one encoding pass; a
    latent is drawn from N(mean, std) at every use, which keeps the VAE's sampling noise.
    """
    from fastpref.toy import world

    weights = next(iter(sorted(vae_dir.glob("*.safetensors"))), None)
    key = f"latents-{_file_digest(weights) if weights else 'random'}-{num_images}-{seed}.pt"
    if cache_dir is not None and (cache_dir / key).exists():
        return load_state(cache_dir / key)  # plain data only: a planted cache file cannot run code
    rng = np.random.default_rng(seed + 1000)
    means, stds, captions = [], [], []
    for start in range(0, num_images, 500):
        images, batch_captions = world.sample_batch(rng, min(500, num_images - start), split="train")
        posterior = vae.encode(images_to_tensor(images)).latent_dist
        means.append(posterior.mean.half())
        stds.append(posterior.std.half())
        captions.extend(batch_captions)
    pool = {"mean": torch.cat(means), "std": torch.cat(stds), "captions": captions}
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        torch.save(pool, cache_dir / key)
    return pool


def pool_latents(bundle, pool: dict, index: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    """Sample latents for pool entries `index` and scale them as the family's pipeline expects."""
    mean = pool["mean"][index].float()
    latents = mean + pool["std"][index].float() * torch.randn(mean.shape, generator=generator)
    if bundle.uses_shift_factor:
        latents = latents - bundle.vae.config.shift_factor
    return latents * bundle.vae.config.scaling_factor


def save_toy_pipeline(bundle, out: Path) -> None:
    """Save as a diffusers pipeline: denoiser and VAE in fp16 (diffusers upcasts them on load to the
    requested dtype), text encoders in fp32 (transformers would keep fp16 and the pipeline would
    then feed fp16 embeddings to an fp32 denoiser)."""
    import dataclasses

    half = dataclasses.replace(
        bundle,
        denoiser=copy.deepcopy(bundle.denoiser).half(),
        vae=copy.deepcopy(bundle.vae).half(),
        _pipeline=None,
    )
    for attr in ("force_zeros_for_empty_prompt", "max_sequence_length"):
        if hasattr(bundle, attr):
            setattr(half, attr, getattr(bundle, attr))
    out.mkdir(parents=True, exist_ok=True)
    if (out / "vae").is_symlink():  # a resumed run: write a fresh vae/ rather than through the link
        (out / "vae").unlink()
    half.save_pretrained(out, safe_serialization=True)


def train_diffusion(args: PretrainArgs) -> dict:
    diffusers = require("diffusers", "toy diffusion pretraining")
    from diffusers.training_utils import EMAModel

    rng = seed_everything(args.seed)
    vae = diffusers.AutoencoderKL.from_pretrained(str(args.vae), torch_dtype=torch.float32).eval()
    vae.requires_grad_(False)
    bundle = build_toy_bundle(args.family, vae, args.size, args.seed)
    trainable = torch.nn.ModuleList([bundle.denoiser, *bundle.text_modules()]).train()
    params = [p for p in trainable.parameters() if p.requires_grad]
    base_lr = args.lr or DIFFUSION_LR[args.family]
    optimizer = torch.optim.AdamW(params, lr=base_lr, weight_decay=0.01)
    ema = EMAModel(params, decay=args.ema_decay)
    generator = torch.Generator().manual_seed(args.seed + 1)
    state = _maybe_resume(args, {"trainable": trainable}, optimizer, rng, ema, generator)
    start_step, rng = state["step"], state["rng"]
    budget = resumed_budget(args, state)
    pool = latent_pool(vae, args.vae, args.seed, LATENT_POOL_IMAGES if args.size == "toy" else 512,
                       args.latent_cache or args.work_dir)
    budget.start = time.perf_counter()  # the pool is shared by families: time training only

    def next_loss() -> torch.Tensor:
        index = rng.integers(0, len(pool["captions"]), args.batch_size)
        captions = ["" if rng.random() < args.caption_dropout else pool["captions"][i] for i in index]
        latents = pool_latents(bundle, pool, index, generator)
        noise = torch.randn(latents.shape, generator=generator)
        t = bundle.sample_timesteps(args.batch_size, generator)
        cond = bundle.encode_prompt(captions)
        prediction = bundle.denoise(bundle.add_noise(latents, noise, t), t, cond)
        return torch.nn.functional.mse_loss(prediction.float(), bundle.target(latents, noise, t).float())

    losses: list[float] = []
    early_saved = args.early_out is None
    step = start_step
    for step in optimizer_steps(budget, optimizer, params, next_loss, losses, base_lr=base_lr, warmup=LR_WARMUP_STEPS,
                                floor=0.1, start_step=start_step, desc=args.family, progress=args.progress):
        ema.step(params)
        if args.work_dir and step % args.checkpoint_every == 0:
            _save_checkpoint(args, {"trainable": trainable}, optimizer, rng, step, budget.total, ema, generator)
        if not early_saved and budget.total is not None and step >= args.early_fraction * budget.total:
            _save_ema(bundle, ema, params, args.early_out, args.vae if args.link_vae else None)
            early_saved = True
            early_step = step
            early_metrics = {
                "command": command_line(),
                "family": args.family,
                "snapshot_of": str(args.out),
                "steps": step,
                "seed": args.seed,
                "batch_size": args.batch_size,
                "lr": base_lr,
                "minutes": round(budget.elapsed_minutes(), 2),
                **loss_summary(losses),
            }
            (args.early_out / "metrics.json").write_text(json.dumps(early_metrics, indent=2) + "\n")
    _save_ema(bundle, ema, params, args.out, args.vae if args.link_vae else None)
    metrics = {
        "command": command_line(),
        "family": args.family,
        "steps": step,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "lr": base_lr,
        "minutes": round(budget.elapsed_minutes(), 2),
        **loss_summary(losses),
        "parameters": {
            "denoiser": sum(p.numel() for p in bundle.denoiser.parameters()),
            "text_encoders": sum(p.numel() for m in bundle.text_modules() for p in m.parameters()),
        },
    }
    if args.early_out is not None:
        metrics["early_steps"] = early_step if early_saved else None
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _save_ema(bundle, ema, params, out: Path, shared_vae: Path | None = None) -> None:
    ema.store(params)
    ema.copy_to(params)
    save_toy_pipeline(bundle, out)
    ema.restore(params)
    if shared_vae is not None:
        link_identical_vae(out, shared_vae)


def link_identical_vae(pipeline_dir: Path, shared_vae: Path) -> bool:
    """Replace pipeline_dir/vae by a relative symlink to shared_vae when their files are identical,
    so the shipped pipelines do not each carry a copy of the toy VAE."""
    import filecmp
    import shutil

    own = pipeline_dir / "vae"
    if own.is_symlink() or not own.is_dir():
        return False

    def same(name: str) -> bool:
        mine, theirs = own / name, shared_vae / name
        if not theirs.is_file():
            return False
        if name.endswith(".json"):  # save_pretrained records where the model was loaded from
            strip = lambda path: {k: v for k, v in json.loads(path.read_text()).items() if k != "_name_or_path"}
            return strip(mine) == strip(theirs)
        return filecmp.cmp(mine, theirs, shallow=False)

    if not all(same(p.name) for p in own.iterdir()):
        return False
    shutil.rmtree(own)
    own.symlink_to(os.path.relpath(shared_vae.resolve(), pipeline_dir.resolve()), target_is_directory=True)
    return True


# ----------------------------------------------------------------------------- checkpointing


def _save_checkpoint(
    args: PretrainArgs, modules: dict, optimizer, rng, step: int, total: int | None, ema=None, generator=None
) -> None:
    args.work_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "modules": {name: module.state_dict() for name, module in modules.items()},
        "optimizer": optimizer.state_dict(),
        "rng": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "step": step,
        "total": total,
        "ema": ema.state_dict() if ema is not None else None,
        "generator": generator.get_state() if generator is not None else None,
    }
    tmp = args.work_dir / "checkpoint.pt.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, args.work_dir / "checkpoint.pt")


def _maybe_resume(args: PretrainArgs, modules: dict, optimizer, rng, ema=None, generator=None) -> dict:
    path = args.work_dir / "checkpoint.pt" if args.work_dir else None
    if not (args.resume and path and path.exists()):
        return {"step": 0, "total": None, "rng": rng}
    payload = load_state(path)  # tensors and plain data only, never a pickled object
    for name, module in modules.items():
        module.load_state_dict(payload["modules"][name])
    optimizer.load_state_dict(payload["optimizer"])
    rng.bit_generator.state = payload["rng"]
    torch.set_rng_state(payload["torch_rng"])
    if ema is not None and payload["ema"] is not None:
        ema.load_state_dict(payload["ema"])
    if generator is not None and payload.get("generator") is not None:
        generator.set_state(payload["generator"])
    return {"step": payload["step"], "total": payload["total"], "rng": rng}


# ---------------------------------------------------------------------------- model cards

CARD_SEEDS_PER_PROMPT = 4
CARD_STEPS = 20
CARD_GUIDANCE = 4.0


def folder_megabytes(folder: Path) -> float:
    """Size on disk of a model folder, not following symlinks (a linked VAE costs nothing)."""
    total = 0
    for root, dirs, files in os.walk(folder):
        total += sum(os.lstat(os.path.join(root, name)).st_size for name in files)
        total += sum(os.lstat(os.path.join(root, name)).st_size for name in dirs if os.path.islink(os.path.join(root, name)))
    return total / 2**20


def score_pipeline(folder: Path, seeds_per_prompt: int = CARD_SEEDS_PER_PROMPT, threads: int = 2):
    """MiniGenEval of a saved toy pipeline (held-out prompts, verifier), with its call kwargs."""
    from fastpref.eval.minigeneval import DiffusersGenerate, evaluate
    from fastpref.models.bundle import load_pipeline, pipeline_call_kwargs

    torch.set_num_threads(threads)
    generate = DiffusersGenerate(
        load_pipeline(folder), num_inference_steps=CARD_STEPS, guidance_scale=CARD_GUIDANCE,
        pipeline_kwargs=pipeline_call_kwargs(folder),
    )
    return evaluate(generate, seeds_per_prompt=seeds_per_prompt)


def write_model_card(folder: Path, title: str, result=None, notes: str = "") -> str:
    """MODEL_CARD.md from the folder's metrics.json (command, steps, time, seed) and a MiniGenEval result."""
    metrics = json.loads((folder / "metrics.json").read_text())
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    lines += [
        "Trained on the procedural shapes world (fastpref/toy/world.py, train split only).",
        "",
        "| | |",
        "|---|---|",
        f"| command | `{metrics.get('command', '?')}` |",
        f"| seed | {metrics.get('seed')} |",
        f"| optimizer steps | {metrics.get('steps')} (batch {metrics.get('batch_size', 32)}) |",
    ]
    if metrics.get("minutes") is not None:
        lines.append(f"| training time | {metrics['minutes']} min on a 2-core CPU |")
    if metrics.get("first_loss") is not None:
        lines.append(f"| loss (first -> last quarter) | {metrics['first_loss']:.4f} -> {metrics['final_loss']:.4f} |")
    lines.append(f"| size on disk | {folder_megabytes(folder):.1f} MB |")
    if "early_steps" in metrics and metrics["early_steps"]:
        lines.append(f"| early snapshot | EMA weights after {metrics['early_steps']} steps (toy-sd-early) |")
    if "parameters" in metrics:
        lines.append(f"| parameters | denoiser {metrics['parameters']['denoiser']:,}, text encoders {metrics['parameters']['text_encoders']:,} |")
    if "recon_pass_rate_eval" in metrics:
        lines.append(
            f"| verifier pass rate of reconstructions | held-out specs {100 * metrics['recon_pass_rate_eval']:.1f}%, "
            f"train specs {100 * metrics['recon_pass_rate_train']:.1f}% (500 images each) |"
        )
        lines.append(f"| latent scaling / shift | {1 / metrics['latent_std']:.4f} / {metrics['latent_mean']:.4f} |")
    if result is not None:
        per_category = ", ".join(f"{c} {100 * a:.1f}%" for c, a in result.per_category.items())
        lines += [
            "",
            f"## MiniGenEval: {100 * result.overall:.1f}%",
            "",
            f"{per_category}.",
            "",
            f"{result.settings['num_prompts']} held-out prompts x {result.settings['seeds_per_prompt']} seeds, "
            f"{CARD_STEPS} sampling steps, guidance {CARD_GUIDANCE} (fastpref.eval.minigeneval, scored by "
            f"fastpref.toy.verifier); {result.num_images} images in {result.seconds:.0f} s.",
        ]
        call_kwargs = json.loads((folder / "fastpref.json").read_text())["pipeline_call_kwargs"] if (folder / "fastpref.json").exists() else {}
        if call_kwargs:
            lines += ["", f"Sample with these pipeline arguments (from fastpref.json): `{call_kwargs}`."]
    text = "\n".join(lines) + "\n"
    (folder / "MODEL_CARD.md").write_text(text)
    return text


# ------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> PretrainArgs:
    parser = argparse.ArgumentParser(prog="python -m fastpref.toy.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--family", required=True, choices=FAMILIES)
    parser.add_argument("--out", required=True, type=Path, help="folder for the saved model (diffusers format)")
    parser.add_argument("--seed", type=int, default=0)
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="wall-time budget (fixes the step count after 10 steps)")
    budget.add_argument("--steps", type=int, help="exact number of optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--vae", type=Path, help="trained VAE folder (required by the diffusion families)")
    parser.add_argument("--work-dir", type=Path, help="resumable checkpoints and logs")
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--early-fraction", type=float, help="also save the EMA pipeline at this fraction of the steps")
    parser.add_argument("--early-out", type=Path, help="where --early-fraction's pipeline goes")
    parser.add_argument("--latent-cache", type=Path,
                        help="folder caching the encoded latent pool, shared by families (default: --work-dir)")
    parser.add_argument("--link-vae", action="store_true",
                        help="replace the saved pipelines' vae/ by a relative symlink to --vae when identical")
    parser.add_argument("--size", default="toy", choices=("toy", "tiny"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    ns = parser.parse_args(argv)
    if (ns.early_fraction is None) != (ns.early_out is None):
        parser.error("--early-fraction and --early-out go together")
    if ns.family != "vae" and ns.vae is None:
        parser.error(f"--vae is required for --family {ns.family}")
    return PretrainArgs(**vars(ns))


def run(args: PretrainArgs) -> dict:
    torch.set_num_threads(args.threads)
    if args.family == "vae":
        metrics = train_vae(args)
    else:
        metrics = train_diffusion(args)
    print(json.dumps(metrics, indent=2))
    return metrics


def export_checkpoint(checkpoint: Path, like: Path, family: str, out: Path, shared_vae: Path | None = None) -> int:
    """Save a training checkpoint's EMA weights as a pipeline folder shaped like the saved pipeline
    `like` (same family and architecture); returns the checkpoint's step."""
    bundle = family_module(family).load(like)
    params = [p for p in torch.nn.ModuleList([bundle.denoiser, *bundle.text_modules()]).parameters() if p.requires_grad]
    payload = load_state(checkpoint)
    shadow = payload["ema"]["shadow_params"] if payload.get("ema") else None
    if shadow is None or len(shadow) != len(params):
        raise ValueError(f"{checkpoint}: no EMA weights matching the {len(params)} trainable tensors of {like}")
    with torch.no_grad():
        for param, ema_value in zip(params, shadow):
            param.copy_(ema_value)
    save_toy_pipeline(bundle, out)
    if shared_vae is not None:
        link_identical_vae(out, shared_vae)
    metrics = {"command": command_line(), "family": family, "steps": payload["step"], "snapshot_of": str(like)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return payload["step"]


def export_main(argv: list[str]) -> None:
    """`python -m fastpref.toy.pretrain export CHECKPOINT --like DIR --family F --out DIR [--vae DIR]`."""
    parser = argparse.ArgumentParser(prog="python -m fastpref.toy.pretrain export")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--like", type=Path, required=True, help="a saved pipeline of the same run")
    parser.add_argument("--family", required=True, choices=FAMILIES[1:])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vae", type=Path, help="link out/vae to this folder when identical")
    ns = parser.parse_args(argv)
    step = export_checkpoint(ns.checkpoint, ns.like, ns.family, ns.out, ns.vae)
    print(f"exported the EMA weights of step {step} to {ns.out}")


def card_main(argv: list[str]) -> None:
    """`python -m fastpref.toy.pretrain card DIR [DIR ...]`: score saved pipelines with MiniGenEval,
    write each one's MODEL_CARD.md and one comparison grid of their samples."""
    from fastpref.eval.minigeneval import save_comparison_grid

    parser = argparse.ArgumentParser(prog="python -m fastpref.toy.pretrain card")
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--notes", action="append", default=[], help="NAME=TEXT: a paragraph for NAME's card")
    parser.add_argument("--grid", type=Path, help="PNG comparing the models' samples")
    parser.add_argument("--seeds", type=int, default=CARD_SEEDS_PER_PROMPT)
    parser.add_argument("--threads", type=int, default=2)
    ns = parser.parse_args(argv)
    notes = dict(item.split("=", 1) for item in ns.notes)
    results = {}
    for folder in ns.folders:
        if (folder / "model_index.json").exists():
            results[folder.name] = score_pipeline(folder, ns.seeds, ns.threads)
            print(f"{folder.name}: MiniGenEval {100 * results[folder.name].overall:.1f}% {results[folder.name].per_category}")
        write_model_card(folder, folder.name, results.get(folder.name), notes.get(folder.name, ""))
    if ns.grid and results:
        save_comparison_grid(results, ns.grid)


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "card":
        card_main(argv[1:])
        return
    if argv and argv[0] == "export":
        export_main(argv[1:])
        return
    run(parse_args(argv))


if __name__ == "__main__":
    main()
