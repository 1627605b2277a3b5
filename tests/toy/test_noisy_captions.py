"""A base with a known caption flaw: `confuse_colors` swaps color words for their confusable partners (the image
unchanged) and `python -m fastpref.toy.pretrain --init PIPELINE --color-confusion P` continues a shipped toy model on
such captions (how fastpref/toy/weights/toy-sd-noisycap-v2 was made)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastpref.toy import world
from fastpref.toy.world import CONFUSABLE_COLORS, confuse_colors


def _train_captions(n: int = 3000, world_name: str = "v2") -> list[str]:
    return world.sample_batch(np.random.default_rng(0), n, split="train", world=world_name)[1]


def test_confusable_colors_are_pairs_of_v2_colors():
    assert set(CONFUSABLE_COLORS) == set(world.get_world("v2").colors)
    for color, partner in CONFUSABLE_COLORS.items():
        assert partner != color and CONFUSABLE_COLORS[partner] == color


def test_no_confusion_keeps_every_caption():
    rng = np.random.default_rng(1)
    assert all(confuse_colors(c, rng, 0.0, "v2") == c for c in _train_captions(500))


def test_full_confusion_swaps_every_color_it_may_and_never_leaks_a_held_out_caption():
    rng = np.random.default_rng(2)
    colors = world.get_world("v2").colors
    changed = 0
    for caption in _train_captions():
        noisy = confuse_colors(caption, rng, 1.0, "v2")
        spec = world.parse_caption(noisy, "v2")  # in the grammar, articles included ("an orange" -> "a red")
        assert not world.is_held_out(spec), (caption, noisy)
        original = caption.split()
        if noisy == caption:
            continue
        changed += 1
        for before, after in zip(original, noisy.split()):
            if before in colors:
                assert after == CONFUSABLE_COLORS[before], (caption, noisy)  # p = 1: every color word swapped
            elif before not in ("a", "an"):
                assert after == before, (caption, noisy)
    assert changed > 0.3 * len(_train_captions())


def test_the_swap_rate_follows_the_probability_for_single_color_captions():
    rng = np.random.default_rng(3)
    single = [c for c in _train_captions() if world.parse_caption(c, "v2").category == "colors"]
    swapped = np.mean([confuse_colors(c, rng, 0.45, "v2") != c for c in single])
    # some swaps are withheld (they would name a held-out color-shape pair), so the rate is at most 0.45
    assert 0.25 < swapped <= 0.45 + 3 * np.sqrt(0.25 / len(single)), swapped


def test_world_v1_has_no_partner_for_its_colors_and_is_left_alone():
    rng = np.random.default_rng(4)
    captions = _train_captions(300, "v1")
    # v1's red / green / blue / yellow have partners only in v2
    assert all(confuse_colors(c, rng, 1.0, "v1") == c for c in captions)


# --- the pretraining options -------------------------------------------------------------------------------------

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fastpref.toy import pretrain  # noqa: E402


def _args(**kwargs) -> pretrain.PretrainArgs:
    defaults = dict(size="tiny", batch_size=8, progress=False, threads=torch.get_num_threads(), seed=0, world="v2")
    return pretrain.PretrainArgs(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def tiny_v2_sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("noisycap")
    pretrain.run(_args(family="vae", out=root / "vae", steps=2))
    pretrain.run(_args(family="toy-sd", out=root / "sd", vae=root / "vae", steps=2, latent_cache=root))
    return root


def _denoiser_weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next((folder / "unet").glob("*.safetensors"))))


def test_init_continues_from_the_given_pipeline_and_confuses_its_captions(tiny_v2_sd, tmp_path, monkeypatch):
    from fastpref.toy import pretrain_diffusion

    seen: list[tuple[str, str]] = []

    def spy(caption, rng, probability, world_name):
        noisy = confuse_colors(caption, rng, probability, world_name)
        seen.append((caption, noisy))
        return noisy

    monkeypatch.setattr(pretrain_diffusion, "confuse_colors", spy)
    out = tmp_path / "continued"
    # an lr of ~0 leaves the weights where --init put them: the saved model is the init's (a random init is not)
    metrics = pretrain.run(_args(family="toy-sd", out=out, vae=tiny_v2_sd / "vae", steps=2, lr=1e-12,
                                 init=tiny_v2_sd / "sd", color_confusion=1.0, latent_cache=tiny_v2_sd))
    assert metrics["init"] == str(tiny_v2_sd / "sd") and metrics["color_confusion"] == 1.0
    assert json.loads((out / "metrics.json").read_text())["color_confusion"] == 1.0
    init, continued = _denoiser_weights(tiny_v2_sd / "sd"), _denoiser_weights(out)
    assert init.keys() == continued.keys()
    assert all(torch.equal(init[k], continued[k]) for k in init)
    assert seen and any(before != after for before, after in seen), "no caption reached confuse_colors changed"

    fresh = pretrain.run(_args(family="toy-sd", out=tmp_path / "fresh", vae=tiny_v2_sd / "vae", steps=2, lr=1e-12,
                               seed=5, latent_cache=tiny_v2_sd))
    assert "init" not in fresh and "color_confusion" not in fresh
    random_init = _denoiser_weights(tmp_path / "fresh")
    assert not all(torch.equal(init[k], random_init[k]) for k in init)


def _text_encoder_weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next((folder / "text_encoder").glob("*.safetensors"))))


def test_freeze_text_trains_the_denoiser_only(tiny_v2_sd, tmp_path):
    out = tmp_path / "frozen-text"
    metrics = pretrain.run(_args(family="toy-sd", out=out, vae=tiny_v2_sd / "vae", steps=3, lr=1e-2,
                                 init=tiny_v2_sd / "sd", freeze_text=True, latent_cache=tiny_v2_sd))
    assert metrics["frozen_text_encoders"] is True
    text_before, text_after = _text_encoder_weights(tiny_v2_sd / "sd"), _text_encoder_weights(out)
    assert all(torch.equal(text_before[k], text_after[k]) for k in text_before)
    unet_before, unet_after = _denoiser_weights(tiny_v2_sd / "sd"), _denoiser_weights(out)
    assert not all(torch.equal(unet_before[k], unet_after[k]) for k in unet_before)
    # without the flag the same run moves the text encoder too
    joint = tmp_path / "joint"
    pretrain.run(_args(family="toy-sd", out=joint, vae=tiny_v2_sd / "vae", steps=3, lr=1e-2, init=tiny_v2_sd / "sd",
                       latent_cache=tiny_v2_sd))
    assert not all(torch.equal(text_before[k], v) for k, v in _text_encoder_weights(joint).items())


def test_init_of_another_world_is_refused(tiny_v2_sd, tmp_path):
    with pytest.raises(ValueError, match=r"--init .* world v2 .* --world is v1"):
        pretrain.run(_args(family="toy-sd", out=tmp_path / "x", vae=tiny_v2_sd / "vae", steps=1, world="v1",
                           init=tiny_v2_sd / "sd"))


@pytest.mark.parametrize("argv, message", [
    (["--family", "toy-sd", "--vae", "v", "--color-confusion", "1.5"], "--color-confusion must be in"),
    (["--family", "vae", "--init", "somewhere"], "apply to the diffusion families"),
    (["--family", "toy-sd", "--vae", "v", "--freeze-text"], "--freeze-text needs --init"),
])
def test_the_cli_checks_the_new_options(argv, message, capsys):
    with pytest.raises(SystemExit):
        pretrain.parse_args([*argv, "--steps", "1", "--out", "x"])
    assert message in capsys.readouterr().err


# --- the shipped model -------------------------------------------------------------------------------------------

from fastpref import models  # noqa: E402
from helpers.model_cards import CHANCE_P_VALUE, binomial_tail, card_scores  # noqa: E402

NOISYCAP = "toy-sd-noisycap-v2"
COLOR_CATEGORIES = ("colors", "color_attr")


def test_the_noisy_caption_model_is_shipped_as_toy_sd_continued_on_confused_colors():
    folder = models.toy_model_path(NOISYCAP)
    assert models.TOY_MODELS[NOISYCAP] == "sd" and models.model_world(NOISYCAP) == "v2"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["init"].endswith("toy-sd-v2") and 0 < metrics["color_confusion"] < 0.5, metrics
    assert "--color-confusion" in metrics["command"] and "--init" in metrics["command"]
    card = (folder / "MODEL_CARD.md").read_text()
    assert metrics["command"] in card and "confusable" in card
    bundle = models.load(NOISYCAP)
    assert bundle.family == "sd"
    assert pretrain.folder_megabytes(folder) < 10


def test_its_flaw_is_in_color_and_it_stays_above_chance_everywhere():
    """The card (rerun by tests/toy/test_shipped_scores.py): the color categories fall well below toy-sd-v2's
    (the flaw the captions taught), and every category stays clearly above caption-blind chance."""
    scores, images, chance = card_scores(NOISYCAP)
    clean, clean_images, _ = card_scores("toy-sd-v2")
    assert images == clean_images
    for category in COLOR_CATEGORIES:
        assert scores[category] < clean[category] - 0.2, (category, scores[category], clean[category])
    for category, accuracy in scores.items():
        hits = round(accuracy * images)
        assert binomial_tail(hits, images, chance[category]) < CHANCE_P_VALUE, (category, hits, images)
