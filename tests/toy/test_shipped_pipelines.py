"""The shipped toy models (fastpref/toy/weights): each loads with its diffusers pipeline class and
with fastpref.models.load, samples deterministically, and follows captions clearly above chance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fastpref import models  # noqa: E402
from fastpref.models.bundle import load_pipeline, pipeline_call_kwargs  # noqa: E402
from fastpref.toy import pretrain, world  # noqa: E402

WEIGHTS = models.TOY_WEIGHTS_DIR
PIPELINE_CLASS = {
    "toy-sd": "StableDiffusionPipeline",
    "toy-sd-early": "StableDiffusionPipeline",
    "toy-sdxl": "StableDiffusionXLPipeline",
    "toy-sd3": "StableDiffusion3Pipeline",
}
SHIPPED_MEGABYTES_LIMIT = 40
SEEDS_PER_COLOR_PROMPT = 3
# Measured 2026-11-22: the UNet bases trained in ~20 CPU-minutes often draw nothing for a lone
# "a <color> <shape>" (toy-sd 10/36, toy-sd-early 8/36 color hits). Strict: retrained weights that
# pass turn this into a failure, so the list cannot silently go stale.
UNDERTRAINED_FOR_COLOR: dict[str, str] = {}  # name -> why (strict xfail); every shipped base passes since session 2


@pytest.fixture(scope="module", params=sorted(PIPELINE_CLASS))
def shipped(request):
    name = request.param
    folder = WEIGHTS / name
    assert (folder / "model_index.json").is_file(), f"shipped pipeline {folder} is missing"
    pipeline = load_pipeline(folder)
    pipeline.set_progress_bar_config(disable=True)
    return name, folder, pipeline


def _sample(folder, pipeline, captions, seeds, steps=4):
    with torch.no_grad():
        images = pipeline(
            prompt=list(captions),
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            num_inference_steps=steps,
            guidance_scale=4.0,
            output_type="np",
            **pipeline_call_kwargs(folder),
        ).images
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def test_loads_with_its_pipeline_class_and_the_fastpref_loader(shipped):
    name, folder, pipeline = shipped
    assert type(pipeline).__name__ == PIPELINE_CLASS[name]
    bundle = models.load(folder)
    assert bundle.family == models.TOY_MODELS[name]
    assert bundle.prediction_type == ("flow" if name == "toy-sd3" else "epsilon")
    cond = bundle.encode_prompt(["a red circle"])
    assert cond["encoder_hidden_states"].shape[0] == 1
    card = (folder / "MODEL_CARD.md").read_text()
    assert "MiniGenEval" in card and "python -m fastpref.toy.pretrain" in card


def test_fixed_seed_sampling_is_deterministic(shipped):
    _, folder, pipeline = shipped
    captions = ["a red circle", "two squares"]
    first = _sample(folder, pipeline, captions, [0, 1])
    second = _sample(folder, pipeline, captions, [0, 1])
    assert first.shape == (2, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    np.testing.assert_array_equal(first, second)
    other_seed = _sample(folder, pipeline, captions[:1], [7])
    assert not np.array_equal(first[:1], other_seed)


@pytest.mark.slow
def test_follows_the_caption_color_clearly_above_chance(shipped, request):
    """The largest detected object has the caption's color far more often than the 1-in-4 of chance.

    (Full MiniGenEval compliance of these small CPU-trained bases is low (see each MODEL_CARD.md);
    color is the easiest attribute to learn, so it is where "follows the caption" shows first.
    Three of the twelve color/shape pairs are held out of training captions. Chance is 1/len(COLORS).)"""
    from fastpref.toy import verifier

    name, folder, pipeline = shipped
    if name in UNDERTRAINED_FOR_COLOR:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"undertrained base: {UNDERTRAINED_FOR_COLOR[name]}"))
    colored = [world.PromptSpec("colors", (world.ObjectGroup(shape, color),)) for color in world.COLORS for shape in world.SHAPES]
    specs = colored * SEEDS_PER_COLOR_PROMPT
    images = _sample(folder, pipeline, [spec.caption for spec in specs], list(range(len(specs))), steps=10)
    hits = 0
    for spec, image in zip(specs, images):
        largest = max(verifier.detect_objects(image), key=lambda o: o.area, default=None)
        hits += largest is not None and largest.color == spec.groups[0].color
    chance = 1 / len(world.COLORS)
    # two binomial standard deviations above chance for 36 images is ~0.14
    assert hits / len(specs) > chance + 0.15, f"{hits}/{len(specs)} images have the caption's color"


def test_shipped_weights_fit_the_size_budget():
    total = sum(pretrain.folder_megabytes(WEIGHTS / name) for name in ["vae", *PIPELINE_CLASS])
    assert total < SHIPPED_MEGABYTES_LIMIT, f"shipped toy generators and VAE take {total:.1f} MB"
    vae = json.loads((WEIGHTS / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] != 0.18215  # set from the trained VAE's latent statistics
