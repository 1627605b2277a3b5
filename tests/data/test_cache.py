"""Cached latents, conditioning and reference errors against the reference model recomputed from scratch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastpref.data.dataset import CachedDataset
from fastpref.data.noise import draw_flips, draw_timesteps_and_noise
from fastpref.data.shards import StageDir
from fastpref.data.synth import image_seed


@pytest.fixture(scope="module")
def bundle(tiny_sd_path):
    from fastpref.models import sd

    return sd.load(tiny_sd_path)


@pytest.fixture(scope="module")
def dataset(reference):
    return CachedDataset(reference, verify="checksum")


def test_cached_e_ref_equals_reference_error_recomputed_at_the_same_draw(dataset, bundle):
    """Per group and epoch, one group at a time (no batching), error in float64."""
    for position, group_id in enumerate(dataset.group_ids.tolist()):
        cond = torch.from_numpy(np.load(dataset.files["cond.encoder_hidden_states"][position])).float()
        for epoch in range(dataset.reference_epochs):
            flip = bool(draw_flips(dataset.noise_seed, epoch, [group_id])[0])
            x0 = torch.from_numpy(np.load(dataset.files["latents_flip" if flip else "latents"][position])).float()
            draw = draw_timesteps_and_noise(dataset.noise_seed, epoch, [group_id], tuple(x0.shape[1:]), bundle)
            k = x0.shape[0]
            t, eps = draw.timesteps.expand(k), draw.noise.expand(k, *x0.shape[1:])
            with torch.no_grad():
                pred = bundle.denoise(bundle.add_noise(x0, eps, t), t, {"encoder_hidden_states": cond.expand(k, -1, -1)})
            expected = (pred.double() - eps.double()).square().mean(dim=(1, 2, 3))  # epsilon prediction: target = eps
            np.testing.assert_allclose(dataset.e_ref[position, epoch], expected.numpy(), rtol=2e-5, atol=1e-7)


def test_cached_latents_and_text_embeddings_match_the_bundle(dataset, bundle, reference):
    synth = StageDir(reference, "synth").open()
    images = np.concatenate([synth.load(i, "images.npy") for i in range(len(synth.shards))])
    prompts = [g["prompt"] for i in range(len(synth.shards)) for g in synth.load_json(i, "groups.json")]
    config = dataset.manifest.config
    for position, group_id in enumerate(dataset.group_ids.tolist()):
        pixels = torch.from_numpy(images[group_id]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        for field, flipped in (("latents", False), ("latents_flip", True)):
            generators = [
                torch.Generator().manual_seed(image_seed(config["seed"], group_id, k, "flip" if flipped else "plain"))
                for k in range(len(pixels))
            ]
            with torch.no_grad():
                expected = bundle.encode_images(pixels.flip(-1) if flipped else pixels, generator=generators)
            stored = torch.from_numpy(np.load(dataset.files[field][position])).float()
            torch.testing.assert_close(stored, expected, rtol=2e-3, atol=2e-3)  # float16 storage
        with torch.no_grad():
            cond = bundle.encode_prompt([prompts[group_id]])["encoder_hidden_states"][0]
        stored = torch.from_numpy(np.load(dataset.files["cond.encoder_hidden_states"][position])).float()
        torch.testing.assert_close(stored, cond, rtol=2e-3, atol=2e-3)


def test_noise_draw_of_a_group_does_not_depend_on_its_batch(bundle):
    together = draw_timesteps_and_noise(4, 1, [7, 3, 9], (4, 8, 8), bundle)
    alone = draw_timesteps_and_noise(4, 1, torch.tensor([3]), (4, 8, 8), bundle)
    torch.testing.assert_close(together.noise[1:2], alone.noise, rtol=0, atol=0)
    torch.testing.assert_close(together.timesteps[1:2], alone.timesteps, rtol=0, atol=0)
    other_epoch = draw_timesteps_and_noise(4, 2, [3], (4, 8, 8), bundle)
    assert not torch.equal(other_epoch.noise, alone.noise)
    assert together.timesteps.dtype == torch.int64 and 0 <= together.timesteps.min() < 1000
    many = draw_timesteps_and_noise(0, 0, range(400), (1,), bundle)
    assert many.timesteps.unique().numel() > 300, "timesteps should spread over [0, 1000)"
    assert abs(float(many.noise.mean())) < 0.2 and abs(float(many.noise.std()) - 1) < 0.15


def test_flips_are_balanced_and_deterministic():
    flips = draw_flips(0, 0, range(1000))
    assert 400 < int(flips.sum()) < 600
    torch.testing.assert_close(draw_flips(0, 0, [5, 6]), flips[5:7])


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_other_families_cache_their_conditioning_and_e_ref(family, tiny_family_path, reference, tmp_path):
    """SDXL (epsilon, pooled + time ids) and SD3 (rectified flow, pooled projections): e_ref against the
    forward process written out here in float64 rather than taken from the bundle."""
    import importlib

    from data_helpers import cache_config

    from fastpref.data.cache import run_cache

    path = tiny_family_path(family)
    run_cache(cache_config(str(reference), path, family=family, output=str(tmp_path), flip=False,
                           reference_errors={"epochs": 1, "seed": 5}))
    dataset = CachedDataset(tmp_path)
    # shift 1.0 / default flow_timesteps (sd3) and DDPM (sdxl) draws are not recorded: the plans are those caches
    # always had, and the trainer reads a flow cache without a record as these draws
    assert "flow_timesteps_drawn" not in dataset.manifest.config and "flow_timesteps" not in dataset.manifest.config
    expected_keys = {"sdxl": ["encoder_hidden_states", "text_embeds", "time_ids"],
                     "sd3": ["encoder_hidden_states", "pooled_projections"]}[family]
    assert dataset.cond_keys == expected_keys
    bundle = importlib.import_module(f"fastpref.models.{family}").load(path)
    batch = next(iter(dataset.stream(3, seed=0)))
    x0 = batch["latents"].double()  # (B, K, C, h, w)
    draw = draw_timesteps_and_noise(dataset.noise_seed, 0, batch["group_ids"], tuple(x0.shape[2:]), bundle)
    eps = draw.noise.double()[:, None].expand_as(x0)
    if family == "sd3":
        sigma = (draw.timesteps.double() / 1000)[:, None, None, None, None]
        noisy, target = (1 - sigma) * x0 + sigma * eps, eps - x0
    else:
        alpha_bar = bundle.noise_scheduler.alphas_cumprod.double()[draw.timesteps][:, None, None, None, None]
        noisy, target = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps, eps
    k = x0.shape[1]
    rows = lambda tensor: tensor.reshape(-1, *tensor.shape[2:])  # noqa: E731
    cond = {key: value.float().repeat_interleave(k, 0) for key, value in batch["cond"].items()}
    with torch.no_grad():
        pred = bundle.denoise(rows(noisy).float(), draw.timesteps.repeat_interleave(k), cond).double()
    expected = (pred - rows(target)).square().mean(dim=(1, 2, 3)).reshape(-1, k)
    np.testing.assert_allclose(batch["e_ref"].numpy(), expected.numpy(), rtol=1e-4, atol=1e-6)
