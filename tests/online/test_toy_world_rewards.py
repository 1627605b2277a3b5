"""The online methods' toy rewards speak the run's toy world: WeightedReward builds the verifier / ShapeCLIP / quality
of online.toy_world, the trainer takes it from the model (fastpref.models.model_world), `fastpref run` from the
recipe (fastpref.pipeline.recipe_world), and a mismatch is refused naming the key."""

import copy
import json

import numpy as np
import pytest
import torch

from fastpref.config import ConfigError, from_dict
from fastpref.online.config import OnlineConfig
from fastpref.online.rollout import WeightedReward
from fastpref.pipeline import RunConfig, build_stages
from fastpref.toy import world


def _v2_only_scenes(count: int = 6) -> tuple[torch.Tensor, list[str]]:
    """Ground-truth renders of v2 training captions in colors v1 does not have (orange, purple, cyan, white)."""
    rng = np.random.default_rng(0)
    images, captions = [], []
    v1_colors = set(world.get_world("v1").colors)
    while len(captions) < count:
        spec = world.sample_spec(rng, "train", "v2")
        if spec.category == "colors" and not any(g.color in v1_colors for g in spec.groups):
            images.append(world.render(spec, rng))
            captions.append(spec.caption)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return pixels, captions


def test_weighted_reward_scores_v2_scenes_in_v2():
    pixels, captions = _v2_only_scenes()
    reward = WeightedReward({"verifier": 1.0, "quality": 0.5}, toy_world="v2")
    assert torch.equal(reward.last_terms.get("verifier", torch.ones(0)), torch.ones(0))  # nothing scored yet
    total = reward(pixels, captions)
    assert torch.equal(reward.last_terms["verifier"], torch.ones(len(captions)))
    v1_quality = WeightedReward({"quality": 1.0})(pixels, captions)
    # v1's palette counts orange / purple / cyan / white as off-palette: the same clean renders score lower in v1
    assert (reward.last_terms["quality"] > v1_quality).all()
    assert torch.allclose(total, 1.0 + 0.5 * reward.last_terms["quality"])


def test_the_v1_verifier_cannot_read_v2_captions():
    pixels, captions = _v2_only_scenes(2)
    with pytest.raises(ValueError):
        WeightedReward({"verifier": 1.0})(pixels, captions)


def test_the_trainer_world_comes_from_the_model():
    online = OnlineConfig(reward={"verifier": 1.0})
    assert online.resolve_toy_world("toy-sd-v2") == "v2"
    assert online.resolve_toy_world("toy-sd") == "v1"
    assert OnlineConfig(toy_world="v2").resolve_toy_world("/no/such/real-checkpoint") == "v2"


def test_a_toy_world_other_than_the_models_is_refused():
    with pytest.raises(ConfigError, match=r"online\.toy_world: 'v1', but the model 'toy-sd-v2' is toy world v2"):
        OnlineConfig(toy_world="v1").resolve_toy_world("toy-sd-v2")
    with pytest.raises(ConfigError, match=r"toy_world: 'v3' is not one of"):
        OnlineConfig(toy_world="v3").validate()


def test_the_spm_reward_follows_the_world():
    """build_reward("spm") loads the SPM shipped for the run's world: v2's reads v2-only captions and ranks
    toy-sd-v2's predictions (its recorded training config), v1's stays the default."""
    from fastpref.rewards import build_reward
    from fastpref.rewards.spm import SHIPPED_TOY_SPM_BY_WORLD

    v2 = build_reward("spm", world="v2")
    config = json.loads((SHIPPED_TOY_SPM_BY_WORLD["v2"] / "spm_config.json").read_text())
    assert config["diffusion_model"] == "toy-sd-v2"
    pixels, captions = _v2_only_scenes(2)
    scores = v2(pixels, captions, timesteps=0)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    with pytest.raises(Exception):  # v1's vocabulary has no v2-only word
        build_reward("spm")(pixels, captions, timesteps=0)
    reward = WeightedReward({"spm": 1.0}, toy_world="v2")
    assert torch.equal(reward.rewards["spm"](pixels, captions), scores)
    assert OnlineConfig(reward={"spm": 1.0}).resolve_toy_world("toy-sd-v2") == "v2"


def _grpo_recipe(model: str, prompts: str) -> dict:
    import yaml
    from pathlib import Path

    recipe = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "toy-grpo.yaml").read_text())
    recipe["train"]["model"]["path"] = model
    recipe["train"]["online"]["prompts"] = prompts
    return recipe


def test_run_gives_a_v2_online_recipe_its_world():
    cfg = from_dict(RunConfig, copy.deepcopy(_grpo_recipe("toy-sd3-v2", "toy-v2:train-balanced")))
    stages = build_stages(cfg)
    assert stages.world == "v2" and cfg.eval.world == "v2"
    assert {train.online.toy_world for train in stages.trains.values()} == {"v2"}


def test_run_leaves_a_v1_online_recipe_as_it_was():
    cfg = from_dict(RunConfig, copy.deepcopy(_grpo_recipe("toy-sd3", "toy:train-balanced")))
    stages = build_stages(cfg)
    assert stages.world == "v1" and {train.online.toy_world for train in stages.trains.values()} == {None}


def test_run_refuses_an_online_toy_world_other_than_the_recipes():
    recipe = _grpo_recipe("toy-sd3-v2", "toy-v2:train-balanced")
    recipe["train"]["online"]["toy_world"] = "v1"
    with pytest.raises(ConfigError, match=r"train\.online\.toy_world: 'v1'.*recipe's world is v2"):
        build_stages(from_dict(RunConfig, recipe))


def test_an_online_trainer_on_a_v2_model_scores_in_v2(tmp_path):
    """The shipped toy-sd-v2 under GRPO: the trainer's rewards are v2's (the verifier reads v2 captions), and one
    step trains and reports the verifier term on v2 prompts."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from helpers.train import train_config

    from fastpref.train.online import OnlineTrainer

    cfg = train_config({
        "model": {"path": "toy-sd-v2"}, "objective": {"name": "grpo"}, "output_dir": str(tmp_path), "max_steps": 1,
        "checkpoint_every": 1, "progress": False, "tensorboard": False, "loss_backend": "reference",
        "online": {"prompts": "toy-v2:train", "prompts_per_rollout": 2, "group_size": 2, "num_steps": 2,
                   "reward": {"verifier": 1.0}, "grpo": {"train_batch_size": 4}}})
    trainer = OnlineTrainer(cfg)
    verifier = trainer.reward.rewards["verifier"]
    assert trainer.reward.toy_world == "v2" and verifier.world == "v2"
    epoch, batch = next(trainer.batches())
    assert set(trainer.reward.last_terms) == {"verifier"} and len(trainer.reward.last_terms["verifier"]) == 4


def test_reward_kwargs_reach_the_reward():
    """online.reward_kwargs: the partial-credit verifier scores the fraction of its checks (a denser GRPO signal)."""
    rng = np.random.default_rng(1)
    specs = []
    while len(specs) < 4:
        spec = world.sample_spec(rng, "train", "v2")
        if spec.category == "two_objects":
            specs.append(spec)
    pixels = torch.from_numpy(np.stack([world.render(spec, rng) for spec in specs])).permute(0, 3, 1, 2).float() / 255
    captions = [spec.caption for spec in specs]
    # every image under a caption with one of its two objects changed: some checks pass, not all
    wrong = [world.one_attribute_variants(spec)[0].caption for spec in specs]
    partial = WeightedReward({"verifier": 1.0}, toy_world="v2", kwargs={"verifier": {"partial_credit": True}})
    strict = WeightedReward({"verifier": 1.0}, toy_world="v2")
    assert torch.equal(partial(pixels, captions), torch.ones(4))
    scores = partial(pixels, wrong)
    assert torch.equal(strict(pixels, wrong), torch.zeros(4)) and ((scores > 0) & (scores < 1)).any(), scores
    with pytest.raises(ConfigError, match=r"online\.reward_kwargs\.verifier: .*no_such_option"):
        WeightedReward({"verifier": 1.0}, kwargs={"verifier": {"no_such_option": 1}})


@pytest.mark.parametrize("kwargs, message", [({"quality": {}}, r"reward_kwargs\.quality: not a reward of this run"),
                                             ({"verifier": {"world": "v2"}}, r"reward_kwargs\.verifier\.world: set "
                                                                             r"online\.toy_world"),
                                             ({"verifier": 3}, r"reward_kwargs\.verifier: a mapping")])
def test_bad_reward_kwargs_are_refused_naming_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        OnlineConfig(reward={"verifier": 1.0}, reward_kwargs=kwargs).validate()
