"""The `flow_timesteps` config section (cache and train) and the flow timestep record of the cache manifest.

A tiny random SD3 with SD3-Medium's scheduler shift (3.0), cached on the conftest's Syn-Pic images (e_ref for 1
epoch) with the default section and with logit_mean 0.8: the section reaches the bundle's draws (the trainer's t
equal those of a bundle given the same FlowTimestepSampling directly), the manifest records shift and settings,
and a trainer whose draws differ from the cache's runs the reference live under `reference: auto` (warning what
differs) and is refused under `reference: cached` before the model loads. A flow cache without a record (made
before it existed) reads as shift 1.0 / default settings.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from fastpref.config import ConfigError
from fastpref.data.dataset import CachedDataset
from fastpref.data.noise import draw_timesteps_and_noise
from fastpref.models.bundle import FlowTimestepSampling
from fastpref.train.loop import Trainer
from helpers.train import make_config as train_config

SHIFT = 3.0
MEAN = 0.8  # logit_normal's logit_mean: draws clearly other t than the default's 0.0


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory) -> str:
    from fastpref.models import sd3
    from fastpref.toy.tokenizer import build_tokenizer

    config = sd3.tiny_config("tiny")
    config["scheduler"] = {**config["scheduler"], "shift": SHIFT}
    folder = tmp_path_factory.mktemp("sd3-shift3") / "model"
    sd3.build_random(config, build_tokenizer(), seed=0).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def sd3_caches(cached_dataset, sd3_model, tmp_path_factory):
    """settings name -> dataset root cached with the shift-3 SD3 and that flow_timesteps section."""
    import data_helpers as helpers

    from fastpref.data.cache import run_cache

    sections = {"default": {}, "mean": {"flow_timesteps": {"logit_mean": MEAN}}}
    built = {}

    def build(name: str) -> str:
        if name not in built:
            root = tmp_path_factory.mktemp(f"sd3-cache-{name}")
            run_cache(helpers.cache_config(cached_dataset["root"], sd3_model, family="sd3", output=str(root),
                                           flip=False, reference_errors={"epochs": 1, "seed": 11}, **sections[name]))
            built[name] = str(root)
        return built[name]

    return build


def make_config(root, model_path, out, family=None, **extra):
    return train_config({"root": root, "model": model_path}, out, mode="lora", max_steps=2,
                        **{"model.family": family}, **extra)


def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was refused")

    monkeypatch.setattr("fastpref.models.load", refuse)


def test_the_manifest_records_the_shift_and_the_flow_settings(sd3_caches, cached_dataset):
    for name, mean in (("default", 0.0), ("mean", MEAN)):
        config = CachedDataset(sd3_caches(name)).manifest.config
        assert config["flow_timesteps_drawn"] == {"shift": SHIFT, "weighting": "logit_normal", "logit_mean": mean,
                                                  "logit_std": 1.0}
        assert "flow_timesteps" not in config  # recorded as its effect, with the shift
        plan = json.loads((Path(sd3_caches(name)) / "cache" / "plan.json").read_text())
        assert plan["config"]["flow_timesteps_drawn"] == config["flow_timesteps_drawn"]
    # other e_ref (at other t) under other settings
    e_default, e_mean = (CachedDataset(sd3_caches(name)).e_ref for name in ("default", "mean"))
    assert not torch.allclose(torch.as_tensor(e_default), torch.as_tensor(e_mean))
    # families without flow matching record nothing: their plans (hashes) are those they always had
    config = CachedDataset(cached_dataset["root"]).manifest.config
    assert "flow_timesteps_drawn" not in config and "flow_timesteps" not in config


def test_the_config_section_reaches_the_bundle_draws_and_the_same_settings_use_the_cache(sd3_caches, sd3_model,
                                                                                         tmp_path):
    from fastpref.models import sd3

    from test_families import spy_on_steps

    trainer = Trainer(make_config(sd3_caches("mean"), sd3_model, tmp_path, flow_timesteps={"logit_mean": MEAN}))
    assert trainer.reference_mode == "cached"
    assert trainer.bundle.timestep_shift == SHIFT
    assert trainer.bundle.flow_timestep_sampling == FlowTimestepSampling(logit_mean=MEAN)
    records = spy_on_steps(trainer)
    assert trainer.train()["reference"] == "cached"

    direct = sd3.load(sd3_model)  # the same settings given to a bundle directly
    direct.flow_timestep_sampling = FlowTimestepSampling(logit_mean=MEAN)
    default = sd3.load(sd3_model)
    for record in records:
        batch = record["batch"]
        k, shape = batch["latents"].shape[1], tuple(batch["latents"].shape[2:])
        want = draw_timesteps_and_noise(trainer.dataset.noise_seed, record["epoch"], batch["group_ids"], shape, direct)
        got = record["t"].view(-1, k)
        torch.testing.assert_close(got, want.timesteps[:, None].expand_as(got).to(got.dtype), rtol=0, atol=0)
        other = draw_timesteps_and_noise(trainer.dataset.noise_seed, record["epoch"], batch["group_ids"], shape,
                                         default)
        assert (other.timesteps - want.timesteps).abs().min() > 1.0  # logit_mean moved every t
    # step 1: policy == reference, and the cache drew the same t (its e_ref equals the live errors)
    first = records[0]["out"].metrics
    torch.testing.assert_close(first["e_pol"], first["e_ref"], rtol=1e-3, atol=1e-6)


def test_a_trainer_drawing_other_timesteps_runs_the_reference_live_under_auto_and_is_refused_under_cached(
        sd3_caches, sd3_model, tmp_path, monkeypatch):
    root = sd3_caches("default")
    with pytest.warns(UserWarning, match=r"flow_timesteps.logit_mean: cache 0.0, training 0.8.*running the "
                                         r"reference live \(adapters_off\)"):
        trainer = Trainer(make_config(root, sd3_model, tmp_path / "auto", flow_timesteps={"logit_mean": MEAN}))
    assert trainer.reference_mode == "adapters_off"
    assert trainer.bundle.flow_timestep_sampling == FlowTimestepSampling(logit_mean=MEAN)

    no_model_load(monkeypatch)
    with pytest.raises(ConfigError, match=r"reference: cached, but .*flow_timesteps.weighting: cache 'logit_normal', "
                                          r"training 'mode'.*flow_timesteps.logit_mean: cache 0.0, training 'unused'"):
        Trainer(make_config(root, sd3_model, tmp_path / "cached", reference="cached",
                            flow_timesteps={"weighting": "mode"}))


def test_a_cache_without_a_record_reads_as_shift_one_and_default_settings(sd3_caches, sd3_model, tmp_path,
                                                                          monkeypatch):
    """An SD3 cache made before the record existed: the shift-3 model's draws were unshifted then (shift 1.0), so
    its e_ref is not at the draws of today's trainer; a shift-1 model (toy-sd3) still uses such a cache."""
    legacy = tmp_path / "legacy"
    shutil.copytree(sd3_caches("default"), legacy)
    for name in ("manifest.json", "plan.json"):
        path = legacy / "cache" / name
        data = json.loads(path.read_text())
        del data["config"]["flow_timesteps_drawn"]
        path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"timestep shift: cache 1.0, training 3.0.*records no flow timesteps"):
        trainer = Trainer(make_config(str(legacy), sd3_model, tmp_path / "auto"))
    assert trainer.reference_mode == "adapters_off"

    shift_one = tmp_path / "shift-one"
    shutil.copytree(sd3_model, shift_one)
    scheduler = shift_one / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "shift": 1.0}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer = Trainer(make_config(str(legacy), str(shift_one), tmp_path / "toy", reference="cached"))
    assert trainer.reference_mode == "cached" and trainer.bundle.timestep_shift == 1.0

    no_model_load(monkeypatch)
    with pytest.raises(ConfigError, match=r"reference: cached, but .*timestep shift: cache 1.0, training 3.0"):
        Trainer(make_config(str(legacy), sd3_model, tmp_path / "cached", reference="cached"))


def test_a_non_flow_family_refuses_a_flow_timesteps_section(cached_dataset, tmp_path, monkeypatch):
    import data_helpers as helpers

    needle = r"flow_timesteps: set to .*'logit_mean': 0.5.* family 'sd' trains on uniform DDPM timesteps"
    with pytest.raises(ConfigError, match=needle):
        helpers.cache_config(cached_dataset["root"], cached_dataset["model"], flow_timesteps={"logit_mean": 0.5})
    with pytest.raises(ConfigError, match=needle):
        make_config(cached_dataset["root"], cached_dataset["model"], tmp_path, family="sd",
                    flow_timesteps={"logit_mean": 0.5})
    no_model_load(monkeypatch)  # the family read from the dataset: refused before the model loads
    with pytest.raises(ConfigError, match=needle):
        Trainer(make_config(cached_dataset["root"], cached_dataset["model"], tmp_path,
                            flow_timesteps={"logit_mean": 0.5}))
    # the defaults, spelled out, are fine (what a recipe shared by several families may carry)
    make_config(cached_dataset["root"], cached_dataset["model"], tmp_path, family="sd",
                flow_timesteps={"weighting": "logit_normal"})


def test_the_flow_timesteps_section_names_bad_keys_and_allowed_values(cached_dataset, tmp_path):
    cases = {
        "weighting": ({"weighting": "cosmap"},
                      r"flow_timesteps.weighting: 'cosmap' is not one of \['logit_normal', 'mode', 'uniform'\]"),
        "logit_std": ({"logit_std": 0}, r"flow_timesteps.logit_std: must be > 0"),
        "ignored": ({"weighting": "uniform", "mode_scale": 1.0},
                    r"flow_timesteps.mode_scale: 1.0 is read by weighting: mode only.*weighting: uniform"),
        "unknown": ({"shift": 3.0}, r"flow_timesteps.shift: unknown key"),
    }
    for section, needle in cases.values():
        with pytest.raises(ConfigError, match=needle):
            make_config(cached_dataset["root"], cached_dataset["model"], tmp_path, flow_timesteps=section)
