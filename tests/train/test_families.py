"""Every model family through the trainer: SD1.5 v-prediction, SDXL and SD3 (SD3-Medium's scheduler shift 3.0),
LoRA and full fine-tuning, 2 steps each on a tiny cached dataset.

Per run: the cached reference errors equal the policy's at step 1 (cache and trainer drew the same (t, eps), the
shifted flow timesteps included); every group of K images shares one (t, eps), the group's draw from its own
generator; then the checkpoint leaves the trainer in the formats diffusers reads: LoRA -> the pipeline's
load_lora_weights reproduces the trained policy's prediction (rtol 1e-4, atol 1e-5: float32, same ops in another
module layout), full -> the denoiser class's from_pretrained gives exactly the trained state dict.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from fastpref.data.noise import group_generator
from fastpref.train.checkpoint import CheckpointManager
from fastpref.train.loop import Trainer
from fastpref.train.metrics import read_metrics
from helpers.train import make_config as train_config

# case -> (family, tiny_config kwargs, scheduler overrides)
CASES = {
    "sd-v": ("sd", {"prediction_type": "v_prediction"}, {}),
    "sdxl": ("sdxl", {}, {}),
    "sd3-shift3": ("sd3", {}, {"shift": 3.0}),
}


@pytest.fixture(scope="module")
def family_dataset(cached_dataset, tmp_path_factory):
    """case -> {"root", "model"}: a tiny random model of the case's family and the conftest's Syn-Pic images
    (synth + label of the tiny SD) cached with it (flip, e_ref for 1 epoch)."""
    import data_helpers as helpers

    from fastpref.data.cache import run_cache
    from fastpref.toy.tokenizer import build_tokenizer

    built = {}

    def build(case: str) -> dict[str, str]:
        if case not in built:
            family, kwargs, scheduler = CASES[case]
            previous = torch.get_num_threads()
            torch.set_num_threads(1)
            module = importlib.import_module(f"fastpref.models.{family}")
            config = module.tiny_config("tiny", **kwargs)
            config["scheduler"] = {**config["scheduler"], **scheduler}
            root = tmp_path_factory.mktemp(f"family-{case}")
            module.build_random(config, build_tokenizer(), seed=0).save_pretrained(root / "model")
            run_cache(helpers.cache_config(cached_dataset["root"], str(root / "model"), family=family,
                                           output=str(root / "data"), reference_errors={"epochs": 1, "seed": 11}))
            torch.set_num_threads(previous)
            built[case] = {"root": str(root / "data"), "model": str(root / "model")}
        return built[case]

    return build


def make_config(ds, out, mode):
    return train_config(ds, out, mode=mode, max_steps=2)


def expected_draw(bundle, seed, epoch, group_id, shape):
    """A group's (t, eps) written out from its generators, independently of the bundle's sampler: uniform DDPM
    steps, or for flow sigma = shift(sigmoid(N(0, 1))) (diffusers' SD3 logit-normal draw, shifted)."""
    generator = group_generator(seed, epoch, group_id, "timestep")
    if bundle.prediction_type == "flow":
        shift = float(bundle.noise_scheduler.config.shift)
        s = torch.sigmoid(torch.randn(1, generator=generator)).double()
        t = shift * s / (1 + (shift - 1) * s) * bundle.num_train_timesteps
    else:
        t = torch.randint(0, bundle.num_train_timesteps, (1,), generator=generator).double()
    eps = torch.randn(shape, generator=group_generator(seed, epoch, group_id, "noise"))
    return t, eps


def spy_on_steps(trainer):
    """Records (epoch, batch, StepOutput, t, noise) of every training forward."""
    records = []
    forward, add_noise = trainer.step_fn.forward, trainer.bundle.add_noise

    def recording_add_noise(latents, noise, t):
        records[-1].update(t=t.detach().cpu(), noise=noise.detach().cpu())
        return add_noise(latents, noise, t)

    def recording_forward(batch, epoch):
        records.append({"epoch": epoch, "batch": batch})
        out = forward(batch, epoch)
        records[-1]["out"] = out
        return out

    trainer.bundle.add_noise = recording_add_noise  # the step's bundle (and policy: the same object without a wrapper)
    trainer.step_fn.forward = recording_forward
    return records


def fixed_inputs(trainer):
    """Two latents, two timesteps and the cached conditioning of two prompts."""
    batch = next(iter(trainer.dataset.stream(2, seed=0)))
    cond = {key: value[:2].float() for key, value in batch["cond"].items()}
    config = trainer.bundle.denoiser.config
    x = torch.randn(2, config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100.0, 750.0]) if trainer.bundle.prediction_type == "flow" else torch.tensor([10, 500])
    return x, t, cond


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_family_trains_two_steps_and_its_checkpoint_reloads_in_diffusers(case, mode, family_dataset, tmp_path):
    from fastpref.models.bundle import load_pipeline
    from fastpref.train.step import with_denoiser

    ds = family_dataset(case)
    trainer = Trainer(make_config(ds, tmp_path, mode))
    bundle = trainer.bundle
    family, kwargs, scheduler = CASES[case]
    assert bundle.family == family
    assert bundle.prediction_type == {"sd3": "flow"}.get(family, kwargs.get("prediction_type", "epsilon"))
    if family == "sd3":
        assert bundle.timestep_shift == 3.0
    records = spy_on_steps(trainer)
    summary = trainer.train()
    assert summary["steps"] == 2 and summary["reference"] == "cached"
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path))

    # step 1: the policy is the reference, so its errors equal the cached ones (same draw in cache and trainer)
    first = records[0]["out"].metrics
    torch.testing.assert_close(first["e_pol"], first["e_ref"], rtol=1e-3, atol=1e-6)
    # every group of K images shares its own (t, eps)
    for record in records:
        batch = record["batch"]
        k = batch["latents"].shape[1]
        t, noise = record["t"].view(-1, k), record["noise"].view(-1, k, *batch["latents"].shape[2:])
        assert t.shape[0] == len(batch["group_ids"])  # rankdpo keeps every group and all K images
        for row, group_id in enumerate(batch["group_ids"].tolist()):
            want_t, want_eps = expected_draw(bundle, trainer.dataset.noise_seed, record["epoch"], group_id,
                                             tuple(batch["latents"].shape[2:]))
            torch.testing.assert_close(t[row].double(), want_t.expand(k), rtol=1e-6, atol=1e-4)
            torch.testing.assert_close(noise[row], want_eps.expand(k, *want_eps.shape), rtol=0, atol=0)

    checkpoint = CheckpointManager(tmp_path / "checkpoints").latest()
    assert checkpoint.name == "step-000002"
    denoiser = bundle.denoiser.eval()
    x, t, cond = fixed_inputs(trainer)
    pipe = load_pipeline(ds["model"])
    base_denoiser = pipe.transformer if family == "sd3" else pipe.unet
    with torch.no_grad():
        trained = bundle.denoise(x, t, cond)
        base = with_denoiser(bundle, base_denoiser).denoise(x, t, cond)
    assert (trained - base).abs().max() > 1e-4  # training changed the network
    if mode == "lora":
        pipe.load_lora_weights(str(checkpoint / "lora"))
        with torch.no_grad():
            loaded = with_denoiser(bundle, base_denoiser).denoise(x, t, cond)
        torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)
    else:
        reloaded = type(denoiser).from_pretrained(str(checkpoint / "denoiser"))
        expected, got = denoiser.state_dict(), reloaded.state_dict()
        assert expected.keys() == got.keys()
        for key in expected:
            assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key
        with torch.no_grad():
            torch.testing.assert_close(with_denoiser(bundle, reloaded).denoise(x, t, cond), trained, rtol=0, atol=0)


def test_family_cases_cover_every_family_and_prediction_type():
    from fastpref.models import FAMILIES

    assert {family for family, _, _ in CASES.values()} == set(FAMILIES)


def test_flow_error_spaces_equal_each_other_up_to_the_stated_per_timestep_factor():
    """x0 error = sigma^2 x velocity error, eps error = (1 - sigma)^2 x velocity error, per sample: the x0 / eps a
    velocity prediction implies (x_t - sigma v', x_t + (1 - sigma) v') against the true x0 / eps, in float64 on a
    tiny random SD3 transformer at shift 3, fresh random inputs."""
    from fastpref.models import sd3
    from fastpref.toy.tokenizer import build_tokenizer

    config = sd3.tiny_config("tiny")
    config["scheduler"] = {**config["scheduler"], "shift": 3.0}
    bundle = sd3.build_random(config, build_tokenizer(), seed=0)
    bundle.denoiser.double()
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(6, 4, 8, 8, generator=generator, dtype=torch.float64)
    eps = torch.randn(6, 4, 8, 8, generator=generator, dtype=torch.float64)
    t = bundle.sample_timesteps(6, generator=generator).double()
    cond = {"encoder_hidden_states": torch.randn(6, 3, 32, generator=generator, dtype=torch.float64),
            "pooled_projections": torch.randn(6, 16, generator=generator, dtype=torch.float64)}
    noisy = bundle.add_noise(x0, eps, t)
    with torch.no_grad():
        velocity = bundle.denoise(noisy, t, cond)
    sigma = (t / bundle.num_train_timesteps).view(-1, 1, 1, 1)

    def mse(a, b):
        return (a - b).square().mean(dim=(1, 2, 3))

    errors = {"velocity": mse(velocity, bundle.target(x0, eps, t)),
              "x0": mse(noisy - sigma * velocity, x0),  # diffusers' SD3 scripts' preconditioned output vs the latents
              "eps": mse(noisy + (1 - sigma) * velocity, eps)}
    for space in ("velocity", "x0", "eps"):
        weight = bundle.error_space_weight(t, space)
        weighted = errors["velocity"] * (1.0 if weight is None else weight.double())
        torch.testing.assert_close(weighted, errors[space], rtol=1e-5, atol=0)  # weight: float32 sigma^2
    auto = bundle.error_space_weight(t, "auto")
    assert torch.equal(auto, bundle.error_space_weight(t, "x0"))
    assert not torch.allclose(errors["x0"], errors["eps"])  # the spaces do differ
    with pytest.raises(ValueError, match="error_space 'x0' is for flow-matching models"):
        from fastpref.models import sd

        sd.build_random(sd.tiny_config("tiny"), build_tokenizer()).error_space_weight(t, "x0")


@pytest.mark.parametrize("space", ["velocity", "eps"])
def test_the_training_step_weighs_each_flow_error_by_its_space(family_dataset, tmp_path, space):
    """The step's per-sample e_pol / e_ref under error_space x0 (the default) are those under `space` times
    sigma^2 / (the space's factor), at the same draw; the cached e_ref (unweighted velocity errors) serve every space."""
    import fastpref.train.step as step

    ds = family_dataset("sd3-shift3")
    outputs = {}
    original = step.compute_loss
    try:
        for name in ("auto", space):
            captured = []

            def recording(*args, **kwargs):
                out = original(*args, **kwargs)
                captured.append((out, kwargs.get("weight", args[6] if len(args) > 6 else None)))
                return out

            step.compute_loss = recording
            trainer = Trainer(train_config(ds, tmp_path / name, mode="lora", max_steps=1,
                                           **{"objective.error_space": name}))
            assert trainer.reference_mode == "cached"
            epoch, batch = next(trainer.batches())
            trainer.step_fn.forward(batch, epoch)
            outputs[name] = (captured[0][0], records_t(trainer, batch, epoch))
    finally:
        step.compute_loss = original
    (x0_out, t), (other, _) = outputs["auto"], outputs[space]
    sigma = t / 1000.0
    factor = sigma.square() / (1.0 if space == "velocity" else (1 - sigma).square())
    torch.testing.assert_close(x0_out.e_pol, other.e_pol * factor, rtol=1e-5, atol=0)
    torch.testing.assert_close(x0_out.e_ref, other.e_ref * factor, rtol=1e-5, atol=0)


def records_t(trainer, batch, epoch):
    """The per-image timesteps of a rankdpo step on `batch` (every group, K images each)."""
    from fastpref.data.noise import draw_timesteps_and_noise

    draw = draw_timesteps_and_noise(trainer.dataset.noise_seed, epoch, batch["group_ids"],
                                    tuple(batch["latents"].shape[2:]), trainer.bundle)
    return draw.timesteps.float().repeat_interleave(batch["latents"].shape[1])


def test_error_space_is_refused_for_a_family_without_flow_matching(family_dataset, tmp_path, monkeypatch):
    import fastpref.models
    from fastpref.config import ConfigError

    ds = family_dataset("sd-v")
    monkeypatch.setattr(fastpref.models, "load", lambda *a, **k: pytest.fail("loaded before the config error"))
    with pytest.raises(ConfigError, match="objective.error_space: 'eps' is for the flow-matching families"):
        Trainer(train_config(ds, tmp_path, **{"objective.error_space": "eps"}))
