"""The shipped world-v2 toy models (fastpref/toy/weights/*-v2): each loads by name with its family, speaks v2 (its
tokenizers hold v2's words, its folder records v2), shares the v2 VAE, fits the size budget, and its model card
states a MiniGenEval on v2 that is imperfect and clearly above caption-blind chance in every category (the card's
numbers themselves are pinned by tests/toy/test_shipped_scores.py, which reruns the evaluation)."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fastpref import models  # noqa: E402
from fastpref.toy import pretrain, world  # noqa: E402
from fastpref.toy.tokenizer import check_word_level  # noqa: E402
from helpers.model_cards import CHANCE_P_VALUE, binomial_tail, card_scores  # noqa: E402

WEIGHTS = models.TOY_WEIGHTS_DIR
V2_MODELS = {"toy-sd-v2": "sd", "toy-sd-early-v2": "sd", "toy-sdxl-v2": "sdxl", "toy-sd3-v2": "sd3"}
SHIPPED_MEGABYTES_LIMIT = 40  # as v1's (tests/toy/test_shipped_pipelines.py)


def test_binomial_tail_known_values():
    assert binomial_tail(0, 10, 0.3) == pytest.approx(1.0)
    assert binomial_tail(10, 10, 0.5) == pytest.approx(0.5**10)
    assert binomial_tail(2, 3, 0.5) == pytest.approx(0.5)


def test_every_v2_model_is_registered_with_its_family():
    for name, family in V2_MODELS.items():
        assert models.TOY_MODELS[name] == family
        assert models.toy_model_path(name) == WEIGHTS / name


@pytest.mark.parametrize("name", sorted(V2_MODELS))
def test_a_v2_model_loads_by_name_and_speaks_v2(name):
    folder = WEIGHTS / name
    assert (folder / "model_index.json").is_file(), f"shipped pipeline {folder} is missing"
    assert models.model_world(name) == "v2"
    bundle = models.load(name)
    assert bundle.family == V2_MODELS[name]
    v2_only = sorted(set(world.vocabulary("v2")) - set(world.vocabulary("v1")))
    for tokenizer in bundle.tokenizers[:2]:  # toy-sd3's third tokenizer is the null T5's
        check_word_level(tokenizer, world.vocabulary("v2"))
    caption = "five purple crosses"
    assert set(caption.split()) & set(v2_only)
    cond = bundle.encode_prompt([caption])
    assert next(iter(cond.values())).shape[0] == 1
    # the VAE is v2's, shared through a relative link
    assert (folder / "vae").is_symlink() and os.readlink(folder / "vae") == "../vae-v2"
    card = (folder / "MODEL_CARD.md").read_text()
    assert "--world v2" in card and "world v2" in card


def test_the_v2_vae_records_v2_and_its_latent_statistics():
    folder = WEIGHTS / "vae-v2"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["world"] == "v2" and models.model_world("vae-v2") == "v2"
    config = json.loads((folder / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(1 / metrics["latent_std"])
    assert config["shift_factor"] == pytest.approx(metrics["latent_mean"])
    assert metrics["recon_pass_rate_eval"] >= 0.9, metrics  # the decoder keeps what the verifier checks
    assert (folder / "MODEL_CARD.md").is_file()


def test_v2_weights_fit_the_size_budget():
    total = sum(pretrain.folder_megabytes(WEIGHTS / name) for name in ["vae-v2", *V2_MODELS])
    assert total < SHIPPED_MEGABYTES_LIMIT, f"shipped v2 toy generators and VAE take {total:.1f} MB"


@pytest.mark.parametrize("name", sorted(V2_MODELS))
def test_each_v2_card_is_imperfect_and_clearly_above_chance_in_every_category(name):
    scores, images, chance = card_scores(name)
    assert set(scores) == set(world.CATEGORIES) == set(chance) and images >= 48
    for category, accuracy in scores.items():
        hits = round(accuracy * images)
        assert binomial_tail(hits, images, chance[category]) < CHANCE_P_VALUE, (name, category, hits, images,
                                                                                chance[category])
    assert min(scores.values()) < 1.0, (name, scores)
