"""Pretraining of the toy diffusion families (toy-sd / toy-sdxl / toy-sd3) around the shared VAE: a cached latent
pool, text encoders trained jointly with the denoiser, caption dropout, EMA, pipeline folders (and their export
from a checkpoint)."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from fastpref.models import model_world
from fastpref.toy.pretrain_checkpoint import maybe_resume, save_checkpoint
from fastpref.toy.world import confuse_colors
from fastpref.toy.pretrain_loop import (PretrainArgs, command_line, images_to_tensor, loss_summary, optimizer_steps,
                                        resumed_budget, seed_everything)
from fastpref.train.checkpoint import load_state
from fastpref.utils.atomic import atomic_file
from fastpref.utils.imports import require

DIFFUSION_LR = {"toy-sd": 8e-4, "toy-sdxl": 8e-4, "toy-sd3": 5e-4}
LATENT_POOL_IMAGES = 16_000
LR_WARMUP_STEPS = 100


def check_model_world(path: Path, flag: str, world_name: str, hint: str = "") -> None:
    """Refuse a model (--vae, --init) trained on another world: its latent statistics, colors and words are that
    world's."""
    trained_on = model_world(path)
    if trained_on is not None and trained_on != world_name:
        raise ValueError(f"pretrain: {flag} {path} was trained on world {trained_on} (its metrics.json) but --world "
                         f"is {world_name}{hint}")


def family_module(family: str):
    from fastpref.models import sd, sd3, sdxl

    modules = {"toy-sd": sd, "toy-sdxl": sdxl, "toy-sd3": sd3}
    if family not in modules:
        raise ValueError(f"pretrain: unknown diffusion family {family!r} (expected one of {sorted(modules)})")
    return modules[family]


def build_toy_bundle(family: str, vae, size: str = "toy", seed: int = 0, world_name: str = "v1"):
    """A randomly initialised toy model of `family` around a trained VAE and `world_name`'s tokenizer."""
    from fastpref.toy.tokenizer import build_tokenizer

    module = family_module(family)
    return module.build_random(module.tiny_config(size), build_tokenizer(world_name=world_name), vae=vae, seed=seed)


def load_init_bundle(family: str, init: Path, vae):
    """A saved pipeline of `family` to continue training from, around the run's own VAE."""
    bundle = family_module(family).load(init)
    bundle.vae = vae
    return bundle


def _file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


@torch.no_grad()
def latent_pool(vae, vae_dir: Path, seed: int, num_images: int, cache_dir: Path | None, world_name: str = "v1") -> dict:
    """Posterior mean/std of `num_images` fresh train images of `world_name` (and their captions), encoded once.

    Cached per VAE weights + seed + size + world so that the three families share one encoding pass; a
    latent is drawn from N(mean, std) at every use, which keeps the VAE's sampling noise.
    """
    from fastpref.toy import world

    weights = next(iter(sorted(vae_dir.glob("*.safetensors"))), None)
    # v1's key predates worlds and stays as it was, so existing caches keep serving v1 runs
    world_tag = "" if world_name == "v1" else f"-{world_name}"
    key = f"latents-{_file_digest(weights) if weights else 'random'}-{num_images}-{seed}{world_tag}.pt"
    if cache_dir is not None and (cache_dir / key).exists():
        return load_state(cache_dir / key)  # plain data only: a planted cache file cannot run code
    rng = np.random.default_rng(seed + 1000)
    means, stds, captions = [], [], []
    for start in range(0, num_images, 500):
        images, batch_captions = world.sample_batch(rng, min(500, num_images - start), split="train",
                                                    world=world_name)
        posterior = vae.encode(images_to_tensor(images)).latent_dist
        means.append(posterior.mean.half())
        stds.append(posterior.std.half())
        captions.extend(batch_captions)
    pool = {"mean": torch.cat(means), "std": torch.cat(stds), "captions": captions}
    if cache_dir is not None:
        with atomic_file(cache_dir / key) as handle:
            torch.save(pool, handle)
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
    if args.init is not None:
        check_model_world(args.init, "--init", args.world)
    check_model_world(args.vae, "--vae", args.world, f": train a VAE with --world {args.world} first")
    vae = diffusers.AutoencoderKL.from_pretrained(str(args.vae), torch_dtype=torch.float32).eval()
    vae.requires_grad_(False)
    bundle = (build_toy_bundle(args.family, vae, args.size, args.seed, args.world) if args.init is None
              else load_init_bundle(args.family, args.init, vae))
    trainable = torch.nn.ModuleList([bundle.denoiser, *bundle.text_modules()]).train()
    trainable.requires_grad_(True)
    if args.freeze_text:
        for module in bundle.text_modules():
            module.requires_grad_(False).eval()
    params = [p for p in trainable.parameters() if p.requires_grad]
    base_lr = args.lr or DIFFUSION_LR[args.family]
    optimizer = torch.optim.AdamW(params, lr=base_lr, weight_decay=0.01)
    ema = EMAModel(params, decay=args.ema_decay)
    generator = torch.Generator().manual_seed(args.seed + 1)
    state = maybe_resume(args, {"trainable": trainable}, optimizer, rng, ema, generator)
    start_step, rng = state["step"], state["rng"]
    budget = resumed_budget(args, state)
    pool = latent_pool(vae, args.vae, args.seed, LATENT_POOL_IMAGES if args.size == "toy" else 512,
                       args.latent_cache or args.work_dir, args.world)
    budget.start = time.perf_counter()  # the pool is shared by families: time training only

    def next_loss() -> torch.Tensor:
        index = rng.integers(0, len(pool["captions"]), args.batch_size)
        captions = ["" if rng.random() < args.caption_dropout else pool["captions"][i] for i in index]
        if args.color_confusion:
            captions = [confuse_colors(c, rng, args.color_confusion, args.world) if c else c for c in captions]
        latents = pool_latents(bundle, pool, index, generator)
        noise = torch.randn(latents.shape, generator=generator)
        t = bundle.sample_timesteps(args.batch_size, generator)
        cond = bundle.encode_prompt(captions)
        prediction = bundle.denoise(bundle.add_noise(latents, noise, t), t, cond)
        return torch.nn.functional.mse_loss(prediction.float(), bundle.target(latents, noise, t).float())

    record = state["record"]
    losses: list[float] = list(record.get("losses", []))
    minutes_before = float(record.get("minutes", 0.0))
    early_step = record.get("early_step")
    # a run resumed past its snapshot point took the snapshot before it stopped: never overwrite it with later
    # weights (a checkpoint older than the record does not know the step, hence the position test)
    early_saved = (args.early_out is None or early_step is not None
                   or (start_step > 0 and budget.total is not None and start_step >= args.early_fraction * budget.total))

    def minutes() -> float:
        return round(minutes_before + budget.elapsed_minutes(), 2)

    step = start_step
    for step in optimizer_steps(budget, optimizer, params, next_loss, losses, base_lr=base_lr, warmup=LR_WARMUP_STEPS,
                                floor=0.1, start_step=start_step, desc=args.family, progress=args.progress):
        ema.step(params)
        if not early_saved and budget.total is not None and step >= args.early_fraction * budget.total:
            _save_ema(bundle, ema, params, args.early_out, args.vae if args.link_vae else None)
            early_saved = True
            early_step = step
            early_metrics = {
                "command": command_line(),
                "family": args.family,
                "world": args.world,
                "snapshot_of": str(args.out),
                "steps": step,
                "seed": args.seed,
                "batch_size": args.batch_size,
                "lr": base_lr,
                "minutes": minutes(),
                **loss_summary(losses),
            }
            (args.early_out / "metrics.json").write_text(json.dumps(early_metrics, indent=2) + "\n")
        if args.work_dir and step % args.checkpoint_every == 0:
            save_checkpoint(args, {"trainable": trainable}, optimizer, rng, step, budget.total, ema, generator,
                            record={"losses": losses, "minutes": minutes(), "early_step": early_step})
    _save_ema(bundle, ema, params, args.out, args.vae if args.link_vae else None)
    metrics = {
        "command": command_line(),
        "family": args.family,
        "world": args.world,
        "steps": step,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "lr": base_lr,
        "minutes": minutes(),
        **({"init": str(args.init)} if args.init is not None else {}),
        **({"color_confusion": args.color_confusion} if args.color_confusion else {}),
        **({"frozen_text_encoders": True} if args.freeze_text else {}),
        **loss_summary(losses),
        "parameters": {
            "denoiser": sum(p.numel() for p in bundle.denoiser.parameters()),
            "text_encoders": sum(p.numel() for m in bundle.text_modules() for p in m.parameters()),
        },
    }
    if args.early_out is not None:
        metrics["early_steps"] = early_step
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
    metrics = {"command": command_line(), "family": family, "world": model_world(like), "steps": payload["step"],
               "snapshot_of": str(like)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return payload["step"]
