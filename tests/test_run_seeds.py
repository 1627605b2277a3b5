"""`fastpref run` with `train.seeds`: every variant trained once per seed, reported as mean ± std over the seeds with
verdicts against the combined spread and the pooled paired interval (issue 19, part 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastpref.config import ConfigError, load_config
from fastpref.pipeline import RunConfig, Stages, build_stages, seed_summary, seed_summary_lines

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/toy-rankdpo.yaml"


def stages_of(tmp_path, *overrides) -> Stages:
    return build_stages(load_config(RunConfig, RECIPE, [f"output_dir={tmp_path}", *overrides]))


def test_train_seeds_expand_every_variant(tmp_path):
    stages = stages_of(tmp_path, "train.seeds=[0, 1, 2]")
    assert list(stages.trains) == [f"{v}-seed{s}" for v in ("rankdpo", "dpo") for s in (0, 1, 2)]
    assert [t.seed for t in stages.trains.values()] == [0, 1, 2, 0, 1, 2]
    assert stages.trains["dpo-seed2"].objective.name == "dpo"
    assert stages.variant_of["dpo-seed2"] == "dpo" and stages.seeds == [0, 1, 2]
    assert stages.main is stages.trains["rankdpo-seed0"]
    assert len({t.output_dir for t in stages.trains.values()}) == 6
    plain = stages_of(tmp_path)
    assert list(plain.trains) == ["rankdpo", "dpo"] and plain.seeds is None and plain.main is plain.trains["rankdpo"]


@pytest.mark.parametrize("overrides, key", [
    (["train.seeds=[]"], "train.seeds"),
    (["train.seeds=[0, 0]"], "train.seeds"),
    (["train.seeds=[0, 1]", "variants.dpo.seed=3"], "variants.dpo.seed"),
])
def test_bad_train_seeds_are_refused_naming_the_key(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key):
        stages_of(tmp_path, *overrides)


def fake_result(rate_of_prompt) -> dict:
    samples = [{"caption": f"p{p}", "category": f"c{p % 2}", "seed": 2000 + s, "passed": s < 4 * rate_of_prompt(p)}
               for p in range(10) for s in range(4)]
    per_category = {c: sum(x["passed"] for x in samples if x["category"] == c) / 20 for c in ("c0", "c1")}
    return {"overall": sum(per_category.values()) / 2, "per_category": per_category, "samples": samples,
            "seed_spread": 0.02}


def test_seed_summary_on_hand_made_results(tmp_path):
    stages = stages_of(tmp_path, "train.seeds=[0, 1]")
    results = {"base": fake_result(lambda p: 0.25),
               "rankdpo-seed0": fake_result(lambda p: 1.0), "rankdpo-seed1": fake_result(lambda p: 0.75),
               "dpo-seed0": fake_result(lambda p: 0.25), "dpo-seed1": fake_result(lambda p: 0.25)}
    (tmp_path / "eval").mkdir()
    for name, result in results.items():
        (tmp_path / "eval" / f"{name}.json").write_text(json.dumps(result))
    cfg = load_config(RunConfig, RECIPE, [f"output_dir={tmp_path}"])
    summary = seed_summary(stages, cfg, tmp_path)
    assert summary["variants"]["rankdpo"]["overall"] == pytest.approx(0.875)
    assert summary["variants"]["rankdpo"]["overall_std"] == pytest.approx(0.1767767, rel=1e-5)
    verdicts = {(c["better"], c["than"]): c["verdict"] for c in summary["claims"]}
    # +62.5 points over the base, far above the combined spread (0.02, 0.177, 0) and an interval above zero
    assert verdicts == {("rankdpo", "base"): "shown", ("dpo", "base"): "not shown", ("rankdpo", "dpo"): "shown"}
    text = "\n".join(seed_summary_lines(summary))
    assert "| rankdpo | 2 | **87.5 ± 17.7** | 87.5 ± 17.7 |" in text  # category mean, then prompt-weighted
    assert "**dpo vs base**: category mean: not shown" in text and "  prompt-weighted: not shown" in text
    assert {(c["better"], c["than"]): c["prompt_weighted"]["verdict"] for c in summary["claims"]} == verdicts


@pytest.mark.slow
def test_shortened_demo_with_two_training_seeds(tmp_path):
    from fastpref.pipeline import run

    out = tmp_path / "run"
    generators = [{"name": "toy-sd", "model": "toy-sd-v2", "images_per_prompt": 2, "steps": 4, "batch_size": 24},
                  {"name": "toy-sdxl", "model": "toy-sdxl-v2", "images_per_prompt": 1, "steps": 4, "batch_size": 24}]
    report = run(load_config(RunConfig, RECIPE, [
        f"output_dir={out}", "progress=false", "synth.prompts.limit=12", "synth.groups_per_shard=6",
        f"synth.generators={json.dumps(generators)}", "cache.reference_errors.epochs=2", "train.max_steps=2",
        "train.data.batch_groups=4", "train.checkpoint_every=2", "train.validation.every=0", "train.seeds=[0, 1]",
        "eval.seeds_per_prompt=1", "eval.max_prompts_per_category=1", "eval.min_images_per_category=1",
        "eval.steps=2"]))
    assert set(report["train"]) == {"rankdpo-seed0", "rankdpo-seed1", "dpo-seed0", "dpo-seed1"}
    assert set(report["seeds"]["variants"]) == {"base", "rankdpo", "dpo"}
    assert "## Over training seeds [0, 1]" in (out / "report.md").read_text()
