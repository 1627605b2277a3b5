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
                interval: Sequence[float] | None = None, names: tuple[str, str] = ("A", "B"),
                points: bool = True) -> dict[str, Any]:
    """The verdict on "A > B"; `interval`: a paired bootstrap 95% interval of A - B, if any. points: the scores are
    in [0, 1] and the text gives differences in percentage points (MiniGenEval); else as they are (a reward)."""
    a, b = names

    def num(x: float, sign: str = "") -> str:
        return f"{100 * x:{sign}.1f}" if points else f"{x:{sign}.4f}"

    unit = " points" if points else ""
    gain = mean_a - mean_b
    spread = combined_spread(eval_spread, std_a, std_b)
    above_spread = gain > spread
    interval_ok = interval is None or interval[0] > 0
    if above_spread and interval_ok:
        verdict = "shown"
        text = f"{a} > {b} by {num(gain, '+')}{unit}, more than the combined spread ({num(spread)})"
    elif gain < -spread and (interval is None or interval[1] < 0):
        verdict = "reversed"
        text = f"reversed: {b} > {a} by {num(-gain)}{unit}, more than the combined spread ({num(spread)})"
    else:
        verdict = "not shown"
        why = (f"the gain {num(gain, '+')} is within the combined spread ({num(spread)})" if not above_spread
               else "the paired interval includes zero")
        text = f"not shown: {why}"
    if interval is not None:
        text += f"; paired bootstrap 95% interval [{num(interval[0], '+')}, {num(interval[1], '+')}]"
    return {"verdict": verdict, "gain": gain, "combined_spread": spread,
            "interval": list(interval) if interval is not None else None, "text": text}


# -- what a claim is judged on: MiniGenEval's pass / fail, or a reward of the same images --------------------------

MINIGENEVAL = "minigeneval"
# the toy rewards every study evaluation measures image by image (fastpref.eval.diversity.eval_extras)
REWARD_METRICS = {"reward:shapeclip": ("shapeclip", "ShapeCLIP reward"),
                  "reward:shapeclip_contrastive": ("shapeclip_contrastive", "ShapeCLIP contrastive reward"),
                  "reward:quality": ("quality", "quality reward")}


def metric_label(metric: str) -> str:
    return "MiniGenEval" if metric == MINIGENEVAL else REWARD_METRICS[metric][1]


def metric_values(result: dict[str, Any], metric: str = MINIGENEVAL) -> list[float]:
    """One value per sample of a saved evaluation, in its samples' order: pass (1) / fail (0), or the reward of
    that image."""
    if metric == MINIGENEVAL:
        return [float(sample["passed"]) for sample in result["samples"]]
    if metric not in REWARD_METRICS:
        raise ValueError(f"metric {metric!r}: one of {MINIGENEVAL}, {', '.join(REWARD_METRICS)}")
    values = result.get("extras", {}).get("reward_per_image", {}).get(REWARD_METRICS[metric][0])
    if values is None or len(values) != len(result["samples"]):
        raise ValueError(f"metric {metric!r}: the evaluation keeps no per-image {REWARD_METRICS[metric][0]} reward "
                         "for each of its samples (a study evaluation measures them: fastpref.study)")
    return [float(v) for v in values]


# -- several training seeds per variant: results named "<variant>-seed<s>" (MiniGenEvalResult.to_json() dicts) --


def seeded_name(variant: str, seed: int) -> str:
    return f"{variant}-seed{seed}"


def runs_of(results: dict[str, dict[str, Any]], name: str, seeds: Sequence[int]) -> list[dict[str, Any]]:
    """The evaluations of a variant's training seeds, or the base's one."""
    return [results["base"]] if name == "base" else [results[seeded_name(name, seed)] for seed in seeds]


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
        runs = runs_of(results, variant, seeds)
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


def _prompt_means(samples: Sequence[dict[str, Any]], values: Sequence[float]) -> float:
    outcomes: dict[str, list[float]] = {}
    for sample, value in zip(samples, values):
        outcomes.setdefault(sample["caption"], []).append(value)
    return float(np.mean([np.mean(v) for v in outcomes.values()]))


def prompt_mean_of(result: dict[str, Any], metric: str = MINIGENEVAL) -> float:
    """Every prompt weighted equally (MiniGenEvalResult.prompt_mean of a saved result; or of a reward's values)."""
    return _prompt_means(result["samples"], metric_values(result, metric))


def prompt_mean_seed_spread(result: dict[str, Any], metric: str = MINIGENEVAL) -> float:
    """The prompt-weighted mean's seed-to-seed spread: its std over the evaluation-seed folds, fold f holding the
    seeds s with (s - seed_offset) % seeds_per_prompt == f of every prompt, as MiniGenEvalResult.seed_scores folds
    them for the category mean (a small category's prompts have more seeds; each fold still holds every prompt)."""
    settings = result.get("settings", {})
    offset = settings.get("seed_offset", 0)
    folds = settings.get("seeds_per_prompt") or min(
        sum(1 for x in result["samples"] if x["caption"] == c) for c in {x["caption"] for x in result["samples"]})
    values = metric_values(result, metric)
    scores = [_prompt_means([result["samples"][i] for i in picked], [values[i] for i in picked])
              for fold in range(folds)
              if (picked := [i for i, x in enumerate(result["samples"]) if (x["seed"] - offset) % folds == fold])]
    return sample_std(scores)


def pooled_outcomes(runs: Sequence[dict[str, Any]], metric: str = MINIGENEVAL
                    ) -> tuple[list[list[float]], list[str]]:
    """Per prompt, the outcomes (or rewards) of every (training seed, evaluation seed) of a variant's models, in
    one fixed order, so that two variants evaluated on the same prompts and seeds pair image for image; and each
    prompt's category."""
    outcomes: dict[str, list[float]] = {}
    category: dict[str, str] = {}
    for run in runs:
        samples, values = run["samples"], metric_values(run, metric)
        for i in sorted(range(len(samples)), key=lambda i: (samples[i]["caption"], samples[i]["seed"])):
            outcomes.setdefault(samples[i]["caption"], []).append(values[i])
            category[samples[i]["caption"]] = samples[i]["category"]
    captions = sorted(outcomes)
    return [outcomes[c] for c in captions], [category[c] for c in captions]


def seeded_interval(results: dict[str, dict[str, Any]], better: str, than: str,
                    seeds: Sequence[int], statistic: str = "category_mean", metric: str = MINIGENEVAL) -> list[float]:
    """Paired bootstrap 95% interval of `better` - `than` in MiniGenEval overall (statistic "category_mean":
    prompts resampled within their category) or in the prompt-weighted mean ("prompt_mean"), the images of all
    training seeds x evaluation seeds within each prompt (the base, a single model, paired with each training
    seed's model)."""
    from fastpref.eval.minigeneval import bootstrap_difference

    def runs(name: str) -> list[dict[str, Any]]:  # the base, a single model, once per training seed of the other
        return runs_of(results, name, seeds) * (len(seeds) if name == "base" else 1)

    a, categories = pooled_outcomes(runs(better), metric)
    b, _ = pooled_outcomes(runs(than), metric)
    interval = bootstrap_difference(a, b, categories=categories if statistic == "category_mean" else None,
                                    n_boot=4000, seed=0)
    return [interval.low, interval.high]


def judge_seeded_claim(results: dict[str, dict[str, Any]], stats: dict[str, dict[str, Any]], better: str,
                       than: str, seeds: Sequence[int], metric: str = MINIGENEVAL) -> dict[str, Any]:
    """judge_claim on the training-seed means and spreads of two variants (or the base), with their pooled paired
    interval: on the category mean (GenEval's `overall`), and under "prompt_weighted" on the mean over prompts
    (every prompt counts once, so a category of one prompt cannot carry the claim) when the results keep samples.
    A reward metric (REWARD_METRICS): judge_reward_claim."""
    if metric != MINIGENEVAL:
        return judge_reward_claim(results, better, than, seeds, metric)
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


def judge_reward_claim(results: dict[str, dict[str, Any]], better: str, than: str, seeds: Sequence[int],
                       metric: str) -> dict[str, Any]:
    """"better > than" in a reward of the evaluated images (prompt-weighted: each prompt's mean over its seeds,
    prompts equal): judge_claim on the training-seed means and spreads, the base's spread over its evaluation-seed
    folds, and the pooled paired interval; also the gain in units of that evaluation-seed spread (DRaFT's "well
    beyond the base's seed spread")."""
    per_seed = [[prompt_mean_of(run, metric) for run in runs_of(results, name, seeds)] for name in (better, than)]
    means, stds = [float(np.mean(x)) for x in per_seed], [sample_std(x) for x in per_seed]
    eval_spread = prompt_mean_seed_spread(results["base"], metric)
    interval = seeded_interval(results, better, than, seeds, statistic="prompt_mean", metric=metric)
    verdict = judge_claim(means[0], stds[0], means[1], stds[1], eval_spread, interval=interval,
                          names=(better, than), points=False)
    ratio = verdict["gain"] / eval_spread if eval_spread > 0 else None
    return {"better": better, "than": than, "metric": metric, **verdict, "means": means, "stds": stds,
            "per_seed": per_seed, "eval_seed_spread": eval_spread, "gain_over_eval_seed_spread": ratio}
