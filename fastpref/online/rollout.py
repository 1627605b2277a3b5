"""Rollouts: G images per prompt sampled by the current policy with per-step log-probabilities, then rewarded.

    stream = PromptStream(prompts, seed, per_rollout=8)              # the global prompt order, resumable
    batch = stream.next()                                            # RolloutPrompts: epoch + 8 prompts
    mine = batch.shard(rank, world_size)                             # this process's contiguous share
    traj = sample_trajectories(policy, bundle, schedule, mine, group_size=G, ...)   # under torch.no_grad
    rewards = reward_fn(decode_images(bundle, traj.final), traj.texts)

Every random draw is keyed by (seed, epoch, prompt id, what) (fastpref.online.sampler.seeded_normal): the initial
latents ("init") and each step's variance noise ("step{i}") of a prompt's G images do not depend on the batch,
the rank or the world size, so 1 and N processes sample the same images and a resumed run the same as an
uninterrupted one. `gather_permute_split` redistributes per-sample rows over the processes (all-gather, a global
permutation, an even split): the same global batches whatever the world size.
"""

from __future__ import annotations

from collections.abc import Sequence

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from fastpref.config import ConfigError
from fastpref.data.noise import group_generator
from fastpref.data.prompts import Prompt
from fastpref.online.sampler import (
    GaussianStep,
    SamplingSchedule,
    ddim_step,
    flow_sde_step,
    guided_prediction,
    seeded_normal,
)

# ------------------------------------------------------------------------------------------- prompts


@dataclass
class RolloutPrompts:
    """The prompts of one rollout (all processes): `index` is each prompt's position in the epoch's order."""

    epoch: int
    start: int  # position of the first prompt in the epoch's order
    prompts: list[Prompt]

    def shard(self, rank: int, world_size: int) -> "RolloutPrompts":
        """This process's contiguous share (the rollout size is a multiple of the world size)."""
        if len(self.prompts) % world_size:
            raise ValueError(f"{len(self.prompts)} prompts cannot be split evenly over {world_size} processes")
        per = len(self.prompts) // world_size
        return RolloutPrompts(self.epoch, self.start + rank * per, self.prompts[rank * per:(rank + 1) * per])

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.prompts]

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]


class PromptStream:
    """The prompts in a fresh seeded order every epoch, `per_rollout` at a time (an epoch's last partial rollout is
    skipped). The position is (epoch, start): state_dict / load_state_dict resume exactly."""

    def __init__(self, prompts: list[Prompt], seed: int, per_rollout: int):
        if len(prompts) < per_rollout:
            raise ValueError(f"the prompt list has {len(prompts)} prompts, fewer than one rollout's {per_rollout}")
        self.prompts = list(prompts)
        self.seed = seed
        self.per_rollout = per_rollout
        self.epoch = 0
        self.position = 0

    def order(self, epoch: int) -> list[int]:
        generator = group_generator(self.seed, epoch, 0, "online/prompt-order")
        return torch.randperm(len(self.prompts), generator=generator).tolist()

    def next(self) -> RolloutPrompts:
        if self.position + self.per_rollout > len(self.prompts):
            self.epoch, self.position = self.epoch + 1, 0
        order = self.order(self.epoch)[self.position:self.position + self.per_rollout]
        batch = RolloutPrompts(self.epoch, self.position, [self.prompts[i] for i in order])
        self.position += self.per_rollout
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ------------------------------------------------------------------------------------------- conditioning


@torch.no_grad()
def unconditional_conditioning(bundle) -> dict[str, torch.Tensor]:
    """One row of the family pipeline's negative ("" prompt) conditioning, in the denoiser's cond format: what its
    diffusers pipeline uses for classifier-free guidance (SDXL: zeros under force_zeros_for_empty_prompt)."""
    from fastpref.train.validation import sampling_embeddings

    embeddings = sampling_embeddings(bundle, [""], guidance_scale=2.0)
    negative = embeddings["negative_prompt_embeds"]
    if bundle.family == "sd":
        return {"encoder_hidden_states": negative}
    if bundle.family == "sdxl":
        return {"encoder_hidden_states": negative, "text_embeds": embeddings["negative_pooled_prompt_embeds"],
                "time_ids": bundle.time_ids(1)}
    if bundle.family == "sd3":
        return {"encoder_hidden_states": negative, "pooled_projections": embeddings["negative_pooled_prompt_embeds"]}
    raise ValueError(f"online sampling: unsupported model family {bundle.family!r}")


def expand_rows(cond: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    return {key: value.expand(n, *value.shape[1:]) for key, value in cond.items()}


def index_rows(cond: dict[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
    return {key: value[index] for key, value in cond.items()}


def latent_shape(bundle, resolution: int | None = None) -> tuple[int, int, int]:
    """(C, h, w) of the latents the denoiser samples: the denoiser's sample_size, or resolution / VAE factor."""
    config = bundle.denoiser.config
    channels = int(config.in_channels)
    if resolution is None:
        size = int(config.sample_size)
    else:
        factor = 2 ** (len(bundle.vae.config.block_out_channels) - 1) if bundle.vae is not None else 8
        if resolution % factor:
            raise ValueError(f"online.resolution: {resolution} is not a multiple of the VAE's factor {factor}")
        size = resolution // factor
    return channels, size, size


@torch.no_grad()
def decode_images(bundle, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """float (N, 3, H, W) pixels in [0, 1] (the canonical reward input), decoded in chunks."""
    chunks = []
    for start in range(0, latents.shape[0], batch_size):
        pixels = bundle.decode_latents(latents[start:start + batch_size])
        chunks.append(((pixels.float() + 1) / 2).clamp(0, 1))
    return torch.cat(chunks)


# ------------------------------------------------------------------------------------------- rewards


class WeightedReward:
    """sum_k weight_k * reward_k(images, prompts) over the configured fastpref rewards; every term is also
    reported (`last_terms`) for the metrics."""

    def __init__(self, weights: dict[str, float], device: torch.device | str = "cpu", batch_size: int = 64,
                 paths: dict[str, str] | None = None, toy_world: str = "v1",
                 kwargs: dict[str, dict[str, Any]] | None = None):
        from fastpref.rewards import build_reward
        from fastpref.rewards.toy import WORLD_REWARDS

        paths, kwargs = paths or {}, kwargs or {}
        self.weights = dict(weights)
        self.toy_world = toy_world
        self.rewards = {}
        for name in self.weights:
            options = {**kwargs.get(name, {}), **({"world": toy_world} if name in WORLD_REWARDS else {})}
            try:
                self.rewards[name] = build_reward(name, paths.get(name), **options).to(device)
            except TypeError as err:
                if not kwargs.get(name):
                    raise
                raise ConfigError(f"online.reward_kwargs.{name}: {err}") from None  # an unknown keyword
        self.batch_size = batch_size
        self.last_terms: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total = torch.zeros(pixels.shape[0], dtype=torch.float32)
        self.last_terms = {}
        for name, reward in self.rewards.items():
            scores = reward(pixels, prompts, batch_size=self.batch_size).float().cpu()
            self.last_terms[name] = scores
            total += self.weights[name] * scores
        return total


# ------------------------------------------------------------------------------------------- sampling


@dataclass
class Trajectories:
    """R = prompts x G rows, prompt-major (row = p * G + g).

    latents: (R, S + 1, C, h, w) x_T .. x_0 of every row; log_probs: (R, S) of each taken step; timesteps: (S,)
    (the denoiser's units); sigmas: (S + 1,) for flow schedules; cond: per-row conditioning (R, ...)."""

    prompts: RolloutPrompts
    group_size: int
    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor | None
    cond: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts.prompts for _ in range(self.group_size)]


def take_step(schedule: SamplingSchedule, index, prediction: torch.Tensor, sample: torch.Tensor, *, eta: float,
              noise_level: float, prev_sample: torch.Tensor | None = None, noise: torch.Tensor | None = None
              ) -> GaussianStep:
    """Step `index` (an int or (N,) step indices into the schedule) of the family's stochastic sampler."""
    index = torch.as_tensor(index).reshape(-1)
    if schedule.flow:
        sigma = schedule.sigmas[index]
        sigma_next = schedule.sigmas[index + 1]
        return flow_sde_step(sigma, sigma_next, prediction, sample, noise_level=noise_level,
                             prev_sample=prev_sample, noise=noise, sigma_max=schedule.sigma_max)
    return ddim_step(schedule.scheduler, prediction, schedule.timesteps[index], sample, eta=eta,
                     prev_sample=prev_sample, noise=noise)


def step_stds(schedule: SamplingSchedule, *, eta: float, noise_level: float) -> torch.Tensor:
    """(S,) the std of each step's Gaussian. 0 marks a deterministic step, e.g. DDIM's last step to
    final_alpha_cumprod = 1 (set_alpha_to_one, SDXL's scheduler): it has no log-density to train a ratio on."""
    index = torch.arange(schedule.num_steps)
    zeros = torch.zeros(schedule.num_steps, 1)
    return take_step(schedule, index, zeros, zeros, eta=eta, noise_level=noise_level, prev_sample=zeros).std.reshape(-1)


@torch.no_grad()
def sample_trajectories(policy, schedule: SamplingSchedule, prompts: RolloutPrompts, cond: dict[str, torch.Tensor],
                        uncond: dict[str, torch.Tensor] | None, *, group_size: int, shape: tuple[int, ...],
                        seed: int, guidance_scale: float, eta: float, noise_level: float, batch_size: int,
                        device: torch.device, dtype: torch.dtype, autocast=None) -> Trajectories:
    """Sample G images for each prompt with the stochastic sampler, keeping every x_t and each step's log-prob.

    policy: a bundle (or with_denoiser(bundle, module)) whose `denoise` is the current policy; cond: one row per
    prompt (ModelBundle.encode_prompt); uncond: one row (unconditional_conditioning) or None for no guidance.
    Rows are processed batch_size at a time; each row's noise depends on (seed, epoch, prompt id, g, step) only.
    """
    g = group_size
    ids = prompts.ids
    rows = len(ids) * g
    steps = schedule.num_steps
    init = seeded_normal(seed, prompts.epoch, ids, g, shape, "init")
    noises = [seeded_normal(seed, prompts.epoch, ids, g, shape, f"step{i}") for i in range(steps)]
    latents = torch.empty((rows, steps + 1, *shape), dtype=torch.float32)
    log_probs = torch.empty((rows, steps), dtype=torch.float32)
    row_cond = {key: value.repeat_interleave(g, dim=0) for key, value in cond.items()}
    autocast = autocast or contextlib.nullcontext()
    for start in range(0, rows, batch_size):
        stop = min(start + batch_size, rows)
        x = init[start:stop].to(device)
        chunk_cond = index_rows(row_cond, slice(start, stop))
        chunk_uncond = expand_rows(uncond, stop - start) if uncond is not None else None
        latents[start:stop, 0] = x.cpu()
        for i in range(steps):
            t = schedule.timesteps[i].to(device).expand(stop - start)
            with autocast:
                prediction = guided_prediction(policy, x.to(dtype), t, chunk_cond, chunk_uncond, guidance_scale)
            step = take_step(schedule, i, prediction, x, eta=eta, noise_level=noise_level,
                             noise=noises[i][start:stop].to(device))
            x = step.prev_sample
            latents[start:stop, i + 1] = x.cpu()
            log_probs[start:stop, i] = step.log_prob.cpu()
    return Trajectories(prompts, g, latents, log_probs, schedule.timesteps, schedule.sigmas,
                        {key: value.detach() for key, value in row_cond.items()})


# ------------------------------------------------------------------------------------------- processes


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's (n_r, ...) rows in rank order (n_r may differ); the input itself with one
    process. Runs on the tensor's device (gloo: CPU, nccl: CUDA)."""
    rank, world = _world()
    if world == 1:
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    largest = max(counts)
    padded = torch.zeros((largest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[:tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def gather_permute_split(rows: dict[str, torch.Tensor], keys: torch.Tensor,
                         generator: torch.Generator | Sequence[torch.Generator],
                         parts: int = 1) -> list[dict[str, torch.Tensor]]:
    """Redistribute per-sample rows over the processes so that the result does not depend on the world size.

    rows: tensors with the same first dim n_r on this process; keys: (n_r,) int64, unique over all processes (e.g.
    a global sample index). Every process all-gathers the rows, orders them by key (so the world size and the rank
    order do not matter), permutes them with `generator` (seeded the same on every process), keeps the largest
    multiple of world_size * parts rows, and returns this process's share of each of the `parts` consecutive
    chunks: part k of rank r = rows [k * m + r * m / W, k * m + (r + 1) * m / W) of the permuted list, m the chunk
    size. SPO's pairs kept per step (which vary per rank) and GRPO's kept samples go through it. A sequence of
    generators makes one pass per generator over the same gathered rows (GRPO's inner epochs), the rows gathered once:
    len(generators) x parts shares, pass by pass.
    """
    rank, world = _world()
    keys = keys.to(torch.int64)
    gathered_keys = all_gather_rows(keys.to(_collective_device(keys)) if world > 1 else keys).cpu()
    order = torch.argsort(gathered_keys)
    if not torch.equal(gathered_keys[order][1:] != gathered_keys[order][:-1],
                       torch.ones(max(len(order) - 1, 0), dtype=torch.bool)):
        raise ValueError("gather_permute_split: keys are not unique over the processes")
    total = (len(order) // (world * parts)) * world * parts
    per_part = total // parts
    per_rank = per_part // world
    gathered = {name: all_gather_rows(value.to(_collective_device(value)) if world > 1 else value).cpu()
                for name, value in rows.items()}
    shares = []
    for one in [generator] if isinstance(generator, torch.Generator) else generator:
        permutation = order[torch.randperm(len(order), generator=one)]
        for k in range(parts):
            take = permutation[k * per_part + rank * per_rank: k * per_part + (rank + 1) * per_rank]
            shares.append({name: value[take] for name, value in gathered.items()})
    return shares


def _collective_device(tensor: torch.Tensor) -> torch.device:
    """gloo gathers CPU tensors, nccl CUDA ones."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_sample_keys(prompts: RolloutPrompts, group_size: int) -> torch.Tensor:
    """(P * G,) int64: the position of each (prompt, image) row in the whole rollout, unique over processes."""
    first = prompts.start * group_size
    return torch.arange(first, first + len(prompts.prompts) * group_size, dtype=torch.int64)


def chunk_count(total: int, size: int) -> int:
    return max(1, math.ceil(total / size))
