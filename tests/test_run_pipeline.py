"""`fastpref run` end to end on a tiny random-weight SD model (shapes only; the toy recipe itself runs in the demo)."""

import json

import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from fastpref.config import ConfigError, load_config  # noqa: E402
from fastpref.pipeline import RunConfig, build_stages, run  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from fastpref.models import sd
    from fastpref.toy.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("tiny-sd")
    sd.build_random(sd.tiny_config("tiny"), build_tokenizer(), seed=0).save_pretrained(path)
    return str(path)


def recipe(tmp_path, model):
    return {
        "output_dir": str(tmp_path / "run"),
        "main_variant": "rankdpo",
        "progress": False,
        "synth": {
            "prompts": {"path": "toy:train", "limit": 6},
            "image_size": 32,
            "groups_per_shard": 3,
            "generators": [{"name": "a", "model": model, "images_per_prompt": 3, "steps": 2, "batch_size": 9}],
        },
        "label": {"rewards": [{"name": "quality"}, {"name": "verifier"}]},
        "cache": {"family": "sd", "model": model, "reference_errors": {"epochs": 2, "seed": 0}},
        "train": {"mode": "lora", "objective": {"name": "rankdpo"}, "data": {"batch_groups": 2}, "max_steps": 3,
                  "checkpoint_every": 3, "tensorboard": False, "loss_backend": "reference"},
        "variants": {"dpo": {"objective.name": "dpo"}},
        "eval": {"seeds_per_prompt": 1, "max_prompts_per_category": 1, "steps": 2, "batch_size": 8},
    }


def test_run_end_to_end_and_rerun_is_idempotent(tmp_path, tiny_model):
    torch.set_num_threads(1)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path, tiny_model)))
    report = run(load_config(RunConfig, path))
    out = tmp_path / "run"
    assert set(report["eval"]) == {"base", "rankdpo", "dpo"}
    assert report["train"]["rankdpo"]["reference"] == "cached" and report["train"]["dpo"]["steps"] == 3
    assert (out / "grid.png").stat().st_size > 0 and "| base |" in (out / "report.md").read_text()
    checkpoint = out / "train/rankdpo/checkpoints/step-000003/trainable.safetensors"
    before = checkpoint.read_bytes()
    again = run(load_config(RunConfig, path, ["eval=null"]))
    assert again["train"]["rankdpo"]["resumed_from"] == 3  # nothing retrained
    assert checkpoint.read_bytes() == before
    assert json.loads((out / "report.json").read_text())["train"]["dpo"]["steps"] == 3


def test_every_stage_is_validated_before_work(tmp_path, tiny_model):
    data = recipe(tmp_path, tiny_model)
    data["variants"] = {"dpo": {"objective.name": "dpx"}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="variants.dpo.objective.name: 'dpx'"):
        build_stages(load_config(RunConfig, path))
    assert not (tmp_path / "run").exists()


def test_train_cli_reads_a_run_recipe(tmp_path, tiny_model):
    from fastpref.pipeline import train_config_of_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path, tiny_model)))
    cfg = train_config_of_recipe(str(path), ["lr=3e-4", "output_dir=" + str(tmp_path / "elsewhere")])
    assert cfg.objective.name == "rankdpo" and cfg.lr == 3e-4
    assert cfg.data.root == str(tmp_path / "elsewhere" / "data")


@pytest.fixture
def tiny_pickapic(tmp_path):
    """A Pick-a-Pic v2-like parquet file: 6 prompts with two 32x32 PNG images each, one tie (dropped on import)."""
    import io

    import numpy as np
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from PIL import Image

    from fastpref.toy import world

    def png(image):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    rng = np.random.default_rng(0)
    specs = [world.sample_spec(rng) for _ in range(6)]
    renders = [[world.render(spec, rng) for _ in range(2)] for spec in specs]
    labels = [1.0, 0.0, 0.5, 1.0, 0.0, 1.0]
    table = pa.table({
        "caption": [spec.caption for spec in specs],
        "jpg_0": [png(r[0]) for r in renders],
        "jpg_1": [png(r[1]) for r in renders],
        "label_0": labels,
        "label_1": [1 - x for x in labels],
    })
    path = tmp_path / "pickapic" / "train-00000-of-00001.parquet"
    path.parent.mkdir()
    pq.write_table(table, path, row_group_size=4)
    return path.parent


def test_sd15_dpo_recipe_runs_import_cache_train_eval_on_tiny_models(tmp_path, tiny_model, tiny_pickapic):
    """configs/sd15-dpo.yaml as shipped (bf16 cache + training, full fine-tuning, flips, cached e_ref, validation
    grids), with only the sizes turned down and the hub model and Pick-a-Pic swapped for tiny local ones."""
    from pathlib import Path

    from fastpref.data.shards import StageDir

    torch.set_num_threads(1)
    recipe_path = Path(__file__).resolve().parent.parent / "configs" / "sd15-dpo.yaml"
    out = tmp_path / "run"
    overrides = [
        f"output_dir={out}", "progress=false",
        f"importer.source={tiny_pickapic}", "importer.image_size=32", "importer.groups_per_shard=3",
        f"cache.model={tiny_model}", "cache.batch_size=8",
        "train.data.batch_groups=2", "train.data.num_workers=0", "train.grad_accumulation=1", "train.max_steps=2",
        "train.lr_warmup_steps=1", "train.checkpoint_every=2", "train.tensorboard=false",
        "train.loss_backend=reference", "train.validation.every=1", "train.validation.num_inference_steps=2",
        "eval={seeds_per_prompt: 1, max_prompts_per_category: 1, steps: 2, batch_size: 8}",
    ]
    cfg = load_config(RunConfig, recipe_path, overrides)
    report = run(cfg)
    assert list(report["seconds"])[:2] == ["import", "cache"] and "synth" not in report["seconds"]
    synth = StageDir(out / "data", "synth").open()
    assert synth.data["num_groups"] == 5  # the tie is dropped
    summary = report["train"]["dpo"]
    assert summary["steps"] == 2 and summary["reference"] == "cached"  # bf16 e_ref for bf16 training
    train_dir = out / "train" / "dpo"
    assert (train_dir / "checkpoints/step-000002/denoiser/config.json").exists()  # mode: full
    grids = sorted(p.name for p in (train_dir / "validation").iterdir())
    assert grids == ["step-000000.png", "step-000001.png", "step-000002.png"]
    assert set(report["eval"]) == {"base", "dpo"} and (out / "grid.png").stat().st_size > 0
