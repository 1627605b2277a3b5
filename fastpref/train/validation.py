"""Validation image grids during training: the current policy sampled on fixed prompts and seeds.

`train.validation.every: N` writes output_dir/validation/step-NNNNNN.png (one row per seed, one column per prompt)
at step 0 (before the first update), every N optimizer steps and at the last step, and logs it to TensorBoard /
W&B as `validation`. Every grid uses the same prompts and seeds, so grids of one run compare step by step.

How it samples without slowing or changing training:
- the prompts are encoded once, before the trainer drops its text encoders (T5-XXL alone is ~19 GB for SD3), with
  the family pipeline's own `encode_prompt` (the classifier-free-guidance branch included), so an image is the one
  `pipeline(prompt=..., generator=...)` would give; the VAE is kept on the device for decoding;
- the sampling pipeline is the model family's diffusers pipeline around the trained denoiser itself (LoRA adapters
  on; full fine-tuning: the weights as they are), in eval mode and the training precision (autocast), then the
  denoiser's train/eval mode is restored;
- each image has its own torch.Generator seeded with its seed, and the global RNG states (python, numpy, torch,
  CUDA) are saved before and restored after, so the training stream draws exactly the numbers it would draw
  without validation (loss logs and weights are bit-identical with and without it);
- every rank samples (sharded strategies such as FSDP2 / ZeRO-3 need every rank in a forward); the main rank
  writes the PNG (atomically) and logs it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastpref.config import ConfigError
from fastpref.train.checkpoint import rng_state, set_rng_state

PROMPT_SOURCES = ("toy", "dataset")


@dataclass
class ValidationConfig:
    # a grid at step 0, every `every` optimizer steps and at the last step; 0: no validation grids
    every: int = 0
    # a list of captions; "toy": held-out toy-world prompts (spread over the MiniGenEval categories, never seen in
    # pretraining); "dataset": the first prompts of the training data (<data.root>/synth)
    prompts: list[str] | str = "toy"
    num_prompts: int = 6  # how many prompts "toy" / "dataset" take (a list is used as it is)
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # one grid row per seed
    num_inference_steps: int = 20
    guidance_scale: float = 4.0
    batch_size: int = 8  # images per pipeline call
    cell_size: int = 256  # grid cells: small images are upscaled (nearest) and large ones downscaled to fit

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError(f"every: must be >= 0 (0 turns validation grids off), got {self.every}")
        if isinstance(self.prompts, str):
            if self.prompts not in PROMPT_SOURCES:
                raise ConfigError(f"prompts: {self.prompts!r} is neither a list of captions nor one of "
                                  f"{list(PROMPT_SOURCES)}")
        else:
            if not self.prompts:
                raise ConfigError(f"prompts: the list is empty (give captions, or one of {list(PROMPT_SOURCES)})")
            for i, prompt in enumerate(self.prompts):
                if not prompt.strip():
                    raise ConfigError(f"prompts[{i}]: empty caption")
        if not self.seeds:
            raise ConfigError("seeds: at least one seed is required")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: must be distinct, got {self.seeds}")
        for key in ("num_prompts", "num_inference_steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.guidance_scale < 0:
            raise ConfigError(f"guidance_scale: must be >= 0, got {self.guidance_scale}")
        if self.cell_size < 8:
            raise ConfigError(f"cell_size: must be >= 8 pixels, got {self.cell_size}")


def toy_prompts(count: int, world_name: str = "v1") -> list[str]:
    """`count` held-out captions of toy world `world_name`, taking the categories in turn (one of each first)."""
    from fastpref.eval.minigeneval import select_prompts
    from fastpref.toy import world

    held_out = select_prompts(None, world_name)
    by_category = [[s.caption for s in held_out if s.category == c] for c in world.CATEGORIES]
    chosen: list[str] = []
    for depth in range(max(len(c) for c in by_category)):
        chosen += [captions[depth] for captions in by_category if depth < len(captions)]
    return chosen[:count]


def dataset_prompts(root: str | Path, count: int) -> list[str]:
    """The first `count` distinct prompts of the dataset's synth (or imported) groups."""
    from fastpref.data.shards import ShardError, StageDir

    try:
        synth = StageDir(root, "synth").open("none")
    except ShardError as err:
        raise ConfigError(f"validation.prompts: 'dataset' reads the training prompts from {Path(root) / 'synth'}, "
                          f"which cannot be opened ({err}); list the prompts instead") from None
    prompts: list[str] = []
    for shard in range(len(synth.shards)):
        for group in synth.load_json(shard, "groups.json"):
            if group["prompt"] not in prompts:
                prompts.append(group["prompt"])
            if len(prompts) == count:
                return prompts
    return prompts


def resolve_prompts(cfg: ValidationConfig, data_root: str | Path, model_path: str | Path | None = None) -> list[str]:
    """The validation captions; "toy" takes the held-out prompts of the world the model speaks (v1 without one)."""
    if not isinstance(cfg.prompts, str):
        return list(cfg.prompts)
    if cfg.prompts == "toy":
        from fastpref.models import model_world

        return toy_prompts(cfg.num_prompts, (model_world(model_path) if model_path is not None else None) or "v1")
    return dataset_prompts(data_root, cfg.num_prompts)


@torch.no_grad()
def sampling_embeddings(bundle, prompts: list[str], guidance_scale: float) -> dict[str, torch.Tensor]:
    """The prompt (and classifier-free-guidance) embeddings the family pipeline would compute, as pipeline kwargs."""
    pipeline = bundle.pipeline
    cfg = guidance_scale > 1.0  # what the SD / SDXL / SD3 pipelines call do_classifier_free_guidance
    common = {"device": bundle.device, "num_images_per_prompt": 1, "do_classifier_free_guidance": cfg}
    if bundle.family == "sd":
        prompt_embeds, negative = pipeline.encode_prompt(list(prompts), **common)
        out = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative}
    else:
        if bundle.family == "sd3":
            encoded = pipeline.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None,
                                             max_sequence_length=bundle.max_sequence_length, **common)
        elif bundle.family == "sdxl":
            encoded = pipeline.encode_prompt(list(prompts), **common)
        else:
            raise ValueError(f"validation grids: unsupported model family {bundle.family!r}")
        prompt_embeds, negative, pooled, negative_pooled = encoded
        out = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative,
               "pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}
    return {key: value.detach() for key, value in out.items() if value is not None}


def to_uint8(images: Any) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return images


class Validator:
    """Samples the policy on the configured prompts and seeds; writes and logs the grid."""

    def __init__(self, cfg: ValidationConfig, bundle, prompts: list[str], out_dir: str | Path,
                 call_kwargs: dict[str, Any] | None = None):
        """Call before the trainer drops the bundle's text encoders and VAE: encodes the prompts, keeps the VAE."""
        if bundle.vae is None or not bundle.text_modules():
            raise RuntimeError("Validator: needs the bundle's VAE and text encoders (create it before dropping them)")
        self.cfg = cfg
        self.prompts = list(prompts)
        self.dir = Path(out_dir) / "validation"
        self.call_kwargs = dict(call_kwargs or {})
        self.embeddings = sampling_embeddings(bundle, self.prompts, cfg.guidance_scale)
        self.vae = bundle.vae
        self.seconds = 0.0
        self._pipeline = None
        self._denoiser = None

    def due(self, step: int, max_steps: int) -> bool:
        return step == 0 or step % self.cfg.every == 0 or step == max_steps

    def path(self, step: int) -> Path:
        return self.dir / f"step-{step:06d}.png"

    def pipeline(self, bundle):
        """The family pipeline around the trained denoiser, the kept VAE and no text encoders (built once)."""
        if self._pipeline is None or self._denoiser is not bundle.denoiser:
            sampler = copy.copy(bundle)  # keeps per-instance settings (SDXL force_zeros..., SD3 T5 length)
            sampler.vae = self.vae
            sampler._pipeline = None
            self._pipeline = sampler.pipeline
            self._denoiser = bundle.denoiser
            if hasattr(self._pipeline, "set_progress_bar_config"):
                self._pipeline.set_progress_bar_config(disable=True)
        return self._pipeline

    @torch.no_grad()
    def sample(self, bundle, autocast=None, attention=None) -> np.ndarray:
        """uint8 (seeds, prompts, H, W, 3); the denoiser's mode and the global RNG states are left as they were."""
        import contextlib

        pipeline = self.pipeline(bundle)
        denoiser = bundle.denoiser
        was_training = denoiser.training
        saved = rng_state()
        device = bundle.device
        jobs = [(seed, index) for seed in self.cfg.seeds for index in range(len(self.prompts))]
        chunks = []
        denoiser.eval()
        try:
            for start in range(0, len(jobs), self.cfg.batch_size):
                chunk = jobs[start : start + self.cfg.batch_size]
                rows = torch.tensor([index for _, index in chunk])
                kwargs = {key: value.index_select(0, rows.to(value.device)) for key, value in self.embeddings.items()}
                generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed, _ in chunk]
                with autocast or contextlib.nullcontext(), attention or contextlib.nullcontext():
                    output = pipeline(**kwargs, generator=generators, num_inference_steps=self.cfg.num_inference_steps,
                                      guidance_scale=self.cfg.guidance_scale, output_type="np", **self.call_kwargs)
                chunks.append(to_uint8(output.images))
        finally:
            denoiser.train(was_training)
            set_rng_state(saved)
        images = np.concatenate(chunks)
        return images.reshape(len(self.cfg.seeds), len(self.prompts), *images.shape[1:])

    def grid(self, images: np.ndarray, step: int):
        from fastpref.eval import grids

        cells, scale = grids.fit_cells(images.reshape(-1, *images.shape[2:]), self.cfg.cell_size)
        cells = cells.reshape(*images.shape[:2], *cells.shape[1:])
        rows = [(f"seed {seed}", cells[i]) for i, seed in enumerate(self.cfg.seeds)]
        title = (f"training step {step} (sampling: {self.cfg.num_inference_steps} denoising steps, guidance "
                 f"{self.cfg.guidance_scale:g}; the same prompts and seeds at every step)")
        return rows, dict(column_labels=self.prompts, scale=scale, title=title)

    def run(self, bundle, step: int, is_main: bool, logger=None, autocast=None, attention=None) -> Path | None:
        """Sample (every rank), write the PNG and log it (main rank). Returns the PNG's path on the main rank."""
        from fastpref.eval import grids

        started = time.perf_counter()
        images = self.sample(bundle, autocast, attention)
        path = None
        if is_main:
            rows, kwargs = self.grid(images, step)
            path = grids.save_grid(self.path(step), rows, **kwargs)
            if logger is not None:
                from PIL import Image

                with Image.open(path) as image:
                    logger.log_image("validation", np.asarray(image.convert("RGB")), step)
        self.seconds += time.perf_counter() - started
        return path
