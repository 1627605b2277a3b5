"""fastpref run's report: both MiniGenEval means, the per-seed scores, and verdicts from paired bootstrap
intervals beside the base's seed-to-seed spread."""

import json

import numpy as np
import pytest

from fastpref.eval.minigeneval import MiniGenEvalResult, Sample
from fastpref.pipeline import eval_summary, improvement_lines, write_report


def _evaluated(outcomes):
    """A MiniGenEval result from hand-made outcomes[p][s] (prompt p, seed s): prompt 0 alone in
    single_object, the others in position, so the category mean and the prompt-weighted mean differ."""
    samples = [Sample(f"prompt {p}", "single_object" if p == 0 else "position", s, bool(x), {})
               for p, row in enumerate(outcomes) for s, x in enumerate(row)]
    per_category = {c: float(np.mean([x.passed for x in samples if x.category == c]))
                    for c in ("single_object", "position")}
    return MiniGenEvalResult(float(np.mean(list(per_category.values()))), per_category, len(samples),
                             {"seeds_per_prompt": 2, "seed_offset": 0}, samples)


def test_verdicts_use_the_paired_interval_beside_the_seed_spread(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, (20, 2))
    base[:, 0] = 0
    better = base.copy()
    better[:, 0] = 1  # right on every prompt where the base fails its first seed
    worse = np.zeros_like(base)  # fails wherever the base passes
    one_prompt = base.copy()
    one_prompt[5, 0] = 1  # better on one prompt of 20: a gain, but one the prompts do not support
    results = {"base": _evaluated(base), "main": _evaluated(better), "dpo": _evaluated(base), "sft": _evaluated(worse),
               "ipo": _evaluated(one_prompt)}
    summary = eval_summary(results, main_variant="main")
    assert set(summary["main"]["paired"]) == {"base", "dpo", "sft", "ipo"} and set(summary["dpo"]["paired"]) == {"base"}
    assert summary["main"]["prompt_mean"] == pytest.approx(better.mean())
    lines = improvement_lines(summary)
    assert lines[0].startswith("Seed-to-seed spread of the base: ")
    assert "paired bootstrap 95% interval" in lines[1] and "10000 draws of the 20 prompts" in lines[1]
    main_line = next(line for line in lines if line.startswith("- main vs base:"))
    assert main_line.endswith("better than the base: interval above zero")
    assert "- dpo vs base: prompt-weighted +0.0 [+0.0, +0.0] points, category mean +0.0 [+0.0, +0.0]: " \
           "not shown: interval contains zero" in lines
    ipo = next(line for line in lines if line.startswith("- ipo vs base:"))
    assert ipo.startswith("- ipo vs base: prompt-weighted +2.5 [+0.0, ") and ipo.endswith("not shown: interval contains zero")
    assert next(line for line in lines if line.startswith("- main vs dpo:")).endswith("better than dpo: interval above zero")
    assert next(line for line in lines if line.startswith("- sft vs base:")).endswith("worse than the base: interval below zero")
    write_report(tmp_path, {"eval": summary, "seconds": {"train": 1.0}})
    text = (tmp_path / "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| main |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"**{100 * results['main'].overall:.1f}**" and cells[2] == f"{100 * better.mean():.1f}"
    assert main_line in text
    saved = json.loads((tmp_path / "report.json").read_text())["eval"]
    assert saved["main"]["paired"]["base"]["prompt_mean"]["low"] > 0


def test_no_base_or_no_seed_scores_gives_no_verdict_and_no_interval_is_not_shown():
    one = {"overall": 0.6, "per_category": {"colors": 0.6}, "seed_scores": [0.6], "seed_spread": 0.0}
    assert improvement_lines({"rankdpo": one}) == []
    assert improvement_lines({"base": {"overall": 0.5, "per_category": {}}}) == []
    lines = improvement_lines({"base": {**one, "overall": 0.5}, "rankdpo": one})  # a report without samples
    assert lines[-1] == "- rankdpo vs base: +10.0 points (no paired interval: not shown)"


def test_training_curves_plot_every_run_and_the_report_links_them(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs the 'bench' extra (matplotlib)")
    from PIL import Image

    from fastpref.train.metrics import plot_training_curves

    runs = {}
    for name, slope in (("rankdpo", 0.01), ("dpo", 0.02)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": s, "loss": 0.69 - slope * s, "implicit_accuracy": 0.5 + slope * s, "margin": slope * s}
                for s in range(1, 11)]
        rows[4]["loss"] = float("nan")  # a skipped step is a gap, not an error
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        runs[name] = run
    path = plot_training_curves(runs, tmp_path / "training.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 2 * image.height  # three panels side by side
        pixels = np.asarray(image.convert("RGB"))
    assert (pixels.std(axis=(0, 1)) > 10).all()  # drawn, not blank
    write_report(tmp_path, {"seconds": {"train": 1.0}})
    assert "![training curves: loss, implicit accuracy, margin](training.png)" in (tmp_path / "report.md").read_text()


def test_the_eval_world_is_a_validated_config_key():
    from pathlib import Path

    from fastpref.config import ConfigError, load_config
    from fastpref.pipeline import RunConfig, build_stages

    recipe = Path(__file__).resolve().parent.parent / "configs" / "toy-rankdpo.yaml"
    cfg = load_config(RunConfig, recipe, [])
    assert cfg.eval.world is None  # unset: it follows the recipe's models (fastpref.pipeline.recipe_world)
    build_stages(cfg)
    assert cfg.eval.world == "v2"  # the recipe's models' world
    assert load_config(RunConfig, recipe, ["eval.world=v1"]).eval.world == "v1"
    with pytest.raises(ConfigError, match=r"eval\.world: 'v3' is not one of"):
        load_config(RunConfig, recipe, ["eval.world=v3"])
