"""Validation image grids during training: when they are written, what they show, and that they change nothing else."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastpref.config import ConfigError, load_config
from fastpref.train.loop import TrainConfig, Trainer
from fastpref.train.metrics import read_metrics
from helpers.train import make_config as train_config

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle"]


def make_config(ds, out, validation=None, **overrides):
    grids = {"every": 2, "prompts": PROMPTS, "seeds": [0, 1], "num_inference_steps": 3, **(validation or {})}
    return train_config(ds, out, **{"max_steps": 3, "checkpoint_every": 3, "validation": grids, **overrides})


def read_png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def expected_size(cfg) -> tuple[int, int]:
    """(width, height) of a grid of these prompts and seeds, laid out by fastpref.eval.grids."""
    from fastpref.eval import grids

    blank = np.zeros((len(PROMPTS), 32, 32, 3), dtype=np.uint8)
    rows = [(f"seed {seed}", blank) for seed in cfg.validation.seeds]
    return grids.make_grid(rows, PROMPTS, scale=cfg.validation.cell_size // 32, title="a title").size


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_grids_at_step_0_every_n_steps_and_the_last_one(cached_dataset, tmp_path, mode):
    """every=2, max_steps=3: grids of steps 0, 2 and 3; the policy trained at a large lr looks different at the end."""
    cfg = make_config(cached_dataset, tmp_path, mode=mode, lr=5e-2 if mode == "lora" else 1e-2,
                      tensorboard=True)
    trainer = Trainer(cfg)
    trainer.train()
    assert trainer.bundle.denoiser.training  # the loop left it in train mode
    grids = sorted(p.name for p in (tmp_path / "validation").iterdir())
    assert grids == ["step-000000.png", "step-000002.png", "step-000003.png"]  # no temp files left behind
    first, last = read_png(tmp_path / "validation/step-000000.png"), read_png(tmp_path / "validation/step-000003.png")
    assert Image.open(tmp_path / "validation/step-000003.png").size == expected_size(cfg)
    assert first.shape == last.shape
    assert np.abs(first.astype(int) - last.astype(int)).mean() > 1.0  # training changed the samples
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    if events:  # tensorboard installed: the grid is logged as an image
        assert any(b"validation" in path.read_bytes() for path in events)


def test_validation_leaves_the_training_stream_untouched(cached_dataset, tmp_path):
    """Identical losses and weights with and without grids: sampling uses its own generators and puts the global
    RNG states back."""
    from safetensors.torch import load_file

    runs = {}
    for name, every in (("plain", 0), ("grids", 1)):
        out = tmp_path / name
        trainer = Trainer(make_config(cached_dataset, out, validation={"every": every}, max_steps=3))
        if every:
            before = torch.get_rng_state()
            trainer.validate()
            assert torch.equal(torch.get_rng_state(), before) and trainer.bundle.denoiser.training
        trainer.train()
        runs[name] = out
    losses = {name: [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_metrics(out)]
              for name, out in runs.items()}
    assert losses["plain"] == losses["grids"] and len(losses["plain"]) == 3
    weights = {name: load_file(out / "checkpoints/step-000003/trainable.safetensors") for name, out in runs.items()}
    for key, value in weights["plain"].items():
        assert torch.equal(value, weights["grids"][key]), key
    assert len(list((runs["grids"] / "validation").iterdir())) == 4 and not (runs["plain"] / "validation").exists()


def test_a_resumed_run_continues_the_grids(cached_dataset, tmp_path):
    Trainer(make_config(cached_dataset, tmp_path, max_steps=2, checkpoint_every=2)).train()
    first = (tmp_path / "validation/step-000000.png").stat().st_mtime_ns
    summary = Trainer(make_config(cached_dataset, tmp_path, max_steps=4, checkpoint_every=2)).train(resume=True)
    assert summary["resumed_from"] == 2
    assert sorted(p.name for p in (tmp_path / "validation").iterdir()) == [
        "step-000000.png", "step-000002.png", "step-000004.png"]
    assert (tmp_path / "validation/step-000000.png").stat().st_mtime_ns == first  # not redrawn on resume


@pytest.mark.parametrize("name", ["toy-sd", "toy-sdxl", "toy-sd3"])
def test_validation_images_are_what_the_pipeline_samples(name):
    """Prompts encoded once up front (the text encoders are then dropped) give the pipeline's own images."""
    from fastpref.eval.minigeneval import DiffusersGenerate
    from fastpref.models import load, resolve_path
    from fastpref.models.bundle import load_pipeline, pipeline_call_kwargs
    from fastpref.train.validation import ValidationConfig, Validator

    bundle = load(name)
    call_kwargs = pipeline_call_kwargs(resolve_path(name))
    cfg = ValidationConfig(every=1, seeds=[3], num_inference_steps=4, guidance_scale=4.0)
    validator = Validator(cfg, bundle, PROMPTS[:2], "unused", call_kwargs)
    bundle.vae, bundle.text_encoders, bundle._pipeline = None, [None] * len(bundle.text_encoders), None
    images = validator.sample(bundle)
    assert images.shape == (1, 2, 32, 32, 3) and images.dtype == np.uint8
    reference = DiffusersGenerate(load_pipeline(resolve_path(name)), num_inference_steps=4, guidance_scale=4.0,
                                  pipeline_kwargs=call_kwargs)(PROMPTS[:2], [3, 3])
    assert np.abs(images[0].astype(int) - reference.astype(int)).max() <= 2  # float rounding of the batch


def test_toy_prompts_cover_the_categories():
    from fastpref.toy import world
    from fastpref.train.validation import toy_prompts

    prompts = toy_prompts(6)
    assert len(set(prompts)) == 6
    assert {world.parse_caption(p).category for p in prompts} == set(world.CATEGORIES)


def test_toy_validation_prompts_follow_the_models_world(tmp_path):
    """A v2 model is validated on v2's held-out prompts (v1 captions would show it words it never trained on)."""
    import json

    from fastpref.toy import world
    from fastpref.train.validation import ValidationConfig, resolve_prompts

    model = tmp_path / "toy-sd-v2"
    model.mkdir()
    (model / "metrics.json").write_text(json.dumps({"family": "toy-sd", "world": "v2"}))
    prompts = resolve_prompts(ValidationConfig(prompts="toy", num_prompts=6), tmp_path, model)
    held_out = {s.caption for s in world.eval_prompts("v2")}
    assert len(set(prompts)) == 6 and set(prompts) <= held_out
    assert {world.parse_caption(p, "v2").category for p in prompts} == set(world.CATEGORIES)
    assert resolve_prompts(ValidationConfig(prompts="toy", num_prompts=6), tmp_path, None) == \
        resolve_prompts(ValidationConfig(prompts="toy", num_prompts=6), tmp_path, "toy-sd")  # v1 models: v1 prompts
    v1_words = set(world.vocabulary("v1"))
    assert any(word not in v1_words for p in prompts for word in p.split())  # v2's own shapes, colors or sizes


def test_dataset_prompts_come_from_the_training_data(cached_dataset, tmp_path):
    from fastpref.train.validation import dataset_prompts

    prompts = dataset_prompts(cached_dataset["root"], 3)
    assert len(prompts) == 3 and all(isinstance(p, str) and p for p in prompts)
    with pytest.raises(ConfigError, match="validation.prompts: 'dataset' reads the training prompts"):
        dataset_prompts(tmp_path, 3)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("validation.every=-1", "validation.every: must be >= 0"),
        ("validation.prompts=tyo", "validation.prompts: 'tyo' is neither a list of captions"),
        ("validation.prompts=[]", "validation.prompts: the list is empty"),
        ("validation.prompts=['a red circle', ' ']", r"validation.prompts\[1\]: empty caption"),
        ("validation.seeds=[]", "validation.seeds: at least one seed"),
        ("validation.seeds=[1, 1]", "validation.seeds: must be distinct"),
        ("validation.seeds=[a]", r"validation.seeds\[0\]: expected an integer"),
        ("validation.num_inference_steps=0", "validation.num_inference_steps: must be >= 1"),
        ("validation.guidance_scale=-2", "validation.guidance_scale: must be >= 0"),
        ("validation.batch_size=0", "validation.batch_size: must be >= 1"),
        ("validation.cell_size=4", "validation.cell_size: must be >= 8"),
        ("validation.evry=10", "validation.evry: unknown key"),
    ],
)
def test_bad_validation_values_name_the_key(tmp_path, override, needle):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  root: /nowhere\n")
    with pytest.raises(ConfigError, match=needle):
        load_config(TrainConfig, path, [override])
