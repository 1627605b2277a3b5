"""Stage 1, synth: K images per prompt from one or more diffusers text-to-image generators, with provenance.

Every image's seed is derived from (config seed, generator seed, prompt id, image index), and every shard is
a fixed slice of the prompt list, so the output does not depend on how many processes ran or whether the run
was interrupted (given the same generator batch size: batching changes float rounding).

    images.npy   (G, K, S, S, 3) uint8, images resized to image_size (center crop when not square)
    groups.json  per group: index, prompt id, prompt, and per image: generator, model, seed, settings
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Literal

import numpy as np

from fastpref.config import ConfigError
from fastpref.data.prompts import Prompt, PromptSource, read_prompts
from fastpref.data.shards import Manifest, StageDir, run_worker_stage, stage_config
from fastpref.models import resolve_path
from fastpref.utils.imports import require



@dataclasses.dataclass
class GeneratorConfig:
    """One text-to-image model and its sampling settings."""

    name: str  # the label stored in each image's provenance
    model: str  # hub id, local diffusers folder, or a shipped toy model (toy-sd, toy-sdxl, toy-sd3)
    images_per_prompt: int = 1
    steps: int = 30
    guidance_scale: float = 5.0
    height: int | None = None  # None: the pipeline's default resolution
    width: int | None = None
    seed: int = 0  # mixed into every image seed of this generator
    negative_prompt: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # sd / sdxl / sd3: build the pipeline through fastpref.models.<family> (needed for checkpoints diffusers'
    # auto-loader refuses, e.g. SD3 without T5 like toy-sd3); None: diffusers.DiffusionPipeline
    family: Literal["sd", "sdxl", "sd3"] | None = None
    pipeline_class: str | None = None  # a diffusers class name (e.g. StableCascadeCombinedPipeline); None: auto
    call_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra pipeline-call arguments
    offload: bool = False  # enable_model_cpu_offload (several large generators on one GPU)
    batch_size: int = 8  # runtime only (but see the module note on rounding)

    def validate(self) -> None:
        for key in ("images_per_prompt", "steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")


@dataclasses.dataclass
class SynthConfig:
    prompts: PromptSource
    generators: list[GeneratorConfig]
    output: str  # dataset root; this stage writes <output>/synth
    image_size: int = 512  # stored resolution (square)
    seed: int = 0
    groups_per_shard: int = 64
    device: str = "auto"  # auto: cuda when available
    shard_index: int | None = None  # job arrays: this worker's index (else RANK from torchrun)
    num_workers: int | None = None  # job arrays: worker count (else WORLD_SIZE)
    overwrite: bool = False  # delete an existing synth output first (run it as one process)
    progress: bool = True

    def validate(self) -> None:
        if not self.generators:
            raise ConfigError("generators: at least one generator is required")
        names = [g.name for g in self.generators]
        if len(set(names)) != len(names):
            raise ConfigError(f"generators: names must be unique, got {names}")
        if self.groups_per_shard < 1 or self.image_size < 8:
            raise ConfigError("groups_per_shard must be >= 1 and image_size >= 8")

    @property
    def group_size(self) -> int:
        return sum(g.images_per_prompt for g in self.generators)


RUNTIME_FIELDS = ("output", "device", "shard_index", "num_workers", "overwrite", "progress")


def synth_stage_config(config: SynthConfig) -> dict[str, Any]:
    data = stage_config(config, RUNTIME_FIELDS)
    for generator in data["generators"]:
        del generator["batch_size"], generator["offload"]
    return data


def image_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (e.g. base seed, prompt id, image index), stable across runs and machines."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def resolve_device(device: str) -> str:
    """'auto': this process's GPU (LOCAL_RANK under torchrun, so N workers use N GPUs) or the CPU."""
    if device != "auto":
        return device
    import os

    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"


def to_uint8_square(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) float in [0, 1] or uint8 -> (size, size, 3) uint8: center crop to a square, Lanczos resize."""
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    height, width = image.shape[:2]
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    if (height, width) == (size, size):
        return np.ascontiguousarray(image)
    pil = require("PIL.Image", "resizing images")
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = pil.fromarray(image[top : top + side, left : left + side])
    return np.asarray(square.resize((size, size), pil.Resampling.LANCZOS))


def load_bundle(family: str, model: str, dtype: str = "float32", device: str = "cpu"):
    """The family's ModelBundle (fastpref.models.load), modules in eval mode."""
    torch = require("torch")
    from fastpref.models import load

    bundle = load(model, family=family, dtype=getattr(torch, dtype), device=device)
    for part in [bundle.denoiser, bundle.vae, *bundle.text_modules()]:
        part.eval()
    return bundle


def load_generator(generator: GeneratorConfig, device: str):
    """(the diffusers pipeline for one generator on `device`, progress bars off; its call kwargs). The toy world's
    renderer (model toy-renderer / toy-renderer-v2) stands in for a pipeline: ground-truth images."""
    from fastpref.toy.renderer import WorldRendererPipeline, renderer_world

    if (world := renderer_world(generator.model)) is not None:
        return WorldRendererPipeline(world), dict(generator.call_kwargs)
    torch = require("torch")
    diffusers = require("diffusers", "image generation")
    from fastpref.models.bundle import pipeline_call_kwargs

    path = resolve_path(generator.model)
    call_kwargs = {**pipeline_call_kwargs(path), **generator.call_kwargs}  # the config wins over the folder's
    if generator.family is not None:
        pipe = load_bundle(generator.family, path, generator.dtype, "cpu").pipeline
    else:
        cls = diffusers.DiffusionPipeline
        if generator.pipeline_class is not None:
            cls = getattr(diffusers, generator.pipeline_class, None)
            if cls is None:
                raise ValueError(f"generator {generator.name}: diffusers has no class {generator.pipeline_class!r}")
        pipe = cls.from_pretrained(path, dtype=getattr(torch, generator.dtype))
    pipe.set_progress_bar_config(disable=True)
    if generator.offload and device.startswith("cuda"):
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    return pipe, call_kwargs


def generate_images(
    pipe, call_kwargs: dict, generator: GeneratorConfig, texts: list[str], seeds: list[int]
) -> np.ndarray:
    """(N, H, W, 3) float images in [0, 1]; each image from its own CPU torch.Generator (device independent)."""
    torch = require("torch")
    kwargs = dict(call_kwargs)
    if generator.height is not None:
        kwargs["height"] = generator.height
    if generator.width is not None:
        kwargs["width"] = generator.width
    if generator.negative_prompt is not None:
        kwargs["negative_prompt"] = [generator.negative_prompt] * len(texts)
    with torch.inference_mode():
        result = pipe(
            prompt=texts,
            num_inference_steps=generator.steps,
            guidance_scale=generator.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="np",
            **kwargs,
        )
    images = np.asarray(result.images, dtype=np.float32)
    if images.shape[0] != len(texts):
        raise RuntimeError(f"generator {generator.name}: asked for {len(texts)} images, got {images.shape[0]}")
    return images


def _settings(generator: GeneratorConfig) -> dict[str, Any]:
    keys = ("steps", "guidance_scale", "height", "width", "negative_prompt", "dtype", "family", "call_kwargs")
    return {k: getattr(generator, k) for k in keys}


def synth_shard(config: SynthConfig, prompts: list[Prompt], first_index: int, pipes: dict):
    """(images (G, K, S, S, 3) uint8, groups metadata) for one shard's prompts."""
    num_groups, group_size, size = len(prompts), config.group_size, config.image_size
    images = np.zeros((num_groups, group_size, size, size, 3), dtype=np.uint8)
    groups = [
        {"index": first_index + g, "prompt_id": p.id, "prompt": p.text, "images": [None] * group_size}
        for g, p in enumerate(prompts)
    ]
    slot = 0
    for generator in config.generators:
        jobs = [  # (group, image slot, seed)
            (g, slot + j, image_seed(config.seed, generator.seed, prompts[g].id, slot + j))
            for g in range(num_groups)
            for j in range(generator.images_per_prompt)
        ]
        for start in range(0, len(jobs), generator.batch_size):
            batch = jobs[start : start + generator.batch_size]
            texts = [prompts[g].text for g, _, _ in batch]
            pipe, call_kwargs = pipes[generator.name]
            out = generate_images(pipe, call_kwargs, generator, texts, [s for _, _, s in batch])
            for (g, k, seed), image in zip(batch, out):
                images[g, k] = to_uint8_square(image, size)
                groups[g]["images"][k] = {
                    "generator": generator.name,
                    "model": generator.model,
                    "seed": seed,
                    "generated_size": list(image.shape[:2]),
                    "settings": _settings(generator),
                }
        slot += generator.images_per_prompt
    return images, groups


def shard_ranges(num_prompts: int, groups_per_shard: int) -> list[tuple[int, int]]:
    return [(s, min(s + groups_per_shard, num_prompts)) for s in range(0, num_prompts, groups_per_shard)]


def run_synth(config: SynthConfig) -> Manifest | None:
    """Generate this worker's shards of <output>/synth; returns the manifest once all workers' shards exist."""
    prompts = read_prompts(config.prompts)
    if not prompts:
        raise ValueError(f"{config.prompts.path}: no prompts")
    ranges = shard_ranges(len(prompts), config.groups_per_shard)
    # the prompts themselves (not just their file's path) decide the output: an edited file is refused on resume
    prompt_hash = hashlib.sha256(json.dumps([[p.id, p.text] for p in prompts]).encode()).hexdigest()
    device = resolve_device(config.device)

    def load() -> dict[str, Any]:  # the generator pipelines by name, with their call kwargs
        return {g.name: load_generator(g, device) for g in config.generators}

    def write(index: int, writer, pipes: dict[str, Any]) -> None:
        start, stop = ranges[index]
        images, groups = synth_shard(config, prompts[start:stop], start, pipes)
        writer.save_array("images.npy", images)
        writer.save_json("groups.json", groups)

    stage = StageDir(config.output, "synth")
    shard_groups = [stop - start for start, stop in ranges]
    return run_worker_stage(stage, config, synth_stage_config(config), prompt_hash, shard_groups, load, write)


def cli(argv: list[str]) -> int:
    from fastpref.data import stage_cli

    return stage_cli(argv, SynthConfig, run_synth, "synth", "generate K images per prompt with several generator models")


if __name__ == "__main__":
    import sys

    sys.exit(cli(sys.argv[1:]))
