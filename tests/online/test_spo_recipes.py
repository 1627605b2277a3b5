"""The SPO recipes: SPO's values as cited, and each recipe run end to end (`fastpref run`'s training) on a tiny
random model of its family, shrunk by overrides only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fastpref.config import load_config  # noqa: E402
from fastpref.pipeline import RunConfig, build_stages  # noqa: E402
from fastpref.rewards.spm_train import SPMTrainConfig  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent.parent / "configs"


def main_train(name: str, overrides=()):
    run = load_config(RunConfig, CONFIGS / f"{name}.yaml", list(overrides))
    assert run.is_online
    return build_stages(run).trains[run.main_variant]


def test_sd15_and_sdxl_recipes_carry_spo_values():
    sd15, sdxl = main_train("sd15-spo"), main_train("sdxl-spo")
    for train in (sd15, sdxl):
        assert train.objective.name == "spo" and train.mode == "lora"
        assert train.online.num_steps == 20 and train.online.guidance_scale == 5.0 and train.online.eta == 1.0
        assert train.online.spo.divert_start_step == 4 and train.online.spo.beta == 10.0
        assert train.online.spo.clip_eps == 0.1 and train.weight_decay == 1e-4 and train.max_grad_norm == 1.0
        assert train.online.reward == {"spm": 1.0} and train.online.spo.cfg
    assert sd15.lora.rank == 4 and sd15.lr == 6e-5 and sd15.online.spo.num_candidates == 4
    assert sd15.online.spo.threshold == 0.3 and sd15.online.spo.train_batch_size == 10
    assert sd15.online.prompts_per_rollout == 40  # 10 per GPU x 4 GPUs
    # SPO's rule: one optimizer step per train_batch_size x GPUs (x accumulation) kept pairs
    assert sd15.online.spo.pairs_per_step == 10 * 4 and sdxl.online.spo.pairs_per_step == 2 * 4 * 2
    assert sd15.online.spo.steps_per_rollout == sdxl.online.spo.steps_per_rollout == 1
    assert sdxl.lora.rank == 64 and sdxl.lr == 1e-5 and sdxl.online.spo.num_candidates == 2
    assert sdxl.online.spo.num_inner_step == 3 and sdxl.online.spo.threshold == 0.4
    assert sdxl.online.spo.train_batch_size == 2
    for name in ("sd15-spo", "sdxl-spo"):
        text = (CONFIGS / f"{name}.yaml").read_text()
        assert "RockeyCoss/SPO" in text and "arXiv:2406.04314" in text


def test_spm_recipes_load():
    for name in ("toy-spm", "sd15-spm", "sdxl-spm"):
        config = load_config(SPMTrainConfig, CONFIGS / "spm" / f"{name}.yaml")
        assert config.diffusion.guidance_scale == 5.0 and config.eval_timesteps == [0, 251, 501, 701, 951]
    sd15 = load_config(SPMTrainConfig, CONFIGS / "spm" / "sd15-spm.yaml")
    assert sd15.init.model == "yuvalkirstain/PickScore_v1" and sd15.lr == 1e-6 and sd15.steps == 4000
    assert sd15.lr_warmup_steps == 500


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fastpref.models import sd, sdxl
    from fastpref.rewards.spm import StepAwareModel
    from fastpref.toy.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("spo-recipes")
    tokenizer = build_tokenizer()
    sd.build_random(sd.tiny_config("tiny"), tokenizer, seed=0).save_pretrained(root / "sd")
    sdxl.build_random(sdxl.tiny_config("tiny"), tokenizer, seed=0).save_pretrained(root / "sdxl")
    StepAwareModel.from_base("shapeclip").save_pretrained(root / "spm")
    return {name: str(root / name) for name in ("sd", "sdxl", "spm")}


@pytest.mark.parametrize("name, family", [("sd15-spo", "sd"), ("sdxl-spo", "sdxl"), ("toy-spo", "sd")])
def test_recipe_runs_end_to_end_on_a_tiny_model_of_its_family(tiny, tmp_path, name, family):
    from fastpref.train.loop import train

    overrides = [
        f"train.model.path={tiny[family]}", f"output_dir={tmp_path}", "train.parallel=none", "train.device=cpu",
        "train.speed.mixed_precision='no'", "train.online.prompts=toy:train", "train.online.prompt_limit=8",
        "train.online.prompts_per_rollout=2", "train.online.num_steps=6", "train.online.resolution=null",
        "train.online.spo.divert_start_step=2", "train.online.spo.steps_per_rollout=1", "train.max_steps=2",
        "train.checkpoint_every=1", "train.validation.every=0", "train.progress=false", "train.tensorboard=false",
        f"train.online.reward_paths={{spm: {tiny['spm']}}}", "train.online.spo.threshold=0.0",
    ]
    if name == "sdxl-spo":
        overrides.append("train.speed.gradient_checkpointing=false")
    cfg = main_train(name, overrides)
    train(cfg)
    rows = [json.loads(line) for line in Path(cfg.output_dir, "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "spo_pairs" in row]
    assert len(rows) == 2 and all(row["spo_candidates"] > 0 for row in rows)
    assert any(math.isfinite(row.get("loss", math.nan)) for row in rows)
