"""One recipe, one toy world (fastpref.pipeline.recipe_world): the world comes from the recipe's toy models; eval.world
and the toy rewards follow it; a prompt source, eval.world, reward or model of another world is refused naming the
keys. Model folders here are stand-ins holding only the metrics.json toy pretraining writes (no weights load)."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from fastpref.config import ConfigError, from_dict
from fastpref.pipeline import RunConfig, build_stages

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _recipe(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def _stand_in_model(folder: Path, world: str, family: str = "toy-sd") -> str:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"family": family, "world": world}))
    return str(folder)


def _v1_recipe() -> dict:
    """configs/toy-rankdpo.yaml (world v2) moved back to the shipped v1 models and prompts, as it was before v2."""
    recipe = _recipe("toy-rankdpo")
    for generator in recipe["synth"]["generators"]:
        generator["model"] = generator["model"].removesuffix("-v2")
    recipe["cache"]["model"] = recipe["cache"]["model"].removesuffix("-v2")
    recipe["synth"]["prompts"]["path"] = "toy:train-balanced"
    return recipe


def test_the_demo_recipe_is_world_v2():
    stages = _stages(_recipe("toy-rankdpo"))
    assert stages.world == "v2"


@pytest.fixture
def v2_recipe(tmp_path) -> dict:
    """configs/toy-rankdpo.yaml with every model and prompt source moved to world v2."""
    recipe = _recipe("toy-rankdpo")
    for i, generator in enumerate(recipe["synth"]["generators"]):
        generator["model"] = _stand_in_model(tmp_path / f"gen{i}", "v2")
    recipe["cache"]["model"] = recipe["synth"]["generators"][0]["model"]
    recipe["synth"]["prompts"]["path"] = "toy-v2:train-balanced"
    return recipe


def _stages(recipe: dict):
    return build_stages(from_dict(RunConfig, copy.deepcopy(recipe)))


def test_a_v1_recipe_stays_v1_and_its_label_config_unchanged():
    recipe = _v1_recipe()
    cfg = from_dict(RunConfig, copy.deepcopy(recipe))
    stages = build_stages(cfg)
    assert stages.world == "v1" and cfg.eval.world == "v1"
    assert [spec.kwargs for spec in stages.label.rewards] == [r.get("kwargs", {}) for r in recipe["label"]["rewards"]]


def test_a_v2_recipe_takes_its_world_from_the_models(v2_recipe):
    cfg = from_dict(RunConfig, copy.deepcopy(v2_recipe))
    stages = build_stages(cfg)
    assert stages.world == "v2" and cfg.eval.world == "v2"
    assert {spec.name: spec.kwargs["world"] for spec in stages.label.rewards} == {
        "verifier": "v2", "shapeclip": "v2", "quality": "v2"}


def test_v1_prompts_with_v2_models_are_refused_naming_both_keys(v2_recipe):
    v2_recipe["synth"]["prompts"]["path"] = "toy:train-balanced"
    with pytest.raises(ConfigError, match=r"synth\.prompts\.path: 'toy:train-balanced' is toy world v1.*"
                                          r"synth\.generators\[0\]\.model .*world v2.*use toy-v2:train-balanced"):
        _stages(v2_recipe)


def test_v2_prompts_with_the_v1_models_are_refused():
    recipe = _v1_recipe()
    recipe["synth"]["prompts"]["path"] = "toy-v2:train-balanced"
    with pytest.raises(ConfigError, match=r"synth\.prompts\.path: .* world v2, but the recipe's world is v1 from "
                                          r"synth\.generators\[0\]\.model \('toy-sd'"):
        _stages(recipe)


def test_an_eval_or_reward_of_another_world_is_refused(v2_recipe):
    recipe = _v1_recipe()
    recipe["eval"]["world"] = "v2"
    with pytest.raises(ConfigError, match=r"eval\.world: 'v2', but the recipe's world is v1"):
        _stages(recipe)
    v2_recipe["label"]["rewards"][1]["kwargs"] = {"world": "v1"}
    with pytest.raises(ConfigError, match=r"label\.rewards\[1\]\.kwargs\.world: 'v1', but the recipe's world is v2"):
        _stages(v2_recipe)


def test_models_of_two_worlds_are_refused(v2_recipe, tmp_path):
    v2_recipe["synth"]["generators"][2]["model"] = "toy-sdxl"  # the shipped v1 model
    with pytest.raises(ConfigError, match=r"synth\.generators\[2\]\.model: 'toy-sdxl' is toy world v1"):
        _stages(v2_recipe)
    v2_recipe["synth"]["generators"][2]["model"] = v2_recipe["cache"]["model"]
    v2_recipe["variants"]["dpo"]["model.path"] = _stand_in_model(tmp_path / "old", "v1")
    with pytest.raises(ConfigError, match=r"variants\.dpo\.model\.path: .* is toy world v1"):
        _stages(v2_recipe)


def test_an_online_recipe_follows_its_model_and_refuses_v1_prompts(tmp_path):
    recipe = _recipe("toy-grpo")
    recipe["train"]["model"]["path"] = _stand_in_model(tmp_path / "sd3", "v2", "toy-sd3")
    recipe["train"]["online"]["prompts"] = "toy:train-balanced"
    with pytest.raises(ConfigError, match=r"train\.online\.prompts: 'toy:train-balanced' is toy world v1"):
        _stages(recipe)
    recipe["train"]["online"]["prompts"] = "toy-v2:train-balanced"
    stages = _stages(recipe)  # its online rewards are built in the recipe's world (tests/online/test_toy_world_rewards)
    assert stages.world == "v2" and stages.main.online.toy_world == "v2"
