"""Pretraining of the toy world's shared VAE (AutoencoderKL 32x32x3 -> 4x8x8) and its latent statistics."""

from __future__ import annotations

import copy
import json

import numpy as np
import torch

from fastpref.models.bundle import toy_vae_config
from fastpref.toy.pretrain_checkpoint import maybe_resume, save_checkpoint
from fastpref.toy.pretrain_loop import (PretrainArgs, command_line, images_to_tensor, loss_summary, optimizer_steps,
                                        resumed_budget, seed_everything, tensor_to_images)
from fastpref.utils.imports import require

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
def latent_statistics(vae, rng: np.random.Generator, num_images: int = 2048, batch: int = 256,
                      world_name: str = "v1") -> tuple[float, float]:
    """Mean and std of sampled latents over fresh train images: the VAE's shift/scaling factors."""
    from fastpref.toy import world

    chunks = []
    for start in range(0, num_images, batch):
        images, _ = world.sample_batch(rng, min(batch, num_images - start), split="train", world=world_name)
        chunks.append(vae.encode(images_to_tensor(images)).latent_dist.sample())
    latents = torch.cat(chunks).double()
    return latents.mean().item(), latents.std().item()


@torch.no_grad()
def reconstruction_pass_rate(vae, rng: np.random.Generator, split: str = "eval", num_images: int = 500,
                             world_name: str = "v1") -> float:
    """Share of VAE reconstructions that the verifier still accepts for the rendered spec."""
    from fastpref.toy import verifier, world

    specs = [world.sample_spec(rng, split, world_name) for _ in range(num_images)]
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
    state = maybe_resume(args, {"vae": vae}, optimizer, rng, generator=sample_generator)
    start_step, rng = state["step"], state["rng"]
    budget = resumed_budget(args, state)

    def next_loss() -> torch.Tensor:
        images, _ = world.sample_batch(rng, args.batch_size, split="train", world=args.world)
        return vae_loss(vae, images_to_tensor(images), sample_generator)

    losses: list[float] = list(state["record"].get("losses", []))
    minutes_before = float(state["record"].get("minutes", 0.0))
    step = start_step
    for step in optimizer_steps(budget, optimizer, list(vae.parameters()), next_loss, losses, base_lr=base_lr,
                                warmup=50, start_step=start_step, desc="vae", progress=args.progress, loss_window=20):
        if args.work_dir and step % args.checkpoint_every == 0:
            save_checkpoint(args, {"vae": vae}, optimizer, rng, step, budget.total, generator=sample_generator,
                            record={"losses": losses, "minutes": round(minutes_before + budget.elapsed_minutes(), 2)})
    vae.eval()
    # fewer images for the tests' tiny runs: these are summaries, not what the run trains on
    stat_images, eval_images = (2048, 500) if args.size == "toy" else (128, 32)
    mean, std = latent_statistics(vae, np.random.default_rng(args.seed + 2), stat_images, world_name=args.world)
    # SD/SDXL pipelines multiply by scaling_factor only; SD3 subtracts shift_factor first. With
    # both set, one VAE folder serves every family (the bundle follows each family's convention).
    vae.register_to_config(scaling_factor=1.0 / std, shift_factor=mean)
    metrics = {
        "command": command_line(),
        "family": "vae",
        "world": args.world,
        "steps": step,
        "seed": args.seed,
        "minutes": round(minutes_before + budget.elapsed_minutes(), 2),
        **loss_summary(losses),
        "latent_mean": mean,
        "latent_std": std,
        "recon_pass_rate_eval": reconstruction_pass_rate(vae, np.random.default_rng(args.seed + 3), "eval", eval_images,
                                                         world_name=args.world),
        "recon_pass_rate_train": reconstruction_pass_rate(vae, np.random.default_rng(args.seed + 4), "train",
                                                          eval_images, world_name=args.world),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    # fp16 halves the shipped size; diffusers upcasts to the dtype asked for on load
    copy.deepcopy(vae).half().save_pretrained(args.out, safe_serialization=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
