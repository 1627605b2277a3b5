"""Toy pretraining: a few steps of each family (tiny configs) reduce the loss and save a pipeline
folder that its diffusers pipeline class loads and samples from."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fastpref.models import bundle as bundle_lib  # noqa: E402
from fastpref.toy import pretrain  # noqa: E402
from fastpref.toy.tokenizer import build_tokenizer, check_word_level  # noqa: E402
from fastpref.toy import world  # noqa: E402

PIPELINE_CLASS = {
    "toy-sd": "StableDiffusionPipeline",
    "toy-sdxl": "StableDiffusionXLPipeline",
    "toy-sd3": "StableDiffusion3Pipeline",
}


def _args(**kwargs) -> pretrain.PretrainArgs:
    # keep the test process's thread count (run() sets it globally)
    defaults = dict(size="tiny", batch_size=8, progress=False, threads=torch.get_num_threads())
    return pretrain.PretrainArgs(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    metrics = pretrain.run(_args(family="vae", out=out, steps=30, seed=0))
    return out, metrics


def test_tokenizer_makes_every_world_word_one_token(tmp_path):
    tokenizer = build_tokenizer()
    check_word_level(tokenizer, world.vocabulary())
    tokenizer.save_pretrained(tmp_path)
    reloaded = type(tokenizer).from_pretrained(tmp_path)
    caption = world.eval_prompts()[-1].caption
    assert reloaded(caption).input_ids == tokenizer(caption).input_ids
    assert len(tokenizer(caption).input_ids) == len(caption.split()) + 2  # + bos, eos
    with pytest.raises(ValueError, match="'x-ray'"):
        build_tokenizer(["x-ray"])


def test_vae_pretraining_reduces_loss_and_sets_latent_scaling(tiny_vae):
    out, metrics = tiny_vae
    assert metrics["final_loss"] < 0.9 * metrics["first_loss"], metrics
    vae = diffusers.AutoencoderKL.from_pretrained(out)
    assert vae.config.scaling_factor == pytest.approx(1.0 / metrics["latent_std"])
    assert vae.config.shift_factor == pytest.approx(metrics["latent_mean"])
    assert json.loads((out / "metrics.json").read_text())["steps"] == 30


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(PIPELINE_CLASS))
def test_diffusion_pretraining_reduces_loss_and_saves_a_pipeline(family, tiny_vae, tmp_path):
    vae_dir, _ = tiny_vae
    out, early = tmp_path / family, tmp_path / f"{family}-early"
    metrics = pretrain.run(
        _args(family=family, out=out, vae=vae_dir, steps=40, seed=0, early_fraction=0.25, early_out=early,
              work_dir=tmp_path / "work", checkpoint_every=20)
    )
    assert metrics["final_loss"] < metrics["first_loss"], metrics
    assert metrics["early_steps"] == 10
    assert (tmp_path / "work" / "checkpoint.pt").exists()
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == PIPELINE_CLASS[family]
    # the denoiser is stored in fp16; diffusers upcasts it on load
    pipeline = bundle_lib.load_pipeline(out)
    assert type(pipeline).__name__ == PIPELINE_CLASS[family]
    denoiser = pipeline.transformer if family == "toy-sd3" else pipeline.unet
    assert denoiser.dtype == torch.float32
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        prompt=["a red circle"], num_inference_steps=2, guidance_scale=2.0, output_type="np",
        generator=torch.Generator().manual_seed(0), **bundle_lib.pipeline_call_kwargs(out),
    ).images
    assert np.asarray(images).shape == (1, 32, 32, 3)
    # the early (EMA) snapshot is a different, complete pipeline
    early_pipeline = bundle_lib.load_pipeline(early)
    early_denoiser = early_pipeline.transformer if family == "toy-sd3" else early_pipeline.unet
    final_weights = dict(denoiser.named_parameters())
    assert any(not torch.equal(p, final_weights[name]) for name, p in early_denoiser.named_parameters())


def test_step_budget_needs_exactly_one_limit():
    with pytest.raises(ValueError, match="--steps"):
        pretrain.StepBudget(None, None)
    with pytest.raises(ValueError, match="--minutes"):
        pretrain.StepBudget(10, 1.0)


def test_cli_requires_a_vae_for_diffusion_families(capsys):
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--family", "toy-sd", "--steps", "3", "--out", "x"])
    assert "--vae is required" in capsys.readouterr().err


def test_a_resumed_run_keeps_its_early_snapshot_and_records_the_whole_run(tiny_vae, tmp_path, monkeypatch):
    """Stopped after its early snapshot and resumed, a run neither overwrites the snapshot with later weights nor
    forgets what happened before the stop: metrics.json has the snapshot's step, the whole run's losses and its
    minutes (the shipped v2 toy-sd-early was once overwritten this way at step 4201 of a run resumed at 4200)."""
    from fastpref.toy import pretrain_diffusion

    vae_dir, _ = tiny_vae

    def run(name: str, **kwargs) -> dict:
        return pretrain.run(_args(family="toy-sd", out=tmp_path / name, vae=vae_dir, steps=12, seed=0,
                                  early_fraction=0.25, early_out=tmp_path / f"{name}-early", checkpoint_every=4,
                                  work_dir=tmp_path / f"{name}-work", **kwargs))

    straight = run("straight")

    class Stop(Exception):
        pass

    real_save = pretrain_diffusion.save_checkpoint

    def save_then_stop(args, *rest, **kwargs):
        real_save(args, *rest, **kwargs)
        if rest[3] == 8:  # the step: stop after the checkpoint at step 8, past the snapshot at step 3
            raise Stop

    monkeypatch.setattr(pretrain_diffusion, "save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        run("resumed")
    snapshot = (tmp_path / "resumed-early" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    monkeypatch.setattr(pretrain_diffusion, "save_checkpoint", real_save)
    resumed = run("resumed", resume=True)

    assert (tmp_path / "resumed-early" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == snapshot
    assert snapshot == (tmp_path / "straight-early" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert resumed["early_steps"] == straight["early_steps"] == 3
    assert resumed["first_loss"] == straight["first_loss"] and resumed["final_loss"] == straight["final_loss"]
    early = json.loads((tmp_path / "resumed-early" / "metrics.json").read_text())
    straight_early = json.loads((tmp_path / "straight-early" / "metrics.json").read_text())
    assert early["steps"] == 3 and early["first_loss"] == straight_early["first_loss"]
    assert resumed["minutes"] >= early["minutes"]
