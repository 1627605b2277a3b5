"""The training noise of every (epoch, prompt group), as a pure function of (seed, epoch, group id).

The cache stage precomputes the reference model's error under exactly the (t, eps) the trainer will draw, so
both must call these functions. Each group has its own torch.Generator, seeded from (seed, epoch, group id, what),
which makes a group's draw independent of batch composition, rank count and device (draws are made on the CPU).

Per the ops' convention, the K images of a group share one timestep and one noise tensor; the flip and the caption
dropout are drawn per group too, so the K images of a prompt are always compared under the same conditioning and
augmentation. (Diffusion-DPO's train.py flips each image of a pair independently, RandomHorizontalFlip inside its
per-image transform; fastpref flips the whole group: a preference between an image and the mirror of its rival
would mix the judgement with a left/right difference the labeller never saw, and the cached e_ref then needs one
draw per group instead of one per image.)
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple, Protocol

import torch


class TimestepSampler(Protocol):
    """What draws training timesteps: a ModelBundle (`sample_timesteps`: uniform DDPM steps, or logit-normal
    sigma * T for flow models)."""

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor: ...


class NoiseDraw(NamedTuple):
    timesteps: torch.Tensor  # (G,) in the denoiser's units (int64 DDPM steps or float flow times), CPU
    noise: torch.Tensor  # (G, *latent_shape) float32, CPU


def group_generator(seed: int, epoch: int, group_id: int, what: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{epoch}/{group_id}/{what}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _ids(group_ids) -> list[int]:
    if isinstance(group_ids, torch.Tensor):
        return [int(g) for g in group_ids.reshape(-1).tolist()]
    return [int(g) for g in group_ids]


def draw_timesteps_and_noise(
    seed: int,
    epoch: int,
    group_ids,
    latent_shape: tuple[int, ...],
    sampler: TimestepSampler,
) -> NoiseDraw:
    """One timestep and one standard-normal noise tensor per group (shared by its K images)."""
    timesteps, noises = [], []
    for group_id in _ids(group_ids):
        generator = group_generator(seed, epoch, group_id, "timestep")
        timesteps.append(sampler.sample_timesteps(1, generator=generator).reshape(()).cpu())
        generator = group_generator(seed, epoch, group_id, "noise")
        noises.append(torch.randn(tuple(latent_shape), generator=generator, dtype=torch.float32))
    if not noises:
        return NoiseDraw(torch.zeros(0), torch.zeros((0, *latent_shape)))
    return NoiseDraw(torch.stack(timesteps), torch.stack(noises))


def draw_flips(seed: int, epoch: int, group_ids) -> torch.Tensor:
    """(G,) bool: whether a group's images are used horizontally flipped this epoch (flip augmentation)."""
    flips = [bool(torch.rand((), generator=group_generator(seed, epoch, g, "flip")) < 0.5) for g in _ids(group_ids)]
    return torch.tensor(flips, dtype=torch.bool)


def draw_caption_dropout(seed: int, epoch: int, group_ids, probability: float) -> torch.Tensor:
    """(G,) bool: whether a group trains on the empty caption's conditioning this epoch (Diffusion-DPO's
    proportion_empty_prompts, 0.2 in its train.py), drawn per group so that the cache's e_ref can use the same draw.
    probability 0 draws nothing (all False)."""
    ids = _ids(group_ids)
    if probability <= 0:
        return torch.zeros(len(ids), dtype=torch.bool)
    drops = [bool(torch.rand((), generator=group_generator(seed, epoch, g, "caption")) < probability) for g in ids]
    return torch.tensor(drops, dtype=torch.bool)
