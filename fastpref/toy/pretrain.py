"""Reproducible pretraining of the toy world's models (a shared VAE, then toy-sd / toy-sdxl / toy-sd3).

    python -m fastpref.toy.pretrain --family vae --minutes 11 --seed 0 --out fastpref/toy/weights/vae
    python -m fastpref.toy.pretrain --family toy-sd --minutes 20 --seed 0 \\
        --vae fastpref/toy/weights/vae --out fastpref/toy/weights/toy-sd

--world v1 | v2 picks the toy world (default v1, the original one); the saved model records it in its
metrics.json ("world"), which fastpref.models.model_world reads; a diffusion family refuses a VAE of
another world.

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
import json
from pathlib import Path

import torch

from fastpref.toy.world import WORLDS
# one concept per module; the names stay importable from here (shapeclip, tests, the model cards' commands)
from fastpref.toy.model_card import (CARD_GUIDANCE, CARD_SEEDS_PER_PROMPT, CARD_STEPS,  # noqa: F401
                                     folder_megabytes, score_pipeline, write_model_card)
from fastpref.toy.pretrain_checkpoint import maybe_resume as _maybe_resume  # noqa: F401
from fastpref.toy.pretrain_checkpoint import save_checkpoint as _save_checkpoint  # noqa: F401
from fastpref.toy.pretrain_diffusion import (DIFFUSION_LR, LATENT_POOL_IMAGES, LR_WARMUP_STEPS,  # noqa: F401
                                             build_toy_bundle, export_checkpoint, family_module, latent_pool,
                                             link_identical_vae, pool_latents, save_toy_pipeline, train_diffusion)
from fastpref.toy.pretrain_loop import (FAMILIES, STEPS_TIMED_BEFORE_FIXING_SCHEDULE, PretrainArgs,  # noqa: F401
                                        StepBudget, command_line, cosine_lr, images_to_tensor, loss_summary,
                                        optimizer_steps, resumed_budget, seed_everything, tensor_to_images)
from fastpref.toy.pretrain_vae import (KL_WEIGHT, OBJECT_PIXEL_WEIGHT, latent_statistics,  # noqa: F401
                                       reconstruction_pass_rate, train_vae, vae_loss)


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
    parser.add_argument("--world", default="v1", choices=sorted(WORLDS),
                        help="the toy world to learn (its train split; recorded in the model's metrics.json)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--init", type=Path,
                        help="continue from this saved pipeline of --family (same world) instead of random weights")
    parser.add_argument("--color-confusion", type=float, default=0.0,
                        help="swap each color word of a caption for its confusable partner with this probability "
                             "(fastpref.toy.world.confuse_colors; the image is unchanged): a base with a known "
                             "caption flaw")
    parser.add_argument("--freeze-text", action="store_true",
                        help="keep the text encoders as they are (--init's) and train the denoiser only, as SD keeps "
                             "CLIP frozen: a caption flaw then lands in the denoiser, where fine-tuning reaches it")
    ns = parser.parse_args(argv)
    if ns.freeze_text and ns.init is None:
        parser.error("--freeze-text needs --init (random text encoders would stay random)")
    if not 0.0 <= ns.color_confusion <= 1.0:
        parser.error(f"--color-confusion must be in [0, 1], got {ns.color_confusion}")
    if ns.family == "vae" and (ns.init is not None or ns.color_confusion):
        parser.error("--init and --color-confusion apply to the diffusion families, not --family vae")
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
