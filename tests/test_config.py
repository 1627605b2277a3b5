from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from fastpref.config import ConfigError, load_config, to_dict


@dataclass
class Inner:
    name: Literal["dpo", "rankdpo"] = "rankdpo"
    beta: float = 2500.0


@dataclass
class Outer:
    steps: int = 10
    tags: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    inner: Inner = field(default_factory=Inner)
    flag: bool = False

    def validate(self):
        if self.steps <= 0:
            raise ConfigError(f"steps: must be > 0, got {self.steps}")


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "steps: 5\ninner:\n  name: dpo\n")
    cfg = load_config(Outer, path, ["inner.beta=1e3", "tags=[a, b]", "flag=true", "seed=3"])
    assert cfg.steps == 5 and cfg.inner.name == "dpo" and cfg.inner.beta == 1000.0
    assert cfg.tags == ["a", "b"] and cfg.flag is True and cfg.seed == 3
    assert to_dict(cfg)["inner"] == {"name": "dpo", "beta": 1000.0}


@pytest.mark.parametrize(
    "text, overrides, needle",
    [
        ("inner:\n  name: rankdp\n", [], "inner.name: 'rankdp' is not one of ['dpo', 'rankdpo']"),
        ("stepz: 3\n", [], "stepz: unknown key"),
        ("steps: many\n", [], "steps: expected an integer"),
        ("", ["inner.beta=high"], "inner.beta: expected a number"),
        ("", ["steps=0"], "steps: must be > 0"),
        ("steps: [1\n", [], "invalid YAML"),
    ],
)
def test_errors_name_file_and_key(tmp_path, text, overrides, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(Outer, path, overrides)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read config"):
        load_config(Outer, tmp_path / "nope.yaml")


# --------------------------------------------------------------------------- the train config (fastpref.train.config)


def train_config(**overrides):
    from fastpref.config import apply_overrides, from_dict
    from fastpref.train.config import TrainConfig

    return from_dict(TrainConfig, apply_overrides({"data": {"root": "/nowhere"}},
                                                  [f"{k}={v}" for k, v in overrides.items()]))


@pytest.mark.parametrize("objective, beta", [("rankdpo", 2500.0), ("dpo", 2500.0), ("cpo", 2500.0), ("kto", 1000.0),
                                             ("sft", None), ("mapo", None)])
def test_beta_defaults_per_objective_and_the_saved_config_shows_it(tmp_path, objective, beta):
    """Diffusion-KTO's beta is 1000 (ops.kto_loss too), Diffusion-DPO's 2500 in this convention; mapo has its own
    mapo_beta and sft none. The run's saved config.yaml holds the value used."""
    import yaml

    from fastpref.config import save_config

    cfg = train_config(**{"objective.name": objective})
    assert cfg.objective.beta == beta
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["objective"]["beta"] == beta
    assert train_config(**{"objective.name": objective, "objective.beta": 123.0}).objective.beta == 123.0


def test_loss_backend_and_fused_loss_never_contradict_silently():
    assert train_config(**{"speed.fused_loss": "false"}).loss_backend == "reference"  # auto resolved by the other
    assert train_config(**{"speed.fused_loss": "false", "loss_backend": "reference"}).loss_backend == "reference"
    assert train_config(loss_backend="triton").loss_backend == "triton"
    for backend in ("triton", "native"):
        with pytest.raises(ConfigError, match=rf"loss_backend: '{backend}' contradicts speed.fused_loss: false"):
            train_config(**{"speed.fused_loss": "false", "loss_backend": backend})


def test_toy_dpo_trains_on_the_data_of_toy_rankdpo():
    """The recipe says it uses toy-rankdpo's data: the same prompts, generators, rewards and data root."""
    from pathlib import Path

    from fastpref.pipeline import RunConfig, build_stages

    configs = Path(__file__).resolve().parents[1] / "configs"
    dpo, rankdpo = (build_stages(load_config(RunConfig, configs / f"{name}.yaml")) for name in ("toy-dpo", "toy-rankdpo"))
    assert dpo.synth == rankdpo.synth and dpo.label == rankdpo.label
    assert dpo.synth.output == rankdpo.synth.output == dpo.cache.input
    assert dpo.trains["dpo"].objective.name == "dpo"
