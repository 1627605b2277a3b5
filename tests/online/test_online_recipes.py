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


def test_online_prompts_that_the_evaluation_scores_are_refused_before_training(tmp_path):
    """Training on the held-out captions MiniGenEval scores would score the policy on its own training prompts."""
    draft = CONFIGS / "toy-draftp-v1.yaml"
    with pytest.raises(ConfigError, match=r"train\.online\.prompts: 'toy:eval' holds 34 caption\(s\) that "
                                          r"MiniGenEval scores at eval\.max_prompts_per_category = 12"):
        build_stages(load_config(RunConfig, draft, ["train.online.prompts=toy:eval"]))
    # the captions it does not score at the eval's own count are fine; at another count some are scored
    build_stages(load_config(RunConfig, draft, ["train.online.prompts=toy:eval-unscored-12"]))
    with pytest.raises(ConfigError, match=r"toy:eval-unscored-48' holds \d+ caption"):
        build_stages(load_config(RunConfig, draft, ["train.online.prompts=toy:eval-unscored-48"]))
    build_stages(load_config(RunConfig, draft, ["train.online.prompts=toy:eval-unscored-48",
                                                "eval.max_prompts_per_category=48"]))
    # a variant's own prompts are checked and named; a file is read like any prompt source
    leaky = tmp_path / "prompts.txt"
    leaky.write_text("a red circle above a red square\na red triangle\n")  # the second is scored (v1's held-out shape)
    with pytest.raises(ConfigError, match=r"variants\.kl0\.1\.online\.prompts: '.*prompts\.txt' holds 1 caption"
                                          r".*'a red triangle'"):
        build_stages(load_config(RunConfig, draft, [f"variants={{kl0.1: {{online.prompts: {leaky}}}}}"]))
    # evaluating the training split instead scores no held-out caption: nothing to refuse
    build_stages(load_config(RunConfig, draft, ["train.online.prompts=toy:eval", "eval.split=train"]))
