"""Model cards of the shipped toy models: size on disk, MiniGenEval with the card's settings, MODEL_CARD.md."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

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
    """MiniGenEval of a saved toy pipeline (held-out prompts of the world it records, verifier), with its call
    kwargs."""
    from fastpref.eval.minigeneval import DiffusersGenerate, evaluate
    from fastpref.models import model_world
    from fastpref.models.bundle import load_pipeline, pipeline_call_kwargs

    torch.set_num_threads(threads)
    generate = DiffusersGenerate(
        load_pipeline(folder), num_inference_steps=CARD_STEPS, guidance_scale=CARD_GUIDANCE,
        pipeline_kwargs=pipeline_call_kwargs(folder),
    )
    return evaluate(generate, seeds_per_prompt=seeds_per_prompt, world_name=model_world(folder) or "v1")


def caption_blind_chance(world_name: str = "v1", seed: int = 0) -> dict[str, float]:
    """Per category, the share of the card's MiniGenEval prompts that a perfect but caption-blind generator satisfies:
    it renders a held-out prompt of the same category drawn uniformly (knowing the category is more than a
    caption-blind model knows, so this bounds chance from above). Every prompt of the category's pool is rendered
    once and checked against every selected prompt, so rare coincidences (a mirrored relation, swapped objects)
    are counted exactly rather than sampled. A model has learnt a category when it scores clearly above this."""
    import numpy as np

    from fastpref.eval.minigeneval import select_prompts
    from fastpref.toy import verifier, world

    rng = np.random.default_rng(seed)
    selected = select_prompts(12, world_name)
    chance = {}
    for category in world.CATEGORIES:
        prompts = [s for s in selected if s.category == category]
        pool = [s for s in world.eval_prompts(world_name) if s.category == category]
        hits = 0
        for drawn in pool:
            objects = verifier.detect_objects(world.render(drawn, rng), world_name=world_name)
            hits += sum(all(verifier.check_objects(spec, objects).values()) for spec in prompts)
        chance[category] = hits / (len(prompts) * len(pool))
    return chance


def write_model_card(folder: Path, title: str, result=None, notes: str = "") -> str:
    """MODEL_CARD.md from the folder's metrics.json (command, steps, time, seed) and a MiniGenEval result."""
    metrics = json.loads((folder / "metrics.json").read_text())
    world_name = metrics.get("world", "v1")
    # v1's sentence is kept word for word: the shipped v1 cards predate worlds
    trained_on = ("Trained on the procedural shapes world (fastpref/toy/world.py, train split only)." if world_name == "v1"
                  else f"Trained on world {world_name} of the procedural shapes world (`--world {world_name}`: "
                       f"fastpref/toy/world.py `get_world(\"{world_name}\")`, train split only).")
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    lines += [
        trained_on,
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
            f"{CARD_STEPS} sampling steps, guidance {CARD_GUIDANCE} (fastpref.eval.minigeneval"
            f"{'' if world_name == 'v1' else ', world ' + world_name}, scored by fastpref.toy.verifier); "
            f"{result.num_images} images in {result.seconds:.0f} s.",
        ]
        if world_name != "v1":  # v1's cards predate this line
            chance = ", ".join(f"{c} {100 * a:.3f}%" for c, a in caption_blind_chance(world_name).items())
            lines += ["", f"Caption-blind chance (a perfect render of a held-out prompt of the same category drawn "
                          f"at random; fastpref.toy.model_card.caption_blind_chance): {chance}."]
        call_kwargs = json.loads((folder / "fastpref.json").read_text())["pipeline_call_kwargs"] if (folder / "fastpref.json").exists() else {}
        if call_kwargs:
            lines += ["", f"Sample with these pipeline arguments (from fastpref.json): `{call_kwargs}`."]
    text = "\n".join(lines) + "\n"
    (folder / "MODEL_CARD.md").write_text(text)
    return text
