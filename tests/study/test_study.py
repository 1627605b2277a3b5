"""fastpref study: the planner shares identical stages, the report's verdicts, the random-label control, and a tiny
study end to end (runs, reruns to the same table, resumes after losing work)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastpref.config import ConfigError, from_dict, load_config
from fastpref.eval.verdicts import combined_spread, judge_claim
from fastpref.study import Study, StudyConfig, flat_differences

ROOT = Path(__file__).resolve().parents[2]
ABLATIONS = ROOT / "configs/studies/rankdpo-ablations.yaml"


def study_of(tmp_path, **changes) -> StudyConfig:
    cfg = load_config(StudyConfig, ABLATIONS, [f"output_dir={tmp_path}"])
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def test_ablation_study_plans_each_shared_stage_once(tmp_path):
    study = Study(study_of(tmp_path))
    # 6 variants x 3 seeds: K=4 and K=2 images -> 2 synth; ensemble / shapeclip / random labels of K=4 and the
    # ensemble of K=2 -> 4 label; the seed changes the cached reference's noise -> 4 datasets x 3 seeds caches
    assert study.plan.counts() == {"synth": 2, "label": 4, "cache": 12, "train": 18, "eval": 19}
    by_run: dict[str, set[str]] = {}
    for t in study.plan.trainings:
        by_run.setdefault(t.run, set()).add(t.variant)
    # rankdpo, dpo and the uniform weighting train on the very same cache for each seed
    assert {"rankdpo", "dpo", "rankdpo-uniform"} in by_run.values()


def test_seed_only_in_training_shares_the_cache_across_seeds(tmp_path):
    study = Study(study_of(tmp_path, seed_keys=["train.seed"]))
    assert study.plan.counts()["cache"] == 4 and study.plan.counts()["train"] == 18


def test_run_config_gives_each_training_its_own_seed_and_objective(tmp_path):
    study = Study(study_of(tmp_path))
    run_key = next(t.run for t in study.plan.trainings if t.name == "dpo-seed1")
    from fastpref.pipeline import build_stages

    trains = build_stages(study.run_config(run_key)).trains
    assert set(trains) == {"rankdpo-seed1", "dpo-seed1", "rankdpo-uniform-seed1"}
    assert trains["dpo-seed1"].objective.name == "dpo" and trains["dpo-seed1"].seed == 1
    assert trains["rankdpo-uniform-seed1"].objective.weighting == "uniform"
    assert trains["rankdpo-seed1"].objective.weighting == "dcg"
    assert len({t.output_dir for t in trains.values()}) == 3


def test_flat_differences():
    assert flat_differences({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 1, "c": 5}, "d": 3}) == {"a.c": 5}
    assert flat_differences({"x": [1]}, {"x": [1, 2]}) == {"x": [1, 2]}


@pytest.mark.parametrize("changes, key", [
    ({"claims": [{"better": "rankdpo", "than": "nope"}]}, "claims[0].than"),
    ({"variants": {"a": {"eval.steps": 2}}}, "variants.a.eval.steps"),
    ({"variants": {"a": {"train.seed": 3}}}, "variants.a.train.seed"),
    ({"seeds": []}, "seeds"),
    ({"claims": [{"better": "rankdpo", "than": "base", "metric": "reward:beauty"}]}, "claims[0].metric"),
    ({"variants": {"a": {"train.objective.name": "nonsense"}}}, "variants.a"),
])
def test_bad_study_config_names_the_key(tmp_path, changes, key):
    data = {"recipe": str(ROOT / "configs/toy-rankdpo.yaml"), "output_dir": str(tmp_path),
            "variants": {"rankdpo": {}}, **changes}
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        Study(from_dict(StudyConfig, data))


def test_verdicts_on_hand_made_numbers():
    assert combined_spread(0.03, 0.04, 0.0) == pytest.approx(0.05)
    shown = judge_claim(0.70, 0.01, 0.60, 0.02, 0.03, names=("RankDPO", "DPO"))
    assert shown["verdict"] == "shown" and "RankDPO > DPO by +10.0 points" in shown["text"]
    within = judge_claim(0.64, 0.03, 0.60, 0.02, 0.03)
    assert within["verdict"] == "not shown" and "within the combined spread" in within["text"]
    reversed_ = judge_claim(0.50, 0.0, 0.60, 0.0, 0.03, names=("RankDPO", "base"))
    assert reversed_["verdict"] == "reversed" and reversed_["text"].startswith("reversed: base > RankDPO by 10.0")
    # above the spread but a paired interval that includes zero: not shown
    assert judge_claim(0.70, 0.0, 0.60, 0.0, 0.03, interval=(-0.01, 0.2))["verdict"] == "not shown"
    assert judge_claim(0.70, 0.0, 0.60, 0.0, 0.03, interval=(0.02, 0.2))["verdict"] == "shown"
    # a reward: differences as they are, not in points
    reward = judge_claim(0.74, 0.0, 0.70, 0.0, 0.01, interval=(0.01, 0.07), names=("DRaFT", "base"), points=False)
    assert reward["verdict"] == "shown" and reward["text"].startswith("DRaFT > base by +0.0400, more than the "
                                                                        "combined spread (0.0100)")


def test_random_reward_is_a_reproducible_function_of_seed_image_and_prompt():
    from fastpref.rewards import build_reward

    pixels = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = [f"prompt {i % 2}" for i in range(6)]
    reward = build_reward("random", seed=3)
    scores = reward(pixels, prompts)
    assert torch.equal(scores, build_reward("random", seed=3)(pixels, prompts, batch_size=2))
    order = torch.tensor([5, 2, 0, 1, 4, 3])
    assert torch.equal(reward(pixels[order], [prompts[i] for i in order]), scores[order])
    assert not torch.equal(build_reward("random", seed=4)(pixels, prompts), scores)
    assert ((scores >= 0) & (scores < 1)).all() and len(set(scores.tolist())) == 6


TINY = {
    "synth.prompts.limit": 12, "synth.groups_per_shard": 6,
    "synth.generators": [{"name": "toy-sd", "model": "toy-sd-v2", "images_per_prompt": 2, "steps": 4,
                          "batch_size": 24},
                         {"name": "toy-sdxl", "model": "toy-sdxl-v2", "images_per_prompt": 1, "steps": 4,
                          "batch_size": 24}],
    "cache.reference_errors.epochs": 2, "train.max_steps": 2, "train.data.batch_groups": 4,
    "train.checkpoint_every": 2, "train.validation.every": 0,
    "eval.seeds_per_prompt": 1, "eval.max_prompts_per_category": 1, "eval.min_images_per_category": 1,
    "eval.steps": 2,
}


@pytest.mark.slow
def test_tiny_study_runs_shares_and_reproduces(tmp_path):
    cfg = from_dict(StudyConfig, {
        "recipe": str(ROOT / "configs/toy-rankdpo.yaml"), "output_dir": str(tmp_path / "study"),
        "seeds": [0, 1], "overrides": TINY, "progress": False,
        "variants": {"rankdpo": {}, "dpo": {"train.objective.name": "dpo"},
                     "random": {"label.rewards": [{"name": "random", "kwargs": {"seed": 0}}]}},
        "claims": [{"better": "rankdpo", "than": "dpo"}, {"better": "rankdpo", "than": "base"}]})
    report = Study(cfg).run()
    out = tmp_path / "study"
    assert report["counts"] == {"synth": 1, "label": 2, "cache": 4, "train": 6, "eval": 7}
    # the two label variants read the one synth folder
    links = sorted(p for p in (out / "data").glob("*/synth"))
    assert len(links) == 2 and all(p.is_symlink() for p in links)
    assert len({p.resolve() for p in links}) == 1
    assert sorted(p.name for p in (out / "eval").glob("*.json")) == sorted(
        ["base.json"] + [f"{v}-seed{s}.json" for v in ("rankdpo", "dpo", "random") for s in (0, 1)])
    assert (out / "scores.png").stat().st_size > 0 and "## Claims" in (out / "report.md").read_text()
    assert [c["verdict"] in ("shown", "not shown", "reversed") for c in report["claims"]] == [True, True]
    stats = report["variants"]["rankdpo"]
    per_seed = [json.loads((out / f"eval/rankdpo-seed{s}.json").read_text())["overall"] for s in (0, 1)]
    assert stats["overall"] == pytest.approx(np.mean(per_seed))
    assert stats["overall_std"] == pytest.approx(np.std(per_seed, ddof=1))

    # lose an evaluation and the last checkpoint of one training: the rerun redoes just that, to the same table
    (out / "eval/dpo-seed1.json").unlink()
    again = Study(cfg).run()
    def scores(variants):  # the training seconds grow with every invocation (below); the scores must not move
        return {name: {k: v for k, v in row.items() if not k.startswith("train_seconds")}
                for name, row in variants.items()}

    assert scores(again["variants"]) == scores(report["variants"])
    assert again["claims"] == report["claims"]
    # the seconds are what every invocation spent, not just the rerun's few (it skipped synth, label and cache)
    assert set(again["seconds"]) == set(report["seconds"])
    assert all(again["seconds"][stage] >= report["seconds"][stage] > 0 for stage in report["seconds"])
    assert json.loads((out / "seconds.json").read_text())["stages"] == again["seconds"]
    # each variant's training seconds, mean ± std over its seeds, in its row of the table
    for variant in ("rankdpo", "dpo", "random"):
        spent = json.loads((out / "seconds.json").read_text())["trainings"]
        per_seed = [spent[f"{variant}-seed{s}"] for s in (0, 1)]
        assert min(per_seed) > 0 and again["variants"][variant]["train_seconds"] == pytest.approx(np.mean(per_seed))
        assert again["variants"][variant]["train_seconds"] >= report["variants"][variant]["train_seconds"]
    assert "train_seconds" not in again["variants"]["base"]
    row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| dpo | 2 |"))
    mean, std = again["variants"]["dpo"]["train_seconds"], again["variants"]["dpo"]["train_seconds_std"]
    assert row.endswith(f"| {mean:.0f} ± {std:.0f} |")


def test_claim_interval_pairs_seeds_and_sees_a_uniform_gain():
    from fastpref.eval.verdicts import pooled_outcomes, seeded_interval

    def result(passed_of):  # a saved MiniGenEval result: 8 prompts in 2 categories, 4 evaluation seeds
        return {"samples": [{"caption": f"p{p}", "category": f"c{p % 2}", "seed": 2000 + s, "passed": passed_of(p, s)}
                            for p in range(8) for s in range(4)]}

    results = {"base": result(lambda p, s: s == 0), "a-seed0": result(lambda p, s: True),
               "a-seed1": result(lambda p, s: s < 3), "b-seed0": result(lambda p, s: s == 0),
               "b-seed1": result(lambda p, s: s == 0)}
    outcomes, categories = pooled_outcomes([results["a-seed0"], results["a-seed1"]])
    assert len(outcomes) == 8 and all(len(o) == 8 for o in outcomes) and categories[:2] == ["c0", "c1"]
    low, high = seeded_interval(results, "a", "base", [0, 1])
    assert 0 < low <= high  # better on every prompt: the interval is above zero
    assert seeded_interval(results, "b", "base", [0, 1]) == [0.0, 0.0]  # identical outcomes: no difference at all


def test_a_one_prompt_category_carries_the_category_mean_but_not_the_prompt_weighted_claim():
    """Issue 13's complaint in miniature: 1 prompt in one category, 30 in the other; a model that fixes only the
    lone prompt gains half a category (shown on the category mean) and nothing weighted by prompt (not shown)."""
    from fastpref.eval.verdicts import judge_seeded_claim, prompt_mean_seed_spread, variant_statistics

    def result(passed_of):
        samples = [{"caption": f"p{p}", "category": "lone" if p == 0 else "many", "seed": 2000 + s,
                    "passed": passed_of(p, s)} for p in range(31) for s in range(4)]
        per_category = {c: float(np.mean([x["passed"] for x in samples if x["category"] == c])) for c in ("lone", "many")}
        return {"samples": samples, "per_category": per_category, "overall": float(np.mean(list(per_category.values()))),
                "seed_spread": 0.01}

    base = result(lambda p, s: p != 0 and (p + s) % 2 == 0)
    fixed = result(lambda p, s: p == 0 or (p + s) % 2 == 0)
    results = {"base": base, "a-seed0": fixed, "a-seed1": fixed}
    stats = variant_statistics(results, ["a"], [0, 1])
    assert stats["a"]["prompt_mean"] - stats["base"]["prompt_mean"] == pytest.approx(1 / 31)
    claim = judge_seeded_claim(results, stats, "a", "base", [0, 1])
    assert claim["verdict"] == "shown" and claim["gain"] == pytest.approx(0.5)
    assert claim["prompt_weighted"]["verdict"] == "not shown"
    # the base's prompt-weighted spread over its evaluation-seed folds (fold s: the s-th seed of every prompt)
    folds = [np.mean([float(p != 0 and (p + s) % 2 == 0) for p in range(31)]) for s in range(4)]
    assert prompt_mean_seed_spread(base) == pytest.approx(np.std(folds, ddof=1))


def test_prompt_weighted_seed_spread_folds_a_small_categorys_extra_seeds_like_the_category_mean():
    """v1 gives its 1-3 prompt categories 16-64 seeds per prompt and the others 4: fold f holds the seeds s with
    (s - offset) % 4 == f, so every fold has every prompt (folding by seed index would leave folds 5-64 with the lone
    prompts only, and a spread of ~40 points)."""
    from fastpref.eval.verdicts import prompt_mean_seed_spread

    def passed(p, s):
        return (p + s) % 3 == 0
    samples = [{"caption": f"p{p}", "category": "many", "seed": 2000 + s, "passed": passed(p, s)}
               for p in range(1, 9) for s in range(4)]
    samples += [{"caption": "p0", "category": "lone", "seed": 2000 + s, "passed": passed(0, s)} for s in range(64)]
    result = {"samples": samples, "settings": {"seeds_per_prompt": 4, "seed_offset": 2000}}
    folds = []
    for f in range(4):
        lone = np.mean([passed(0, s) for s in range(f, 64, 4)])
        folds.append(np.mean([lone] + [float(passed(p, f)) for p in range(1, 9)]))
    assert prompt_mean_seed_spread(result) == pytest.approx(np.std(folds, ddof=1))


def _rewarded(reward_of, order=1):
    """A saved study evaluation of 6 prompts x 4 evaluation seeds whose images carry a ShapeCLIP reward each (stored
    in `order`: 1 as sampled, -1 reversed, which pairing must not care about)."""
    samples = [{"caption": f"p{p}", "category": f"c{p % 2}", "seed": 2000 + s, "passed": reward_of(p, s) > 0.5}
               for p in range(6) for s in range(4)][::order]
    per_image = [reward_of(int(x["caption"][1:]), x["seed"] - 2000) for x in samples]
    return {"samples": samples, "settings": {"seeds_per_prompt": 4, "seed_offset": 2000},
            "extras": {"reward_per_image": {"shapeclip": per_image}}}


def test_a_reward_claim_pairs_image_for_image_and_states_the_gain_in_base_seed_spreads():
    from fastpref.eval.verdicts import judge_seeded_claim, prompt_mean_seed_spread

    def base_reward(p, s):
        return 0.5 + 0.05 * ((p * 7 + s * 3) % 5) / 4
    results = {"base": _rewarded(base_reward, order=-1),
               "up-seed0": _rewarded(lambda p, s: base_reward(p, s) + 0.10),
               "up-seed1": _rewarded(lambda p, s: base_reward(p, s) + 0.12),
               "same-seed0": _rewarded(base_reward), "same-seed1": _rewarded(base_reward, order=-1)}
    claim = judge_seeded_claim(results, {}, "up", "base", [0, 1], metric="reward:shapeclip")
    base_mean = np.mean([base_reward(p, s) for p in range(6) for s in range(4)])
    assert claim["means"] == pytest.approx([base_mean + 0.11, base_mean])
    assert claim["stds"] == pytest.approx([np.std([0.10, 0.12], ddof=1), 0.0])
    folds = [np.mean([base_reward(p, s) for p in range(6)]) for s in range(4)]
    assert claim["eval_seed_spread"] == pytest.approx(np.std(folds, ddof=1))
    assert prompt_mean_seed_spread(results["base"], "reward:shapeclip") == pytest.approx(np.std(folds, ddof=1))
    assert claim["gain_over_eval_seed_spread"] == pytest.approx(0.11 / np.std(folds, ddof=1))
    # every image gains 0.10 or 0.12 over its own pair in the base (stored in the other order)
    from fastpref.eval.verdicts import pooled_outcomes

    up, _ = pooled_outcomes([results["up-seed0"], results["up-seed1"]], "reward:shapeclip")
    base, _ = pooled_outcomes([results["base"]] * 2, "reward:shapeclip")
    gains = np.array(up) - np.array(base)
    assert np.allclose(gains[:, :4], 0.10) and np.allclose(gains[:, 4:], 0.12)
    assert 0.10 - 1e-9 <= claim["interval"][0] < claim["interval"][1] <= 0.12 + 1e-9
    assert claim["verdict"] == "shown" and "up > base by +0.1100" in claim["text"]
    same = judge_seeded_claim(results, {}, "same", "base", [0, 1], metric="reward:shapeclip")
    assert same["interval"] == pytest.approx([0.0, 0.0]) and same["verdict"] == "not shown"
    from fastpref.pipeline import claim_lines

    line = claim_lines([{"name": "up > base", **claim}], name_of=lambda c: c["name"])[0]
    assert "ShapeCLIP reward (prompt-weighted; up " in line and f"{claim['gain_over_eval_seed_spread']:+.1f}x" in line
    del results["base"]["extras"]
    with pytest.raises(ValueError, match="reward:shapeclip"):
        judge_seeded_claim(results, {}, "up", "base", [0, 1], metric="reward:shapeclip")


TINY_ONLINE = {
    "train.max_steps": 2, "train.checkpoint_every": 2, "train.validation.every": 0,
    "train.online.prompts_per_rollout": 2, "train.online.group_size": 2, "train.online.num_steps": 2,
    "train.online.sample_batch_size": 4, "train.online.grpo.train_batch_size": 4,
    "eval.seeds_per_prompt": 1, "eval.max_prompts_per_category": 1, "eval.min_images_per_category": 1,
    "eval.steps": 2,
}


def test_an_online_recipe_is_one_run_per_study_with_a_training_per_seed(tmp_path):
    """A prompts-only recipe (GRPO) has no synth / label / cache to share: the default seed keys seed what it has
    (train.seed), and every (variant, seed) is a training of one run."""
    cfg = from_dict(StudyConfig, {
        "recipe": str(ROOT / "configs/toy-grpo-sd.yaml"), "output_dir": str(tmp_path / "study"), "seeds": [0, 1],
        "overrides": TINY_ONLINE, "progress": False,
        "variants": {"grpo": {}, "fast": {"train.lr": 1.0e-3}}, "claims": [{"better": "grpo", "than": "base"}]})
    study = Study(cfg)
    assert study.plan.counts() == {"synth": 0, "label": 0, "cache": 0, "train": 4, "eval": 5}
    assert len({t.run for t in study.plan.trainings}) == 1
    run = study.run_config(study.plan.trainings[0].run)
    assert run.data_root is None and run.cache is None and run.synth is None
    from fastpref.pipeline import build_stages

    trains = build_stages(run).trains
    assert {name: (t.seed, t.lr) for name, t in trains.items()} == {
        "grpo-seed0": (0, 3.0e-4), "grpo-seed1": (1, 3.0e-4), "fast-seed0": (0, 1.0e-3), "fast-seed1": (1, 1.0e-3)}


def test_a_tiny_online_study_runs_end_to_end(tmp_path):
    cfg = from_dict(StudyConfig, {
        "recipe": str(ROOT / "configs/toy-grpo-sd.yaml"), "output_dir": str(tmp_path / "study"), "seeds": [0, 1],
        "overrides": TINY_ONLINE, "progress": False, "variants": {"grpo": {}},
        "claims": [{"better": "grpo", "than": "base"},
                   {"better": "grpo", "than": "base", "metric": "reward:shapeclip", "name": "reward"}],
        "eval": {"seeds_per_prompt": 2}})  # two seeds per prompt: a diversity to measure
    report = Study(cfg).run()
    out = tmp_path / "study"
    assert report["counts"] == {"synth": 0, "label": 0, "cache": 0, "train": 2, "eval": 3}
    assert sorted(p.name for p in (out / "eval").glob("*.json")) == ["base.json", "grpo-seed0.json",
                                                                      "grpo-seed1.json"]
    assert not (out / "data").exists() and not (out / "synth").exists()
    assert set(report["variants"]) == {"base", "grpo"} and report["claims"][0]["verdict"] in (
        "shown", "not shown", "reversed")
    # beside MiniGenEval: the rewards and diversity of the images it scored, per seed in each stored evaluation
    stored = {n: json.loads((out / "eval" / f"{n}.json").read_text())["extras"]
              for n in ("base", "grpo-seed0", "grpo-seed1")}
    per_seed = [stored[f"grpo-seed{s}"]["reward"]["shapeclip"] for s in (0, 1)]
    assert report["extras"]["grpo"]["reward_shapeclip"] == pytest.approx(np.mean(per_seed))
    assert report["extras"]["grpo"]["reward_shapeclip_std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert report["extras"]["base"]["diversity_pixel"] == stored["base"]["diversity"]["pixel"] > 0
    # the claim on the reward: each image's ShapeCLIP, stored beside its sample, prompt-weighted per training seed
    from fastpref.eval.verdicts import prompt_mean_of

    evaluations = {n: json.loads((out / "eval" / f"{n}.json").read_text()) for n in ("base", "grpo-seed0", "grpo-seed1")}
    for name, stored_eval in evaluations.items():
        per_image = stored_eval["extras"]["reward_per_image"]["shapeclip"]
        assert len(per_image) == len(stored_eval["samples"])
        assert np.mean(per_image) == pytest.approx(stored_eval["extras"]["reward"]["shapeclip"])
    reward_claim = report["claims"][1]
    assert reward_claim["metric"] == "reward:shapeclip" and reward_claim["means"] == pytest.approx(
        [np.mean([prompt_mean_of(evaluations[f"grpo-seed{s}"], "reward:shapeclip") for s in (0, 1)]),
         prompt_mean_of(evaluations["base"], "reward:shapeclip")])
    assert "- **reward**: ShapeCLIP reward (prompt-weighted; grpo " in (out / "report.md").read_text()
    assert "## Rewards and diversity of the evaluated images" in (out / "report.md").read_text()
    from fastpref.eval.diversity import eval_extras
    from fastpref.pipeline import EvalConfig, evaluate_pipeline

    study = Study(cfg)
    ev = from_dict(EvalConfig, {**study.plan.eval, "world": "v2"})
    again = eval_extras(evaluate_pipeline(study._base_pipeline(), ev, progress=False))
    assert again["reward"] == pytest.approx(stored["base"]["reward"])
    assert again["diversity"] == pytest.approx(stored["base"]["diversity"])

    # an evaluation stored before each image's rewards were kept is made again (a reward claim needs them); the
    # others are read back as they are
    old = out / "eval" / "grpo-seed1.json"
    legacy = json.loads(old.read_text())
    del legacy["extras"]["reward_per_image"]
    old.write_text(json.dumps(legacy))
    kept = {n: (out / "eval" / f"{n}.json").stat().st_mtime_ns for n in ("base", "grpo-seed0")}
    assert Study(cfg).run()["claims"][1]["means"] == pytest.approx(reward_claim["means"])
    assert "reward_per_image" in json.loads(old.read_text())["extras"]
    assert {n: (out / "eval" / f"{n}.json").stat().st_mtime_ns for n in kept} == kept

    # the same study with another eval section: the trainings are reused, the stored evaluations are not
    trained = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/train/*/checkpoints/*/trainable.safetensors")}
    assert len(trained) == 2
    cfg.eval = {"split": "train"}  # the study's eval section: merged into the recipe's, key by key
    Study(cfg).run()
    for name in ("base", "grpo-seed0", "grpo-seed1"):
        settings = json.loads((out / "eval" / f"{name}.json").read_text())["settings"]
        assert settings["split"] == "train" and settings["eval_config"]["split"] == "train"
        # every other eval setting is still the recipe's (with the study's overrides)
        assert (settings["seeds_per_prompt"], settings["seed_offset"], settings["eval_config"]["steps"]) == (1, 2000, 2)
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/train/*/checkpoints/*/trainable.safetensors")} == trained


NOISYCAP = str(ROOT / "configs/toy-noisycap.yaml")


def test_a_variant_with_its_own_recipe_puts_an_online_method_beside_the_offline_ones(tmp_path):
    """`recipe:` in a variant: GRPO (prompts only) beside RankDPO on the recipe's cache, from the same base model;
    the study's cache override is not forced onto the online recipe, its train override is."""
    cfg = from_dict(StudyConfig, {
        "recipe": NOISYCAP, "output_dir": str(tmp_path / "study"), "seeds": [0, 1], "progress": False,
        "overrides": {"train.validation.every": 0, "cache.reference_errors.epochs": 2},
        "variants": {"rankdpo": {},
                     "grpo": {"recipe": str(ROOT / "configs/toy-grpo-sd.yaml"),
                              "train.model.path": "toy-sd-noisycap-v2", "train.lr": 1.0e-3}}})
    study = Study(cfg)
    # the offline seeds each have their own cache (the seed draws the cached reference's noise); GRPO's are one run
    assert study.plan.counts() == {"synth": 1, "label": 1, "cache": 2, "train": 4, "eval": 5}
    online = [t.run for t in study.plan.trainings if t.variant == "grpo"]
    assert len(set(online)) == 1 and study.plan.run_data[online[0]] is None
    from fastpref.pipeline import build_stages

    run = study.run_config(online[0])
    assert run.cache is None and run.synth is None
    trains = build_stages(run).trains
    assert {name: (t.objective.name, t.model.path, t.lr, t.seed, t.validation.every) for name, t in trains.items()} == {
        "grpo-seed0": ("grpo", "toy-sd-noisycap-v2", 1.0e-3, 0, 0),
        "grpo-seed1": ("grpo", "toy-sd-noisycap-v2", 1.0e-3, 1, 0)}
    offline = build_stages(study.run_config(next(t.run for t in study.plan.trainings if t.variant == "rankdpo")))
    assert offline.main.model.path == "toy-sd-noisycap-v2" and offline.main.objective.name == "rankdpo"
    # the eval section is the study recipe's, for every variant
    assert study.plan.eval == {**read_yaml(NOISYCAP)["eval"]}


def test_variants_of_different_recipes_train_each_as_its_own_recipe_says(tmp_path):
    """A run's trainings are its first one plus overrides, which cannot remove a key: SPO and DRaFT beside GRPO
    must not inherit what only GRPO's recipe sets (its 10 sampling steps, its CFG, its grpo section)."""
    recipes = {"grpo": "configs/toy-grpo-sd.yaml", "spo": "configs/toy-spo.yaml", "draft": "configs/toy-draft.yaml"}
    cfg = from_dict(StudyConfig, {
        "recipe": NOISYCAP, "output_dir": str(tmp_path / "study"), "seeds": [0, 1], "progress": False,
        "variants": {"rankdpo": {}, **{name: {"recipe": str(ROOT / path), "train.model.path": "toy-sd-noisycap-v2"}
                                       for name, path in recipes.items()}}})
    study = Study(cfg)
    runs = {t.variant: t.run for t in study.plan.trainings}
    assert len(set(runs.values())) == 4
    from fastpref.pipeline import build_stages
    from fastpref.train.config import TrainConfig

    for name, path in recipes.items():
        trains = build_stages(study.run_config(runs[name])).trains
        want = from_dict(TrainConfig, {**read_yaml(ROOT / path)["train"], "model": {"path": "toy-sd-noisycap-v2"}})
        got = trains[f"{name}-seed1"]
        want.online.toy_world = got.online.toy_world  # the run fills in its world (v2) where the recipe leaves it
        assert (got.objective.name, got.online, got.lr, got.max_steps) == (
            want.objective.name, want.online, want.lr, want.max_steps), name


def read_yaml(path):
    import yaml

    return yaml.safe_load(Path(path).read_text())


@pytest.mark.parametrize("variant, match", [
    # the online recipe's own base (toy-sd-v2) is not the noisy-caption base the study's recipe trains
    ({"recipe": str(ROOT / "configs/toy-grpo-sd.yaml")}, "variants.grpo: trains model 'toy-sd-v2'"),
    ({"recipe": "configs/nope.yaml"}, "variants.grpo.recipe: 'configs/nope.yaml' is not a file"),
    ({"recipe": 3}, "variants.grpo.recipe: the path of a run recipe"),
    # a variant that moves the offline recipe to another model is refused too: it would be judged against this base
    ({"cache.model": "toy-sd-v2"}, "variants.grpo: trains model 'toy-sd-v2'"),
])
def test_every_variant_starts_from_the_base_it_is_compared_with(tmp_path, variant, match):
    with pytest.raises(ConfigError, match=match.replace(".", r"\.")):
        Study(from_dict(StudyConfig, {"recipe": NOISYCAP, "output_dir": str(tmp_path), "seeds": [0],
                                      "variants": {"rankdpo": {}, "grpo": variant}}))


def test_the_study_command_line_changes_the_eval_section_key_by_key(tmp_path):
    """`fastpref study X.yaml eval.split=train`: the recipe's eval section with split changed, nothing else."""
    cfg = load_config(StudyConfig, str(ROOT / "configs/studies/grpo-noisycap.yaml"),
                      [f"output_dir={tmp_path / 'study'}", "eval.split=train"])
    plan = Study(cfg).plan
    assert plan.eval["split"] == "train"
    assert (plan.eval["seed_offset"], plan.eval["seeds_per_prompt"], plan.eval["max_prompts_per_category"]) == (2000, 4, 24)
    with pytest.raises(ConfigError, match="eval.split"):  # refused while planning, before anything trains
        Study(load_config(StudyConfig, str(ROOT / "configs/studies/grpo-noisycap.yaml"),
                          [f"output_dir={tmp_path / 'study'}", "eval.split=validation"]))


@pytest.mark.parametrize("path", sorted((ROOT / "configs/studies").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_study_plans(tmp_path, path):
    """Each study file still plans against the recipes as they are now (every variant validated, one base)."""
    study = Study(load_config(StudyConfig, str(path), [f"output_dir={tmp_path / 'study'}"]))
    assert study.plan.counts()["train"] == len(study.cfg.variants) * len(study.cfg.seeds)


def test_a_study_refuses_online_prompts_its_own_evaluation_scores(tmp_path):
    """The study's eval section decides which held-out captions are scored: the recipe's prompts are checked
    against it (the recipe's own eval at 12 per category would not score these at 48)."""
    def study(prompts: str, per_category: int) -> Study:
        return Study(from_dict(StudyConfig, {
            "recipe": str(ROOT / "configs/toy-draftp-v1.yaml"), "output_dir": str(tmp_path), "seeds": [0, 1],
            "variants": {"draft": {"train.online.prompts": prompts}},
            "eval": {"max_prompts_per_category": per_category}}))

    assert study("toy:eval-unscored-48", 48).plan.counts()["train"] == 2
    with pytest.raises(ConfigError, match=r"variants\.draft \(seed 0\): train\.online\.prompts: "
                                          r"'toy:eval-unscored-12' holds \d+ caption\(s\) that MiniGenEval scores at "
                                          r"eval\.max_prompts_per_category = 48"):
        study("toy:eval-unscored-12", 48)
