"""Every recipe in configs/ builds and validates all of its stage configs (without loading any weights or data), and
the real-model recipes carry the published hyper-parameters they document."""

import math
from pathlib import Path

import pytest
import yaml

from fastpref.config import ConfigError, load_config
from fastpref.pipeline import RunConfig, build_stages

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
REAL_RECIPES = ("sd15-dpo", "sdxl-rankdpo", "sd3-rankdpo")


def stages_of(name: str, overrides=()):
    return build_stages(load_config(RunConfig, CONFIGS / f"{name}.yaml", list(overrides)))


def effective_batch(train) -> int:
    return train.data.batch_groups * train.grad_accumulation  # one process, as `fastpref run` trains


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates(path):
    stages = build_stages(load_config(RunConfig, path))
    if load_config(RunConfig, path).is_online:  # online recipes (grpo / spo / draft): prompts only, no data stages
        assert stages.synth is None and stages.importer is None and stages.cache is None
        assert all(t.model.path and not t.data.root for t in stages.trains.values())
        return
    assert stages.trains and all(t.data.root for t in stages.trains.values())
    assert (stages.synth is None) == (stages.importer is not None)  # Syn-Pic or an import, never both
    if stages.synth is not None:
        assert stages.synth.group_size >= 2 and stages.label is not None
    for train in stages.trains.values():
        assert train.data.root == stages.cache.output or (stages.cache.output is None
                                                          and train.data.root == stages.cache.input)


def test_there_are_recipes():
    assert {"toy-rankdpo", "toy-dpo", *REAL_RECIPES} <= {p.stem for p in RECIPES}


@pytest.mark.parametrize("name", REAL_RECIPES)
def test_real_recipes_load_hub_weights_and_document_their_sources(name):
    text = (CONFIGS / f"{name}.yaml").read_text()
    assert "# Sources" in text and "arXiv:" in text
    stages = stages_of(name)
    main = stages.trains[load_config(RunConfig, CONFIGS / f"{name}.yaml").main_variant]
    hub_id = stages.cache.model
    assert hub_id.count("/") == 1 and not Path(hub_id).exists()  # a hub id, read on a machine that has the weights
    assert main.model.path == hub_id  # the policy starts from the model the cache encoded with
    assert main.mode == "full" and main.speed.mixed_precision == "bf16"
    # the cache computes e_ref in the training precision (else the trainer would run the reference live)...
    # e_ref cached as the training step computes the policy's: the trained weights' dtype under its autocast
    assert (stages.cache.dtype, stages.cache.mixed_precision) == (main.model.dtype, main.speed.mixed_precision)
    assert main.objective.beta == 2500.0  # Diffusion-DPO's beta_dpo 5000 in fastpref's convention
    assert main.lr == pytest.approx(1e-8 * 2048)  # Diffusion-DPO: 1e-8 x scale_lr over its 2048 batch
    assert main.max_steps == 2000 and main.weight_decay == 0.01 and main.max_grad_norm == 1.0
    assert main.validation.enabled and main.validation.every <= main.max_steps
    assert load_config(RunConfig, CONFIGS / f"{name}.yaml").eval is None  # MiniGenEval is toy-world only


def test_sd15_dpo_is_the_published_diffusion_dpo_recipe():
    stages = stages_of("sd15-dpo")
    train = stages.trains["dpo"]
    assert stages.importer.format == "pickapic" and not stages.importer.keep_ties
    assert stages.importer.image_size == 512 and stages.cache.family == "sd"
    assert stages.cache.model in ("runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert stages.cache.flip  # random horizontal flips, as the reference script
    assert train.objective.name == "dpo" and train.objective.loss_type == "sigmoid"
    assert effective_batch(train) == 2048  # pairs per optimizer step
    assert train.lr_warmup_steps == 500
    # the cached reference errors cover every epoch of the run (~851K tie-free Pick-a-Pic v2 pairs)
    epochs = math.ceil(train.max_steps * effective_batch(train) / 851_000)
    assert stages.cache.reference_errors.epochs >= epochs


@pytest.mark.parametrize("name, family", [("sdxl-rankdpo", "sdxl"), ("sd3-rankdpo", "sd3")])
def test_rankdpo_recipes_train_on_syn_pic(name, family):
    stages = stages_of(name)
    train = stages.trains["rankdpo"]
    assert stages.cache.family == family and stages.synth.image_size == 1024
    assert [g.name for g in stages.synth.generators] == ["sdxl", "sd3-medium", "pixart-sigma", "stable-cascade"]
    assert stages.synth.group_size == 4
    assert [r.name for r in stages.label.rewards] == ["hpsv2", "pickscore", "clipscore", "aesthetic", "imagereward"]
    assert train.objective.name == "rankdpo" and train.objective.weighting == "dcg"
    assert stages.trains["dpo"].objective.name == "dpo"  # the paper's DPO baseline on the same data
    assert effective_batch(train) * 4 == 2 * 2048  # Diffusion-DPO's images per step: 2048 pairs
    epochs = math.ceil(train.max_steps * effective_batch(train) / 58_000)
    assert stages.cache.reference_errors.epochs >= epochs


def test_sdxl_and_sd3_share_syn_pic_but_cache_their_own_latents():
    recipes = {name: yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()) for name in ("sdxl-rankdpo", "sd3-rankdpo")}
    sdxl, sd3 = recipes["sdxl-rankdpo"], recipes["sd3-rankdpo"]
    assert sdxl["synth"] == sd3["synth"] and sdxl["label"] == sd3["label"] and sdxl["data_root"] == sd3["data_root"]
    a, b = stages_of("sdxl-rankdpo"), stages_of("sd3-rankdpo")
    assert a.synth.output == b.synth.output == sdxl["data_root"] == a.cache.input == b.cache.input
    assert a.cache.output != b.cache.output  # SDXL and SD3 latents / embeddings differ
    assert a.trains["rankdpo"].data.root == a.cache.output


def test_train_cli_reads_an_import_recipe():
    from fastpref.pipeline import train_config_of_recipe

    cfg = train_config_of_recipe(str(CONFIGS / "sd15-dpo.yaml"), ["max_steps=10", "importer.limit=100"])
    assert cfg.max_steps == 10 and cfg.objective.name == "dpo" and cfg.data.root == "runs/sd15-dpo/data"


def write(tmp_path, data) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def import_recipe(tmp_path) -> dict:
    return {
        "output_dir": str(tmp_path / "run"),
        "importer": {"source": str(tmp_path / "pickapic"), "format": "pickapic"},
        "cache": {"family": "sd", "model": "toy-sd"},
        "train": {"objective": {"name": "dpo"}},
    }


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"synth": {"prompts": {"path": "toy:train"}, "generators": []}}, "importer: cannot be combined with synth"),
        ({"label": {"rewards": []}}, "importer: cannot be combined with label"),
        ({"importer": None}, "synth: required (or an `importer:` section"),
        ({"importer": {"source": "x", "format": "pickapicc"}}, "importer.format: 'pickapicc' is not one of"),
        ({"importer": {"source": "x", "format": "pickapic", "image_sise": 8}}, "importer.image_sise: unknown key"),
    ],
)
def test_data_section_errors_name_the_key(tmp_path, change, needle):
    data = {**import_recipe(tmp_path), **change}
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("`", ".")):
        build_stages(load_config(RunConfig, write(tmp_path, data)))


def test_synth_without_label_is_named(tmp_path):
    data = {**import_recipe(tmp_path), "importer": None, "synth": {"prompts": {"path": "toy:train"}, "generators": []}}
    with pytest.raises(ConfigError, match="label: required with synth"):
        load_config(RunConfig, write(tmp_path, data))


def test_toy_rankdpo_draws_validation_grids():
    stages = stages_of("toy-rankdpo")
    for train in stages.trains.values():  # the DPO variant inherits them
        assert train.validation.enabled and train.validation.prompts == "toy"
        assert train.max_steps % train.validation.every == 0
    assert not stages_of("toy-dpo").trains["dpo"].validation.enabled  # off unless a recipe asks


def test_a_run_trains_with_the_flow_timesteps_its_cache_drew_with():
    """The cached e_ref were drawn at the cache section's flow_timesteps; every variant's training draws the same."""
    stages = stages_of("sd3-rankdpo", ["cache.flow_timesteps.logit_mean=0.8"])
    assert stages.cache.flow_timesteps.logit_mean == 0.8
    assert all(train.flow_timesteps == stages.cache.flow_timesteps for train in stages.trains.values())
    default = stages_of("sd3-rankdpo")
    assert all(train.flow_timesteps == default.cache.flow_timesteps for train in default.trains.values())


@pytest.mark.parametrize("name", REAL_RECIPES + ("toy-rankdpo", "toy-dpo"))
def test_recipes_cache_e_ref_in_the_main_steps_forward_rows(name):
    """The cache's e_ref forwards have the main training step's row count (issue 14: on CPU a denoiser forward of
    another row count rounds differently, so step 0's loss is ln 2 only with matching rows): batch_groups x the
    images each group puts through the denoiser (K for rankdpo, the pair for dpo)."""
    stages = stages_of(name)
    main = stages.main
    per_group = stages.synth.group_size if main.objective.name == "rankdpo" else 2
    assert stages.cache.reference_errors.forward_rows == main.data.batch_groups * per_group
