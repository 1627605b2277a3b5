"""Each family's loader round-trips a tiny random model, and the bundle's encode/denoise/target agree
with the diffusion maths (float64 references) for epsilon, v-prediction and flow matching."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fastpref import models  # noqa: E402
from fastpref.models import sd, sd3, sdxl  # noqa: E402
from fastpref.toy.tokenizer import build_tokenizer  # noqa: E402

CASES = {
    "sd-epsilon": (sd, {"prediction_type": "epsilon"}),
    "sd-v": (sd, {"prediction_type": "v_prediction"}),
    "sdxl-epsilon": (sdxl, {"prediction_type": "epsilon"}),
    "sd3-flow": (sd3, {}),
}
CAPTIONS = ["a red circle", "a blue square left of a green triangle", ""]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tokenizer, tmp_path_factory):
    module, kwargs = CASES[request.param]
    bundle = module.build_random(module.tiny_config("tiny", **kwargs), tokenizer, seed=0)
    folder = tmp_path_factory.mktemp(request.param)
    bundle.save_pretrained(folder)
    return request.param, module, bundle, folder, module.load(folder)


def _latents(bundle, batch, seed):
    generator = torch.Generator().manual_seed(seed)
    size = bundle.denoiser.config.sample_size
    channels = bundle.denoiser.config.in_channels
    return torch.randn(batch, channels, size, size, generator=generator)


def test_round_trip_keeps_weights_and_settings(saved):
    name, module, bundle, folder, loaded = saved
    assert type(loaded) is type(bundle)
    assert loaded.prediction_type == bundle.prediction_type
    for original, reloaded in zip([bundle.denoiser, *bundle.text_modules()], [loaded.denoiser, *loaded.text_modules()]):
        expected = original.state_dict()
        got = reloaded.state_dict()
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=f"{name}: {key}")
    # the generic loader finds the family from model_index.json
    assert models.load(folder).family == bundle.family


@torch.no_grad()
def test_loaded_bundle_predicts_like_the_original(saved):
    _, module, bundle, folder, loaded = saved
    latents = _latents(bundle, 3, seed=1)
    t = bundle.sample_timesteps(3, torch.Generator().manual_seed(2))
    expected = bundle.denoise(latents, t, bundle.encode_prompt(CAPTIONS))
    got = loaded.denoise(latents, t, loaded.encode_prompt(CAPTIONS))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_conditioning_and_prediction_shapes(saved, tokenizer):
    _, module, bundle, _, _ = saved
    cond = bundle.encode_prompt(CAPTIONS)
    batch, length = len(CAPTIONS), tokenizer.model_max_length
    if bundle.family == "sd":
        assert cond["encoder_hidden_states"].shape == (batch, length, bundle.denoiser.config.cross_attention_dim)
    elif bundle.family == "sdxl":
        assert cond["encoder_hidden_states"].shape == (batch, length, bundle.denoiser.config.cross_attention_dim)
        assert cond["text_embeds"].shape == (batch, bundle.text_encoders[1].config.projection_dim)
        size = bundle.denoiser.config.sample_size * 4
        assert cond["time_ids"].tolist() == [[size, size, 0, 0, size, size]] * batch
    else:
        joint = bundle.denoiser.config.joint_attention_dim
        assert cond["encoder_hidden_states"].shape == (batch, length + bundle.max_sequence_length, joint)
        assert cond["pooled_projections"].shape == (batch, bundle.denoiser.config.pooled_projection_dim)
    # different captions give different conditioning (the empty caption included)
    assert not torch.allclose(cond["encoder_hidden_states"][0], cond["encoder_hidden_states"][2])
    latents = _latents(bundle, batch, seed=3)
    t = bundle.sample_timesteps(batch)
    prediction = bundle.denoise(latents, t, cond)
    assert prediction.shape == latents.shape
    assert torch.isfinite(prediction).all()


def test_noise_and_target_match_float64_maths(saved):
    _, _, bundle, _, _ = saved
    latents = _latents(bundle, 4, seed=4).double()
    noise = _latents(bundle, 4, seed=5).double()
    t = bundle.sample_timesteps(4, torch.Generator().manual_seed(6))
    shape = (-1, 1, 1, 1)
    if bundle.prediction_type == "flow":
        assert t.is_floating_point() and (t > 0).all() and (t < bundle.num_train_timesteps).all()
        sigma = (t.double() / bundle.num_train_timesteps).view(shape)
        expected_noisy = (1 - sigma) * latents + sigma * noise
        expected_target = noise - latents
    else:
        alpha_bar = bundle.noise_scheduler.alphas_cumprod.double()[t.long()].view(shape)
        expected_noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        if bundle.prediction_type == "epsilon":
            expected_target = noise
        else:
            expected_target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    noisy = bundle.add_noise(latents.float(), noise.float(), t)
    target = bundle.target(latents.float(), noise.float(), t)
    torch.testing.assert_close(noisy.double(), expected_noisy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target.double(), expected_target, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_image_latent_round_trip_follows_the_pipeline_convention(saved):
    _, _, bundle, _, _ = saved
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(7)) * 2 - 1
    posterior_mean = bundle.vae.encode(pixels).latent_dist.mean
    latents = bundle.encode_images(pixels)
    # encode_images samples, so compare the deterministic part through decode's inverse scaling
    unscaled = latents.double() / bundle.vae.config.scaling_factor
    if bundle.uses_shift_factor:
        unscaled = unscaled + bundle.vae.config.shift_factor
    assert (unscaled - posterior_mean.double()).abs().mean() < 1.5  # noise of a unit-ish posterior std
    decoded = bundle.decode_latents(latents)
    expected = bundle.vae.decode(unscaled.float()).sample
    torch.testing.assert_close(decoded, expected, rtol=1e-4, atol=1e-4)


def test_missing_component_error_names_the_subfolder(saved, tmp_path):
    _, module, _, folder, _ = saved
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match="'vae'"):
        module.load(broken)


def test_unknown_pipeline_class_is_rejected(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="KandinskyPipeline"):
        models.load(tmp_path)
    with pytest.raises(ValueError, match="family"):
        models.load(tmp_path, family="sd4")


# ------------------------------------------------------------------ SD3 training timesteps under the scheduler shift
# diffusers' SD3 training scripts (examples/dreambooth/train_dreambooth_sd3.py):
#     u = compute_density_for_timestep_sampling(weighting_scheme, bsz, logit_mean, logit_std, mode_scale)
#     indices = (u * noise_scheduler.config.num_train_timesteps).long()
#     timesteps = noise_scheduler.timesteps[indices]; sigmas = noise_scheduler.sigmas[indices]  (get_sigmas)
#     noisy = (1 - sigmas) * x0 + sigmas * noise; target = noise - x0
SD3_MEDIUM_SHIFT = 3.0


@pytest.fixture(scope="module")
def shifted_sd3(tokenizer, tmp_path_factory):
    """A tiny SD3 saved with SD3-Medium's scheduler shift (3.0) and loaded back: the shift comes from the folder."""
    config = sd3.tiny_config("tiny")
    config["scheduler"] = {**config["scheduler"], "shift": SD3_MEDIUM_SHIFT}
    folder = tmp_path_factory.mktemp("sd3-shift3")
    sd3.build_random(config, tokenizer, seed=0).save_pretrained(folder)
    return sd3.load(folder)


def _diffusers_sd3_draw(scheduler, u):
    indices = (u * scheduler.config.num_train_timesteps).long()
    return scheduler.timesteps[indices], scheduler.sigmas[indices]


def test_shifted_flow_timesteps_of_u_match_diffusers_sd3_training(shifted_sd3):
    """Same u -> diffusers' (t, sigma): exactly (float32 rounding, atol 1e-3 on t, 1e-6 on sigma) where u T is an
    integer, and between diffusers' grid value and `shift` timesteps below it elsewhere (diffusers floors u T on a
    grid descending from sigma 1, so its sigma is never smaller)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    bundle = shifted_sd3
    assert bundle.timestep_shift == SD3_MEDIUM_SHIFT
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SD3_MEDIUM_SHIFT)
    T = bundle.num_train_timesteps

    # the brief's example: at u = 0.5 SD3-Medium trains at t = 750, not 500
    t_half, sigma_half = _diffusers_sd3_draw(scheduler, torch.tensor([0.5]))
    assert float(t_half) == 750.0 and float(sigma_half) == 0.75
    assert float(bundle.flow_sigmas_of_u(torch.tensor([0.5]))) == 0.75

    grid = torch.arange(T, dtype=torch.float32) / T
    exact = (grid * T).long() == torch.arange(T)  # u T an integer in float32 too (not so for 5 of the 1000)
    assert int(exact.sum()) > 990
    grid = grid[exact]
    t_ref, sigma_ref = _diffusers_sd3_draw(scheduler, grid)
    sigma = bundle.flow_sigmas_of_u(grid)
    torch.testing.assert_close(sigma, sigma_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(sigma * T, t_ref, rtol=0, atol=1e-3)

    u = compute_density_for_timestep_sampling("logit_normal", 4096, logit_mean=0.0, logit_std=1.0,
                                              generator=torch.Generator().manual_seed(0))
    t_ref, sigma_ref = _diffusers_sd3_draw(scheduler, u)
    gap = t_ref - bundle.flow_sigmas_of_u(u) * T
    assert gap.min() >= -1e-3 and gap.max() <= SD3_MEDIUM_SHIFT + 1e-3, (gap.min(), gap.max())

    # the forward process and target run at the sigma of the drawn t (sigma = t / T, as get_sigmas looks it up)
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 4, 8, 8, generator=generator)
    eps = torch.randn(8, 4, 8, 8, generator=generator)
    t_ref, sigma_ref = _diffusers_sd3_draw(scheduler, torch.arange(8) / 8)
    s = sigma_ref.view(-1, 1, 1, 1)
    torch.testing.assert_close(bundle.add_noise(x0, eps, t_ref), (1 - s) * x0 + s * eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bundle.target(x0, eps, t_ref), eps - x0, rtol=0, atol=0)


@pytest.mark.parametrize(
    "scheme",
    [
        {"weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0},
        {"weighting_scheme": "logit_normal", "logit_mean": 0.6, "logit_std": 0.7},  # sign convention: diffusers'
        {"weighting_scheme": "mode", "mode_scale": 1.29},
    ],
    ids=["logit_normal", "logit_normal-shifted-mean", "mode"],
)
def test_shifted_flow_timestep_distribution_matches_diffusers(shifted_sd3, scheme):
    """200k draws of bundle.sample_timesteps against 200k of diffusers' recipe: empirical CDFs within 0.01
    (two-sample KS; the 99.9% level is 0.006 at this size), quantiles within 6 timesteps; at logit-normal(0, 1) the
    median is the shifted 750 (+-3), not the unshifted 500."""
    import dataclasses

    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from fastpref.models.bundle import FlowTimestepSampling

    n = 200_000
    bundle = dataclasses.replace(shifted_sd3, flow_timestep_sampling=FlowTimestepSampling(**scheme), _pipeline=None)
    ours = bundle.sample_timesteps(n, torch.Generator().manual_seed(2)).double()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SD3_MEDIUM_SHIFT)
    u = compute_density_for_timestep_sampling(scheme["weighting_scheme"], n, logit_mean=scheme.get("logit_mean"),
                                              logit_std=scheme.get("logit_std"), mode_scale=scheme.get("mode_scale"),
                                              generator=torch.Generator().manual_seed(3))
    theirs, _ = _diffusers_sd3_draw(scheduler, u)
    theirs = theirs.double()
    assert ours.min() >= 0 and ours.max() <= 1000
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    torch.testing.assert_close(ours.quantile(q), theirs.quantile(q), rtol=0, atol=6.0)
    grid = torch.linspace(0, 1000, 2001, dtype=torch.float64)
    cdf = lambda x: torch.searchsorted(x.sort().values, grid, right=True).double() / n  # noqa: E731
    assert float((cdf(ours) - cdf(theirs)).abs().max()) < 0.01
    if scheme == {"weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0}:
        assert abs(float(ours.median()) - 750.0) < 3.0


def test_shift_applies_to_the_same_per_group_draw(shifted_sd3, tokenizer):
    """A group's shifted t is the shift of the very draw an unshifted model makes for it (cache and trainer agree
    through fastpref.data.noise), the draw does not depend on its batch, and noise is untouched by the shift."""
    from fastpref.data.noise import draw_timesteps_and_noise
    from fastpref.models.bundle import shift_sigmas

    unshifted = sd3.build_random(sd3.tiny_config("tiny"), tokenizer, seed=0)
    assert unshifted.timestep_shift == 1.0
    ids = list(range(40))
    shifted = draw_timesteps_and_noise(5, 1, ids, (4, 8, 8), shifted_sd3)
    plain = draw_timesteps_and_noise(5, 1, ids, (4, 8, 8), unshifted)
    torch.testing.assert_close(shifted.noise, plain.noise, rtol=0, atol=0)
    expected = shift_sigmas(plain.timesteps.double() / 1000, SD3_MEDIUM_SHIFT) * 1000
    torch.testing.assert_close(shifted.timesteps.double(), expected, rtol=1e-6, atol=1e-4)
    assert (shifted.timesteps > plain.timesteps).all()
    alone = draw_timesteps_and_noise(5, 1, [7], (4, 8, 8), shifted_sd3)
    torch.testing.assert_close(alone.timesteps, shifted.timesteps[7:8], rtol=0, atol=0)
    torch.testing.assert_close(alone.noise, shifted.noise[7:8], rtol=0, atol=0)


def test_flow_sampling_at_shift_one_is_the_logit_normal_draw_bit_for_bit(tokenizer):
    """The toy SD3 family (shift 1.0, what toy-sd3 ships) keeps the draw its caches and results were made with."""
    bundle = sd3.build_random(sd3.tiny_config("tiny"), tokenizer, seed=0)
    assert sd3.tiny_config("toy")["scheduler"]["shift"] == 1.0
    for seed in range(3):
        got = bundle.sample_timesteps(16, torch.Generator().manual_seed(seed))
        expected = torch.sigmoid(torch.randn(16, generator=torch.Generator().manual_seed(seed))) * 1000
        assert torch.equal(got, expected)
    # dynamic shifting (resolution-dependent, Flux-style) leaves diffusers' training grid unshifted
    bundle.noise_scheduler.register_to_config(use_dynamic_shifting=True, shift=3.0)
    assert bundle.timestep_shift == 1.0


def test_flow_timestep_sampling_rejects_unknown_schemes():
    from fastpref.models.bundle import FlowTimestepSampling

    with pytest.raises(ValueError, match="weighting_scheme"):
        FlowTimestepSampling(weighting_scheme="cosmap")
    with pytest.raises(ValueError, match="logit_std"):
        FlowTimestepSampling(logit_std=0.0)


def test_flow_timesteps_config_section_reaches_the_draws_and_the_shift_is_read_before_loading(shifted_sd3, tokenizer):
    """The config section draws what FlowTimestepSampling given directly draws; with_flow_timesteps leaves the
    bundle it copies as it was; the shift read from the folder's scheduler config alone is the loaded bundle's."""
    from fastpref.models.bundle import (FlowTimestepSampling, FlowTimestepsConfig, flow_timestep_record,
                                        scheduler_timestep_shift, shift_sigmas)

    section = FlowTimestepsConfig(weighting="mode", mode_scale=0.8)
    bundle = shifted_sd3.with_flow_timesteps(section.sampling())
    assert bundle is not shifted_sd3 and bundle.denoiser is shifted_sd3.denoiser
    assert shifted_sd3.flow_timestep_sampling == FlowTimestepSampling()  # the original is untouched
    direct = FlowTimestepSampling(weighting_scheme="mode", mode_scale=0.8)
    assert torch.equal(bundle.sample_timesteps(64, torch.Generator().manual_seed(0)),
                       shift_sigmas(direct.unshifted_sigmas(64, torch.Generator().manual_seed(0)),
                                    SD3_MEDIUM_SHIFT) * 1000)
    assert bundle.flow_timestep_record == {"shift": SD3_MEDIUM_SHIFT, "weighting": "mode", "mode_scale": 0.8}
    assert flow_timestep_record(1.0, FlowTimestepSampling()) == {"shift": 1.0, "weighting": "logit_normal",
                                                                 "logit_mean": 0.0, "logit_std": 1.0}
    assert scheduler_timestep_shift(shifted_sd3.source) == shifted_sd3.timestep_shift == SD3_MEDIUM_SHIFT
    ddpm = sd.build_random(sd.tiny_config("tiny"), tokenizer, seed=0)
    assert ddpm.flow_timestep_record is None and ddpm.with_flow_timesteps(direct) is ddpm
