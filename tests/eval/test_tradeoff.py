"""DRaFT+'s reward-diversity trade-off (fastpref/eval/tradeoff.py): the matched-reward reading of DRaFT's path
against hand-made numbers with known answers, the reward seed folds, the per-prompt scores of real renders, the
report section and plot, and the recipe keys that choose the checkpoints on DRaFT's path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fastpref.config import ConfigError, load_config
from fastpref.eval import diversity, tradeoff
from fastpref.eval.minigeneval import evaluate, world_generate

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def scores(reward: np.ndarray, shapeclip: np.ndarray, seeds: int = 2) -> tradeoff.PromptScores:
    """Per-prompt reward (every seed the same) and diversity."""
    return tradeoff.PromptScores(
        captions=[f"prompt {p}" for p in range(len(reward))],
        rewards=[[float(r)] * seeds for r in reward],
        folds=[list(range(seeds)) for _ in reward],
        diversity={"shapeclip": list(map(float, shapeclip)), "pixel": list(map(float, shapeclip))},
    )


def world():
    """DRaFT's path base -> draft, both reward and diversity noisy per prompt; DRaFT+ models above, below and
    beyond it."""
    rng = np.random.default_rng(0)
    prompts = 40
    base_reward = 0.6 + 0.05 * rng.standard_normal(prompts)
    base_div = 0.3 + 0.02 * rng.standard_normal(prompts)
    out = {"base": scores(base_reward, base_div), "draft": scores(base_reward + 0.1, base_div - 0.1)}
    # halfway along the reward: DRaFT's path has diversity base - 0.05 there
    out["above"] = scores(base_reward + 0.05, base_div - 0.02)  # +0.03 over the path
    out["below"] = scores(base_reward + 0.05, base_div - 0.08)  # -0.03
    out["same"] = scores(base_reward + 0.05, base_div - 0.05 + 0.01 * rng.standard_normal(prompts))
    out["beyond"] = scores(base_reward + 0.2, base_div)  # more reward than DRaFT ever reached
    return out


def test_matched_reward_reads_drafts_path_at_the_candidates_reward():
    models = world()
    above = tradeoff.matched_reward(models, ["base", "draft"], "above")
    assert above["difference"] == pytest.approx(0.03, abs=1e-9)
    assert above["curve_diversity"] == pytest.approx(np.mean(models["base"].diversity["shapeclip"]) - 0.05)
    assert above["low"] > 0 and above["verdict"].startswith("more diversity than DRaFT")
    assert above["matched_draws"] == above["n_boot"] == 2000
    below = tradeoff.matched_reward(models, ["base", "draft"], "below")
    assert below["difference"] == pytest.approx(-0.03, abs=1e-9) and below["verdict"].startswith("less diversity")
    same = tradeoff.matched_reward(models, ["base", "draft"], "same")
    assert same["low"] < 0 < same["high"] and same["verdict"].startswith("not shown")
    beyond = tradeoff.matched_reward(models, ["base", "draft"], "beyond")
    assert np.isnan(beyond["difference"]) and beyond["verdict"].startswith("no matched point")
    with pytest.raises(ValueError, match="needs >= 2 models"):
        tradeoff.matched_reward(models, ["base"], "above")


def test_the_path_is_read_piecewise_and_in_order_of_reward():
    # a path that bends: base (0.5, 0.3) -> mid (0.7, 0.28) -> end (0.6, 0.1) sorted by reward: 0.5, 0.6, 0.7
    one = lambda r, d: scores(np.full(4, r), np.full(4, d))  # noqa: E731
    models = {"base": one(0.5, 0.3), "mid": one(0.7, 0.28), "end": one(0.6, 0.1), "plus": one(0.65, 0.2)}
    m = tradeoff.matched_reward(models, ["base", "mid", "end"], "plus")
    assert m["curve_diversity"] == pytest.approx((0.1 + 0.28) / 2) and m["difference"] == pytest.approx(0.01)


def test_reward_seed_scores_are_per_fold_and_prompt_weighted():
    s = tradeoff.PromptScores(captions=["a", "b"], rewards=[[0.1, 0.3, 0.5, 0.7], [1.0, 0.0]],
                              folds=[[0, 1, 0, 1], [0, 1]], diversity={"shapeclip": [0, 0], "pixel": [0, 0]})
    assert s.reward_seed_scores() == pytest.approx([(0.3 + 1.0) / 2, (0.5 + 0.0) / 2])
    assert s.reward() == pytest.approx((0.4 + 0.5) / 2)
    assert s.reward_seed_spread() == pytest.approx(np.std([0.65, 0.25], ddof=1))


def test_prompt_scores_of_renders_agree_with_the_diversity_module():
    result = evaluate(world_generate, seeds_per_prompt=3, max_prompts_per_category=1, min_images_per_category=3,
                      seed_offset=7)
    s = tradeoff.prompt_scores(result)
    captions = [x.caption for x in result.samples]
    assert s.captions == list(dict.fromkeys(captions))
    assert [len(r) for r in s.rewards] == [captions.count(c) for c in s.captions]
    assert all(sorted(f) == list(range(3)) for f in s.folds)
    whole = diversity.toy_diversity(result.images, captions)
    assert np.mean(s.diversity["pixel"]) == pytest.approx(whole["pixel"], rel=1e-9)
    assert np.mean(s.diversity["shapeclip"]) == pytest.approx(whole["shapeclip"], rel=1e-5)
    one_seed = evaluate(world_generate, seeds_per_prompt=1, max_prompts_per_category=1, min_images_per_category=1)
    with pytest.raises(ValueError, match="seeds_per_prompt >= 2"):
        tradeoff.prompt_scores(one_seed)


def test_prompt_scores_use_the_training_rewards_setting():
    from fastpref.rewards.toy import ShapeCLIPReward

    result = evaluate(world_generate, seeds_per_prompt=2, max_prompts_per_category=2, min_images_per_category=2,
                      seed_offset=3)
    captions = [x.caption for x in result.samples]
    pixels = diversity._pixels(result.images)
    for contrastive in (False, True):
        s = tradeoff.prompt_scores(result, contrastive=contrastive)
        expected = ShapeCLIPReward(contrastive=contrastive)(pixels, captions).numpy()
        flat = [r for rewards in s.rewards for r in rewards]  # rows in first-seen caption order
        order = [i for c in s.captions for i, x in enumerate(captions) if x == c]
        np.testing.assert_allclose(flat, expected[order], rtol=1e-5, atol=1e-6)
        # renders of the truth: the cosine sits near 0.8, the probability against the variants near 1 (position
        # captions excepted: ShapeCLIP reads relations poorly and spreads their probability over the variants)
        assert (0.5 < np.median(flat) < 0.95) if not contrastive else np.median(flat) > 0.95


def test_measure_report_lines_and_plot(tmp_path, monkeypatch):
    models = world()
    seen = []
    monkeypatch.setattr(tradeoff, "prompt_scores", lambda result, *setting: seen.append(setting[1:]) or models[result])
    minigeneval = {name: {"overall": 0.5, "prompt_mean": 0.4} for name in models}
    labels = {"base": {"kl_coeff": None, "step": 0}, "draft": {"kl_coeff": 0.0, "step": 60},
              "above": {"kl_coeff": 0.5, "step": 60}, "beyond": {"kl_coeff": 1.0, "step": 60}}
    section = tradeoff.measure({name: name for name in models}, minigeneval, ["base", "draft"], ["above", "beyond"],
                               labels)
    assert list(section["models"]) == ["base", "draft", "above", "beyond"]
    draft = section["models"]["draft"]
    assert draft["reward_vs_base"]["difference"] == pytest.approx(0.1) and draft["reward_vs_base"]["low"] > 0
    assert "reward_vs_base" not in section["models"]["base"]
    lines = tradeoff.report_lines(section)
    text = "\n".join(lines)
    assert "| draft | 0 | 60 |" in text and "| base | - | 0 |" in text
    assert "- draft: +0.100 [+0.100, +0.100] (no seed spread): higher" in lines  # every seed fold of the base equal
    assert any(line.startswith("- above (shapeclip):") and line.endswith("interval above zero") for line in lines)
    assert any(line.startswith("- beyond (shapeclip):") and "no matched point" in line for line in lines)
    assert "![reward vs diversity](tradeoff.png)" in lines
    assert set(seen) == {(False, "v1")} and "| ShapeCLIP reward |" in text
    contrastive = tradeoff.measure({name: name for name in models}, minigeneval, ["base", "draft"], ["above"], labels,
                                   contrastive=True, world_name="v2")
    assert seen[-1] == (True, "v2") and contrastive["reward"] == "shapeclip-contrastive"
    assert "| ShapeCLIP contrastive reward |" in "\n".join(tradeoff.report_lines(contrastive))
    pytest.importorskip("matplotlib")
    from PIL import Image

    path = tradeoff.save_plot(section, tmp_path / "tradeoff.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and np.asarray(image.convert("RGB")).std() > 10


def test_main_checkpoints_must_be_steps_the_main_training_saves_and_keeps():
    from fastpref.pipeline import RunConfig, build_stages

    recipe = CONFIGS / "toy-draftp.yaml"

    def stages(*overrides):
        return build_stages(load_config(RunConfig, recipe, list(overrides)))

    with pytest.raises(ConfigError, match=r"eval.main_checkpoints: 7 is not a step the main training saves"):
        stages("eval.main_checkpoints=[7]", "train.checkpoint_every=5", "train.max_steps=20")
    with pytest.raises(ConfigError, match=r"eval.main_checkpoints: 20 is not a step"):
        stages("eval.main_checkpoints=[20]", "train.checkpoint_every=5", "train.max_steps=20")
    with pytest.raises(ConfigError, match=r"train.keep_checkpoints: 2 would delete.*saves 4 from step 5"):
        stages("eval.main_checkpoints=[5, 10]", "train.checkpoint_every=5", "train.max_steps=20",
               "train.keep_checkpoints=2")
    with pytest.raises(ConfigError, match="lists a step twice"):
        stages("eval.main_checkpoints=[5, 5]", "train.checkpoint_every=5", "train.max_steps=20",
               "train.keep_checkpoints=4")
    stages("eval.main_checkpoints=[5, 10]", "train.checkpoint_every=5", "train.max_steps=20",
           "train.keep_checkpoints=4")


def test_a_draft_recipe_with_the_contrastive_reward_is_scored_with_it():
    from fastpref.pipeline import RunConfig, build_stages

    for overrides, expected in (([], False), (["train.online.reward_kwargs={shapeclip: {contrastive: true}}"], True)):
        stages = build_stages(load_config(RunConfig, str(CONFIGS / "toy-draftp.yaml"), overrides))
        assert [tradeoff.trains_on_contrastive(t.online) for t in stages.trains.values()] == [expected] * 4
