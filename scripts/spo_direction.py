"""Does SPO move the toy model the way its scorer asks? SPO with an exact score (the images' mean brightness, or
its negative) in place of the step-aware preference model, from a given branching step; the policy's own samples
(fixed prompts, fresh noise) are scored before and after training.

    python scripts/spo_direction.py            # writes docs/results/spo-direction.{json,md} (~8 CPU-min)

tests/online/test_spo_learns.py runs spo_on_brightness at a small size (the loop's direction as a test).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EVAL_PROMPTS = 8
EVAL_SEED = 12345  # the measurement's noise, not the training's


def brightness_preference(sign: float, scale: float = 1.0):
    """sign x scale x mean brightness; the scale sets which pairs SPO's threshold keeps (p_best - p_worst of a
    softmax over two scores is tanh(difference / 2))."""
    @torch.no_grad()
    def score(pixels: torch.Tensor, prompts: list, timesteps: torch.Tensor) -> torch.Tensor:
        return sign * scale * pixels.float().mean(dim=(1, 2, 3))

    return score


def spo_on_brightness(out: Path, sign: float, *, divert_start_step: int, max_steps: int, lr: float,
                      prompts_per_rollout: int = 4, threshold: float = 0.0, scale: float = 1.0) -> tuple[float, float]:
    """(mean brightness of the policy's samples before, after) SPO on `sign` x brightness (full fine-tuning of toy-sd,
    SPO's 20 DDIM eta=1 steps, CFG 5, k = 4, 8 pairs an optimizer step)."""
    import fastpref.online.spo as spo
    from fastpref.config import from_dict
    from fastpref.train.config import TrainConfig
    from fastpref.train.online import OnlineTrainer

    cfg = from_dict(TrainConfig, {
        "model": {"path": "toy-sd"}, "objective": {"name": "spo"}, "mode": "full", "output_dir": str(out),
        "max_steps": max_steps, "checkpoint_every": 10_000, "progress": False, "tensorboard": False, "lr": lr,
        "weight_decay": 1e-4, "max_grad_norm": 1.0, "loss_backend": "reference", "device": "cpu", "seed": 0,
        "online": {
            "prompts": "toy:train", "prompt_limit": 64, "prompts_per_rollout": prompts_per_rollout, "num_steps": 20,
            "guidance_scale": 5.0, "eta": 1.0, "reward": {"spm": 1.0},
            "spo": {"divert_start_step": divert_start_step, "num_candidates": 4, "threshold": threshold,
                    "train_batch_size": 8, "pairs_per_step": 8},
        },
    })
    original = spo.spm_preference_fn
    spo.spm_preference_fn = lambda _reward: brightness_preference(sign, scale)
    try:
        trainer = OnlineTrainer(cfg)
    finally:
        spo.spm_preference_fn = original
    texts = [p.text for p in trainer.stream.prompts.prompts[-EVAL_PROMPTS:]]
    sampling = dataclasses.replace(trainer.method.sampling, threshold=0.0)

    def policy_brightness() -> float:
        pairs = spo.resample(trainer.bundle, texts, [f"eval{i}" for i in range(len(texts))], brightness_preference(1.0),
                             sampling, seed=EVAL_SEED, epoch=0, uncond=trainer.uncond, latent_shape=trainer.method.shape)
        return pairs.stats["spm_score_final"]  # the mean over the chains' final images

    before = policy_brightness()
    trainer.train()
    return before, policy_brightness()


def kept_rate_per_step(out: Path) -> dict[int, float]:
    """Mean over the run's rollouts of the share of decisions kept, per step index (its metrics.jsonl)."""
    from fastpref.train.metrics import read_metrics

    rates: dict[int, list[float]] = {}
    for row in read_metrics(out):
        for key, value in row.items():
            if key.startswith("spo_kept_rate_step"):
                rates.setdefault(int(key[len("spo_kept_rate_step"):]), []).append(value)
    return {step: sum(v) / len(v) for step, v in sorted(rates.items())}


# (branching step, optimizer steps, lr, threshold, scale): the recipe's branching (step 4) and late branching (step
# 14) keeping every pair; the recipe's branching and threshold (0.3) on brightness x 100, which keeps the pairs whose
# predicted x0 differ in brightness by more than 0.006 (the table's kept rates say from which steps); and the same
# threshold on brightness x 1e6, which keeps every pair (the threshold's bookkeeping alone must not turn the direction)
SETTINGS = [(4, 48, 2e-5, 0.0, 1.0), (14, 48, 2e-5, 0.0, 1.0), (4, 48, 2e-5, 0.3, 100.0), (4, 48, 2e-5, 0.3, 1e6)]


def main() -> int:
    from tqdm import tqdm

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for divert, steps, lr, threshold, scale in tqdm(SETTINGS, desc="spo direction"):
            for sign, asked in ((1.0, "brighter"), (-1.0, "darker")):
                start = time.perf_counter()
                run = Path(tmp) / f"{divert}-{threshold}-{scale:g}-{asked}"
                before, after = spo_on_brightness(run, sign, divert_start_step=divert, max_steps=steps, lr=lr,
                                                  threshold=threshold, scale=scale)
                rows.append({"divert_start_step": divert, "max_steps": steps, "lr": lr, "threshold": threshold,
                             "scale": scale, "asked": asked, "before": before, "after": after,
                             "seconds": time.perf_counter() - start, "kept_rate_per_step": kept_rate_per_step(run)})
    result = {"script": "scripts/spo_direction.py", "host": platform.node(), "torch": torch.__version__,
              "eval_prompts": EVAL_PROMPTS, "eval_seed": EVAL_SEED, "rows": rows}
    out = ROOT / "docs" / "results" / "spo-direction"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# SPO's direction on the toy model (scripts/spo_direction.py)", "",
             "SPO with the images' mean brightness (or its negative) as the scorer; the mean brightness of the policy's "
             f"samples on {EVAL_PROMPTS} fixed prompts (noise seed {EVAL_SEED}) before and after training.", "",
             "| branching from step | steps | lr | threshold | score scale | asked | before | after | moved the asked way "
             "| kept rate, steps 4-9 / 10-19 | seconds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        right = (r["after"] > r["before"]) == (r["asked"] == "brighter")
        early, late = ([v for k, v in r["kept_rate_per_step"].items() if lo <= k < hi] for lo, hi in ((4, 10), (10, 20)))
        kept = " / ".join(f"{sum(v) / len(v):.0%}" if v else "-" for v in (early, late))
        lines.append(f"| {r['divert_start_step']} | {r['max_steps']} | {r['lr']:g} | {r['threshold']:g} | {r['scale']:g} | "
                     f"{r['asked']} | {r['before']:.3f} | "
                     f"{r['after']:.3f} | {'yes' if right else 'no'} | {kept} | {r['seconds']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
