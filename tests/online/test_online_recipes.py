"""The online recipes validate, build no data stage, and carry the reference code's values they cite."""

from pathlib import Path

import pytest

from fastpref.config import ConfigError, load_config
from fastpref.pipeline import RunConfig, build_stages

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name, beta, reward", [("sd3-grpo-geneval", 0.04, "clipscore"),
                                                ("sd3-grpo-pickscore", 0.01, "pickscore")])
def test_sd3_grpo_recipes_carry_flow_grpos_values(name, beta, reward):
    text = (CONFIGS / f"{name}.yaml").read_text()
    assert "arXiv:2505.05470" in text and "yifan123/flow_grpo" in text
    cfg = load_config(RunConfig, CONFIGS / f"{name}.yaml")
    train = build_stages(cfg).trains["main"]
    online, grpo = train.online, train.online.grpo
    assert train.model.path == "stabilityai/stable-diffusion-3.5-medium" and train.mode == "lora"
    assert (train.lora.rank, train.lora.alpha) == (32, 64)
    assert (online.num_steps, train.validation.num_inference_steps) == (10, 40)  # denoising reduction
    assert online.guidance_scale == train.validation.guidance_scale == 4.5
    assert (online.resolution, online.group_size, online.prompts_per_rollout) == (512, 24, 48)
    assert online.noise_level == 0.7 and online.reward == {reward: 1.0}
    assert (grpo.kl_beta, grpo.clip_range, grpo.adv_clip_max, grpo.timestep_fraction) == (beta, 1e-4, 5.0, 0.99)
    assert grpo.global_std and grpo.stat_tracking and grpo.ema and grpo.cfg and grpo.steps_per_rollout == 2
    assert (train.lr, train.weight_decay, train.max_grad_norm) == (3e-4, 1e-4, 1.0)
    assert train.checkpoint_every % grpo.steps_per_rollout == 0 and train.max_steps % grpo.steps_per_rollout == 0


@pytest.mark.parametrize("name, model, world", [("toy-grpo", "toy-sd3-v2", "v2"), ("toy-grpo-sd", "toy-sd-v2", "v2")])
def test_toy_grpo_recipes_reward_the_verifier_on_training_prompts(name, model, world):
    cfg = load_config(RunConfig, CONFIGS / f"{name}.yaml")
    stages = build_stages(cfg)
    train = stages.trains["main"]
    assert stages.cache is None and train.model.path == model and train.objective.name == "grpo"
    prompts = "toy:train" if world == "v1" else f"toy-{world}:train"
    assert train.online.prompts.startswith(prompts) and train.online.reward == {"verifier": 1.0}
    assert stages.world == cfg.eval.world == world and train.online.resolve_toy_world(model) == world
    assert cfg.eval.steps >= train.online.num_steps


def test_online_recipe_refuses_data_stages():
    with pytest.raises(ConfigError, match="cache: an online recipe"):
        load_config(RunConfig, CONFIGS / "toy-grpo.yaml", ["cache={family: sd, model: toy-sd}"])
    with pytest.raises(ConfigError, match="variants.dpo.objective.name"):
        load_config(RunConfig, CONFIGS / "toy-grpo.yaml", ['variants={dpo: {objective.name: dpo}}'])
