"""Claims in words: is model A better than model B, given how much the scores move without any real difference?

Two sources of noise are combined: the evaluation's seed-to-seed spread (the base evaluated on each evaluation
seed alone, fastpref.eval.minigeneval.MiniGenEvalResult.seed_spread) and the training-seed spread of each side
(the std of its score over models trained with different seeds; 0 for a single model such as the base). A claim
is shown when the gain exceeds sqrt(eval_spread^2 + std_a^2 + std_b^2) and, when a paired bootstrap interval of
the difference is given, that interval lies above zero too; otherwise it is reported as not shown, never tuned.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from fastpref.utils.stats import sample_std


def combined_spread(eval_spread: float, std_a: float, std_b: float) -> float:
    return math.sqrt(eval_spread**2 + std_a**2 + std_b**2)


def judge_claim(mean_a: float, std_a: float, mean_b: float, std_b: float, eval_spread: float,
                interval: Sequence[float] | None = None, names: tuple[str, str] = ("A", "B")) -> dict[str, Any]:
    """The verdict on "A > B" (scores in [0, 1]); `interval`: a paired bootstrap 95% interval of A - B, if any."""
    a, b = names
    gain = mean_a - mean_b
    spread = combined_spread(eval_spread, std_a, std_b)
    above_spread = gain > spread
    interval_ok = interval is None or interval[0] > 0
    if above_spread and interval_ok:
        verdict = "shown"
        text = f"{a} > {b} by {100 * gain:+.1f} points, more than the combined spread ({100 * spread:.1f})"
    elif gain < -spread and (interval is None or interval[1] < 0):
        verdict = "reversed"
        text = f"reversed: {b} > {a} by {100 * -gain:.1f} points, more than the combined spread ({100 * spread:.1f})"
    else:
        verdict = "not shown"
        why = (f"the gain {100 * gain:+.1f} is within the combined spread ({100 * spread:.1f})" if not above_spread
               else "the paired interval includes zero")
        text = f"not shown: {why}"
    if interval is not None:
        text += f"; paired bootstrap 95% interval [{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}]"
    return {"verdict": verdict, "gain": gain, "combined_spread": spread,
            "interval": list(interval) if interval is not None else None, "text": text}


# -- several training seeds per variant: results named "<variant>-seed<s>" (MiniGenEvalResult.to_json() dicts) --


def seeded_name(variant: str, seed: int) -> str:
    return f"{variant}-seed{seed}"


def variant_statistics(results: dict[str, dict[str, Any]], variants: Sequence[str],
                       seeds: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Per variant: MiniGenEval overall and per category, mean and std over its training seeds (every seed's model
    evaluated on the same prompts and evaluation seeds); the base as one model with its evaluation-seed spread."""
    base = results["base"]
    stats: dict[str, dict[str, Any]] = {"base": {
        "seeds": 1, "overall": base["overall"], "overall_std": 0.0, "per_category": dict(base["per_category"]),
        "per_category_std": {c: 0.0 for c in base["per_category"]}, "eval_seed_spread": base["seed_spread"]}}

    if "samples" in base:
        stats["base"].update(prompt_mean=prompt_mean_of(base), prompt_mean_std=0.0,
                             prompt_mean_eval_seed_spread=prompt_mean_seed_spread(base))
    for variant in variants:
        runs = [results[seeded_name(variant, seed)] for seed in seeds]
        overall = np.array([r["overall"] for r in runs])
        per_category = {c: np.array([r["per_category"][c] for r in runs]) for c in runs[0]["per_category"]}
        stats[variant] = {"seeds": len(runs), "overall": float(overall.mean()), "overall_std": sample_std(overall),
                          "per_seed": [float(x) for x in overall],
                          "per_category": {c: float(v.mean()) for c, v in per_category.items()},
                          "per_category_std": {c: sample_std(v) for c, v in per_category.items()}}
        if all("samples" in r for r in runs):
            weighted = np.array([prompt_mean_of(r) for r in runs])
            stats[variant].update(prompt_mean=float(weighted.mean()), prompt_mean_std=sample_std(weighted),
                                  prompt_mean_per_seed=[float(x) for x in weighted])
    return stats


def _prompt_means(samples: Sequence[dict[str, Any]]) -> float:
    outcomes: dict[str, list[float]] = {}
    for sample in samples:
        outcomes.setdefault(sample["caption"], []).append(float(sample["passed"]))
    return float(np.mean([np.mean(v) for v in outcomes.values()]))


def prompt_mean_of(result: dict[str, Any]) -> float:
    """Every prompt weighted equally (MiniGenEvalResult.prompt_mean of a saved result)."""
    return _prompt_means(result["samples"])


def prompt_mean_seed_spread(result: dict[str, Any]) -> float:
    """The prompt-weighted mean's seed-to-seed spread: its std over the evaluation-seed folds, fold f holding the
    seeds s with (s - seed_offset) % seeds_per_prompt == f of every prompt, as MiniGenEvalResult.seed_scores folds
    them for the category mean (a small category's prompts have more seeds; each fold still holds every prompt)."""
    settings = result.get("settings", {})
    offset = settings.get("seed_offset", 0)
    folds = settings.get("seeds_per_prompt") or min(
        sum(1 for x in result["samples"] if x["caption"] == c) for c in {x["caption"] for x in result["samples"]})
    scores = [_prompt_means(picked) for fold in range(folds)
              if (picked := [x for x in result["samples"] if (x["seed"] - offset) % folds == fold])]
    return sample_std(scores)


def pooled_outcomes(runs: Sequence[dict[str, Any]]) -> tuple[list[list[float]], list[str]]:
    """Per prompt, the outcomes of every (training seed, evaluation seed) of a variant's models, in one fixed
    order, so that two variants evaluated on the same prompts and seeds pair image for image; and each prompt's
    category."""
    outcomes: dict[str, list[float]] = {}
    category: dict[str, str] = {}
    for run in runs:
        for sample in sorted(run["samples"], key=lambda s: (s["caption"], s["seed"])):
            outcomes.setdefault(sample["caption"], []).append(float(sample["passed"]))
            category[sample["caption"]] = sample["category"]
    captions = sorted(outcomes)
    return [outcomes[c] for c in captions], [category[c] for c in captions]


def seeded_interval(results: dict[str, dict[str, Any]], better: str, than: str,
                    seeds: Sequence[int], statistic: str = "category_mean") -> list[float]:
    """Paired bootstrap 95% interval of `better` - `than` in MiniGenEval overall (statistic "category_mean":
    prompts resampled within their category) or in the prompt-weighted mean ("prompt_mean"), the images of all
    training seeds x evaluation seeds within each prompt (the base, a single model, paired with each training
    seed's model)."""
    from fastpref.eval.minigeneval import bootstrap_difference

    def runs(name: str) -> list[dict[str, Any]]:
        return [results["base"]] * len(seeds) if name == "base" else [results[seeded_name(name, s)] for s in seeds]

    a, categories = pooled_outcomes(runs(better))
    b, _ = pooled_outcomes(runs(than))
    interval = bootstrap_difference(a, b, categories=categories if statistic == "category_mean" else None,
                                    n_boot=4000, seed=0)
    return [interval.low, interval.high]


def judge_seeded_claim(results: dict[str, dict[str, Any]], stats: dict[str, dict[str, Any]], better: str,
                       than: str, seeds: Sequence[int]) -> dict[str, Any]:
    """judge_claim on the training-seed means and spreads of two variants (or the base), with their pooled paired
    interval: on the category mean (GenEval's `overall`), and under "prompt_weighted" on the mean over prompts
    (every prompt counts once, so a category of one prompt cannot carry the claim) when the results keep samples."""
    a, b = stats[better], stats[than]
    verdict = judge_claim(a["overall"], a["overall_std"], b["overall"], b["overall_std"],
                          results["base"]["seed_spread"], interval=seeded_interval(results, better, than, seeds),
                          names=(better, than))
    out = {"better": better, "than": than, **verdict}
    if "prompt_mean" in a and "prompt_mean" in b and "prompt_mean_eval_seed_spread" in stats["base"]:
        out["prompt_weighted"] = judge_claim(
            a["prompt_mean"], a["prompt_mean_std"], b["prompt_mean"], b["prompt_mean_std"],
            stats["base"]["prompt_mean_eval_seed_spread"],
            interval=seeded_interval(results, better, than, seeds, statistic="prompt_mean"), names=(better, than))
    return out
