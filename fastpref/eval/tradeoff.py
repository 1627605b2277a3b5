"""DRaFT+'s trade-off between reward and diversity, on MiniGenEval's held-out prompts and seeds (toy world).

`fastpref run` on a DRaFT recipe (every variant objective.name: draft, e.g. configs/toy-draftp.yaml's kl_coeff sweep)
measures, for the base, DRaFT (the main variant, kl_coeff 0: at the training steps listed in
eval.main_checkpoints and at its end) and DRaFT+ (the other variants), from the very images MiniGenEval scored:

- reward: ShapeCLIP (the training reward: its cosine, or its contrastive probability), prompt-weighted: the mean
  over prompts of each prompt's mean over its seeds, as the diversity is a mean over prompts (MiniGenEval gives its
  small categories more seeds; weighing images equally would let the one single_object prompt count 32 times);
- diversity: each prompt's mean pairwise ShapeCLIP 1 - cos (and pixel RMS) over its seeds, averaged over prompts
  (fastpref.eval.diversity);
- MiniGenEval beside them, so that reward hacking (reward up, correctness down) is visible.

Claims, each with a paired bootstrap interval over the same prompts:
- a model's reward vs the base's: minigeneval.bootstrap_difference of the per-(prompt, seed) rewards (prompts
  resampled, seeds within), beside the base's seed spread (the standard deviation over MiniGenEval's seed folds
  of the base's reward, as minigeneval's seed_scores): "well beyond the spread" is read off that ratio;
- diversity at a matched reward: DRaFT's path (the base, its checkpoints, its end) is taken as a curve of
  diversity against reward (points sorted by reward, linear in between) and read at a DRaFT+ model's reward; the
  difference "DRaFT+'s diversity - DRaFT's at the same reward" is bootstrapped by resampling prompts (the same
  draw for every model; both rewards and diversities recomputed per draw). A DRaFT+ reward outside the range of
  DRaFT's path has no matched point (said so, no verdict); draws that fall outside it are left out and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fastpref.eval import diversity
from fastpref.utils.stats import sample_std

DISTANCES = ("shapeclip", "pixel")


@dataclass
class PromptScores:
    """One model's per-prompt numbers on MiniGenEval's prompts (evaluation order, the same for every model)."""

    captions: list[str]
    rewards: list[list[float]]  # each prompt's ShapeCLIP rewards, its seeds in evaluation order
    folds: list[list[int]]  # each of those images' seed fold: (seed - seed_offset) % seeds_per_prompt
    diversity: dict[str, list[float]]  # distance name -> each prompt's mean pairwise distance over its seeds

    def prompt_rewards(self) -> np.ndarray:
        return np.array([np.mean(r) for r in self.rewards])

    def reward(self) -> float:
        return float(self.prompt_rewards().mean())

    def reward_seed_scores(self) -> list[float]:
        """The prompt-weighted reward on each seed fold alone (as MiniGenEvalResult.seed_scores)."""
        count = max(max(f) for f in self.folds) + 1
        return [float(np.mean([np.mean([r for r, f in zip(rewards, folds) if f == fold])
                               for rewards, folds in zip(self.rewards, self.folds) if fold in folds]))
                for fold in range(count)]

    def reward_seed_spread(self) -> float:
        scores = self.reward_seed_scores()
        return sample_std(scores)


def prompt_scores(result, shapeclip_model=None, contrastive: bool = False, world_name: str = "v1") -> PromptScores:
    """PromptScores of a MiniGenEval result that kept its images (evaluate(..., keep_images=True)); the reward is
    ShapeCLIP's cosine, or with contrastive its probability of the caption against its one-attribute variants
    (the training reward's setting: ShapeCLIPReward)."""
    from fastpref.rewards.toy import ShapeCLIPReward
    from fastpref.toy import shapeclip

    if result.images is None:
        raise ValueError("trade-off: the MiniGenEval result kept no images (evaluate(..., keep_images=True))")
    model = shapeclip_model if shapeclip_model is not None else shapeclip.load_shipped()
    captions = [sample.caption for sample in result.samples]
    rows = diversity.group_rows(captions)
    if any(len(r) < 2 for r in rows):
        raise ValueError("trade-off: every prompt needs >= 2 seeds for its diversity (eval.seeds_per_prompt >= 2)")
    pixels = diversity._pixels(result.images)
    with torch.no_grad():
        reward = ShapeCLIPReward(model, world=world_name, contrastive=contrastive)
        rewards = reward(pixels, captions, batch_size=256).double().cpu().numpy()
    offset, per_prompt = result.settings.get("seed_offset", 0), result.settings["seeds_per_prompt"]
    distances = {
        "pixel": diversity.group_diversity(pixels, captions, diversity.pixel_distance),
        "shapeclip": diversity.group_diversity(diversity.shapeclip_embeddings(pixels, model), captions,
                                               diversity.cosine_distance),
    }
    return PromptScores(
        captions=[captions[r[0]] for r in rows],
        rewards=[[float(rewards[i]) for i in r] for r in rows],
        folds=[[(result.samples[i].seed - offset) % per_prompt for i in r] for r in rows],
        diversity={name: d["per_group"] for name, d in distances.items()},
    )


def _check_same_prompts(scores: dict[str, PromptScores]) -> list[str]:
    first_name, first = next(iter(scores.items()))
    for name, s in scores.items():
        if s.captions != first.captions or [len(r) for r in s.rewards] != [len(r) for r in first.rewards]:
            raise ValueError(f"trade-off: {name} and {first_name} were not evaluated on the same prompts and seeds")
    return first.captions


def _interpolate(rewards: np.ndarray, values: np.ndarray, at: float) -> float:
    """The curve value at `at` (points sorted by reward, linear in between); nan outside the curve's range."""
    order = np.argsort(rewards, kind="stable")
    x, y = rewards[order], values[order]
    if not x[0] <= at <= x[-1]:
        return float("nan")
    return float(np.interp(at, x, y))


def matched_reward(scores: dict[str, PromptScores], curve: Sequence[str], candidate: str, distance: str = "shapeclip",
                   n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """The candidate's diversity minus the curve's diversity at the candidate's reward, with a bootstrap interval
    over prompts (see the module docstring)."""
    if len(curve) < 2:
        raise ValueError(f"trade-off: DRaFT's curve needs >= 2 models (the base and DRaFT), got {list(curve)}")
    names = [*curve, candidate]
    prompts = len(_check_same_prompts({name: scores[name] for name in names}))
    reward = np.stack([scores[name].prompt_rewards() for name in names])  # (M, P)
    values = np.stack([np.asarray(scores[name].diversity[distance]) for name in names])

    def difference(r: np.ndarray, d: np.ndarray) -> tuple[float, float]:  # per-model means -> (curve's, diff)
        on_curve = _interpolate(r[:-1], d[:-1], r[-1])
        return on_curve, d[-1] - on_curve

    observed_curve, observed = difference(reward.mean(1), values.mean(1))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, prompts, (n_boot, prompts))
    boot_r, boot_d = reward[:, draws].mean(-1), values[:, draws].mean(-1)  # (M, n_boot)
    boot = np.array([difference(boot_r[:, b], boot_d[:, b])[1] for b in range(n_boot)])
    boot = boot[np.isfinite(boot)]
    result = {"candidate": candidate, "distance": distance, "reward": float(reward[-1].mean()),
              "diversity": float(values[-1].mean()), "curve_diversity": observed_curve, "difference": observed,
              "level": level, "n_boot": n_boot, "seed": seed, "matched_draws": int(len(boot)),
              "num_prompts": prompts}
    if not np.isfinite(observed):
        result.update(low=float("nan"), high=float("nan"),
                      verdict="no matched point: its reward is outside the range of DRaFT's path")
        return result
    tail = (1.0 - level) / 2.0
    low, high = (np.quantile(boot, [tail, 1.0 - tail]) if len(boot) else (float("nan"), float("nan")))
    result.update(low=float(low), high=float(high))
    if low > 0:
        result["verdict"] = "more diversity than DRaFT at the same reward: interval above zero"
    elif high < 0:
        result["verdict"] = "less diversity than DRaFT at the same reward: interval below zero"
    else:
        result["verdict"] = "not shown: interval contains zero"
    return result


def measure(results: dict[str, Any], minigeneval: dict[str, dict[str, Any]], curve: Sequence[str],
            candidates: Sequence[str], labels: dict[str, dict[str, Any]], base: str = "base",
            shapeclip_model=None, n_boot: int = 2000, contrastive: bool = False,
            world_name: str = "v1") -> dict[str, Any]:
    """The trade-off section of a run report.

    results: name -> MiniGenEvalResult (images kept); minigeneval: name -> the report's eval entry (overall,
    prompt_mean); curve: DRaFT's path in training order, starting with the base; candidates: the DRaFT+ models;
    labels: name -> {"kl_coeff", "step"}; contrastive and world_name: the training reward's ShapeCLIP setting."""
    from fastpref.eval.minigeneval import bootstrap_difference

    scores = {name: prompt_scores(results[name], shapeclip_model, contrastive, world_name)
              for name in [*curve, *candidates]}
    _check_same_prompts(scores)
    rows = {}
    for name, s in scores.items():
        row = {**labels.get(name, {}), "reward": s.reward(), "reward_seed_scores": s.reward_seed_scores(),
               "reward_seed_spread": s.reward_seed_spread(),
               **{f"diversity_{d}": float(np.mean(s.diversity[d])) for d in DISTANCES},
               "minigeneval": minigeneval[name]["overall"], "minigeneval_prompt": minigeneval[name]["prompt_mean"]}
        if name != base:
            row["reward_vs_base"] = bootstrap_difference(s.rewards, scores[base].rewards, n_boot=10000).to_json()
        rows[name] = row
    matched = {name: {d: matched_reward(scores, curve, name, d, n_boot=n_boot) for d in DISTANCES}
               for name in candidates}
    return {"reward": "shapeclip-contrastive" if contrastive else "shapeclip", "base": base, "curve": list(curve),
            "candidates": list(candidates), "models": rows, "matched": matched}


def trains_on_contrastive(online) -> bool:
    """Whether a training's ShapeCLIP reward is the contrastive one (online.reward_kwargs: {shapeclip: {contrastive:
    true}}): the trade-off then scores that reward, not the cosine."""
    return bool(online.reward_kwargs.get("shapeclip", {}).get("contrastive", False))


REWARD_LABELS = {"shapeclip": "ShapeCLIP", "shapeclip-contrastive": "ShapeCLIP contrastive"}


def _interval(iv: dict[str, Any], scale: float = 1.0, digits: int = 3) -> str:
    return f"{scale * iv['difference']:+.{digits}f} [{scale * iv['low']:+.{digits}f}, {scale * iv['high']:+.{digits}f}]"


def report_lines(section: dict[str, Any], plot: str | None = "tradeoff.png") -> list[str]:
    """Markdown of a trade-off section: the table, the reward claims, the matched-reward claims, the plot."""
    models, base = section["models"], section["base"]
    spread = models[base]["reward_seed_spread"]
    lines = ["## Reward vs diversity (DRaFT: kl_coeff 0; DRaFT+: kl_coeff > 0)", "",
             f"Held-out MiniGenEval prompts and seeds; reward = {REWARD_LABELS[section['reward']]} and diversity = "
             "mean pairwise distance over a prompt's seeds, both prompt-weighted.", "",
             f"| model | kl_coeff | step | {REWARD_LABELS[section['reward']]} reward | vs base (95% interval) | "
             "diversity ShapeCLIP 1-cos | "
             "diversity pixel RMS | MiniGenEval | prompt-weighted |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in models.items():
        vs = _interval(row["reward_vs_base"]) if "reward_vs_base" in row else "-"
        kl = "-" if row.get("kl_coeff") is None else f"{row['kl_coeff']:g}"
        step = "-" if row.get("step") is None else str(row["step"])
        lines.append(f"| {name} | {kl} | {step} | {row['reward']:.4f} | {vs} | {row['diversity_shapeclip']:.4f} | "
                     f"{row['diversity_pixel']:.4f} | {100 * row['minigeneval']:.1f} | "
                     f"{100 * row['minigeneval_prompt']:.1f} |")
    lines += ["", f"Seed spread of the base's reward: {spread:.4f} (std over its "
              f"{len(models[base]['reward_seed_scores'])} seed folds). Reward vs the base, paired bootstrap 95% "
              "interval of the prompt-weighted difference (prompts resampled, seeds within):"]
    for name, row in models.items():
        if "reward_vs_base" not in row:
            continue
        iv = row["reward_vs_base"]
        ratio = f"{iv['difference'] / spread:+.1f}x the base's seed spread" if spread > 0 else "no seed spread"
        word = ("higher" if iv["low"] > 0 else "lower" if iv["high"] < 0 else "not shown")
        lines.append(f"- {name}: {_interval(iv)} ({ratio}): {word}")
    lines += ["", "Diversity at a matched reward: DRaFT+ minus DRaFT's path (" + " -> ".join(section["curve"]) +
              ") read at the DRaFT+ model's reward, bootstrap 95% interval over prompts:"]
    for name, by_distance in section["matched"].items():
        for distance, m in by_distance.items():
            if np.isfinite(m["difference"]):
                lines.append(f"- {name} ({distance}): {m['diversity']:.4f} vs DRaFT's {m['curve_diversity']:.4f} "
                             f"at reward {m['reward']:.4f}: {_interval(m, digits=4)} ({m['matched_draws']}/"
                             f"{m['n_boot']} draws matched): {m['verdict']}")
            else:
                lines.append(f"- {name} ({distance}): reward {m['reward']:.4f}: {m['verdict']}")
    if plot:
        lines += ["", f"![reward vs diversity]({plot})"]
    return lines + [""]


def save_plot(section: dict[str, Any], path: str | Path) -> Path | None:
    """Diversity (ShapeCLIP) and MiniGenEval against the reward: DRaFT's path as a line, DRaFT+ as points."""
    try:
        import matplotlib
    except ImportError:
        print("[fastpref] trade-off plot skipped: matplotlib is not installed (pip install 'fastpref[bench]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastpref.utils.atomic import atomic_file

    models = section["models"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "diversity_shapeclip", "diversity over seeds (ShapeCLIP 1 - cos)"),
                           (axes[1], "minigeneval", "MiniGenEval (category mean)")):
        curve = section["curve"]
        ax.plot([models[n]["reward"] for n in curve], [models[n][key] for n in curve], "o-", color="tab:gray",
                label="DRaFT (kl 0) over training")
        for n in curve:
            ax.annotate(n, (models[n]["reward"], models[n][key]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        for n in section["candidates"]:
            ax.plot(models[n]["reward"], models[n][key], "s", label=f"DRaFT+ kl {models[n].get('kl_coeff')}")
        ax.set_xlabel(f"{REWARD_LABELS[section['reward']]} reward (held-out, prompt-weighted)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
    return path
