"""Toy pretraining on world v2 (`--world v2`): a few tiny steps of the VAE and of each family give models that
speak v2 (the tokenizer holds v2's words, one token each; fastpref.models.model_world reads v2 from the folder),
and a diffusion family refuses a VAE of another world."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fastpref.models import load, model_world  # noqa: E402
from fastpref.toy import pretrain, world  # noqa: E402
from fastpref.toy.tokenizer import check_word_level  # noqa: E402

V2_ONLY_WORDS = sorted(set(world.vocabulary("v2")) - set(world.vocabulary("v1")))


def _args(**kwargs) -> pretrain.PretrainArgs:
    # keep the test process's thread count (run() sets it globally)
    defaults = dict(size="tiny", batch_size=8, progress=False, threads=torch.get_num_threads(), seed=0)
    return pretrain.PretrainArgs(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def v2_vae(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae-v2")
    pretrain.run(_args(family="vae", out=out, steps=4, world="v2"))
    return out


def test_the_cli_takes_a_world_and_defaults_to_v1():
    assert pretrain.parse_args(["--family", "vae", "--steps", "1", "--out", "x"]).world == "v1"
    assert pretrain.parse_args(["--family", "vae", "--steps", "1", "--out", "x", "--world", "v2"]).world == "v2"
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--family", "vae", "--steps", "1", "--out", "x", "--world", "v3"])


def test_a_v2_vae_records_its_world(v2_vae):
    metrics = json.loads((v2_vae / "metrics.json").read_text())
    assert metrics["world"] == "v2"
    assert model_world(v2_vae) == "v2"


def test_v2_samples_reach_the_vae_training():
    """The VAE's and the latent pool's images come from world v2 (captions with v2-only words appear)."""
    import numpy as np

    _, captions = world.sample_batch(np.random.default_rng(0), 64, split="train", world="v2")
    assert any(set(c.split()) & set(V2_ONLY_WORDS) for c in captions)
    assert all(world.parse_caption(c, "v2").world == "v2" for c in captions)


@pytest.mark.parametrize("family", ["toy-sd", "toy-sdxl", "toy-sd3"])
def test_each_family_pretrained_on_v2_speaks_v2(family, v2_vae, tmp_path):
    out = tmp_path / family
    early = tmp_path / f"{family}-early"
    metrics = pretrain.run(_args(family=family, out=out, vae=v2_vae, steps=4, world="v2", early_fraction=0.5,
                                 early_out=early, latent_cache=tmp_path))
    assert metrics["world"] == "v2"
    assert list(tmp_path.glob("latents-*-v2.pt")), "the latent pool's cache key names the world"
    for folder in (out, early):
        assert model_world(folder) == "v2"
        bundle = load(folder)
        for tokenizer in bundle.tokenizers:
            words = {token.removesuffix("</w>") for token in tokenizer.get_vocab() if token.endswith("</w>")}
            assert set(V2_ONLY_WORDS) <= words
            check_word_level(tokenizer, world.vocabulary("v2"))
        # every token a v2 caption makes is a word of v2 (none falls back to letters or unknowns)
        caption = world.eval_prompts("v2")[-1].caption
        ids = bundle.tokenizers[0](caption).input_ids
        assert len(ids) == len(caption.split()) + 2, (caption, ids)


def test_a_diffusion_family_refuses_a_vae_of_another_world(v2_vae, tmp_path):
    with pytest.raises(ValueError, match=r"--vae .* world v2 .* --world is v1"):
        pretrain.run(_args(family="toy-sd", out=tmp_path / "sd", vae=v2_vae, steps=1))
    assert not (tmp_path / "sd").exists()


def test_the_shipped_v1_models_are_v1_and_names_resolve():
    from fastpref.models import TOY_MODELS, toy_model_path

    for name in ("vae", "toy-sd", "toy-sd-early", "toy-sdxl", "toy-sd3"):
        assert model_world(name) == "v1", name
    assert model_world("stabilityai/stable-diffusion-xl-base-1.0") is None
    assert {n + "-v2" for n in ("toy-sd", "toy-sd-early", "toy-sdxl", "toy-sd3")} <= set(TOY_MODELS)
    assert toy_model_path("toy-sd-v2").name == "toy-sd-v2"


def test_the_card_of_a_v2_model_names_its_world(v2_vae):
    from fastpref.toy.model_card import write_model_card

    card = write_model_card(v2_vae, "vae-v2")
    assert "Trained on world v2 of the procedural shapes world (`--world v2`" in card
    assert "| verifier pass rate of reconstructions |" in card


def test_minigeneval_evaluates_the_world_its_models_record(v2_vae, tmp_path):
    from fastpref.eval.minigeneval import _models_world
    from fastpref.models import toy_model_path

    v1_model = str(toy_model_path("toy-sd"))
    assert _models_world([v1_model, "world"], None) == "v1"
    assert _models_world([str(v2_vae)], None) == "v2"
    assert _models_world(["world"], "v2") == "v2"
    with pytest.raises(SystemExit, match=r"toy-sd speaks toy world v1, but --world v2"):
        _models_world([v1_model], "v2")
    with pytest.raises(SystemExit, match=r"speaks toy world v1, but --model .* \(world v2\)"):
        _models_world([str(v2_vae), v1_model], None)


def test_caption_blind_chance_is_what_a_prompt_blind_perfect_renderer_scores():
    from fastpref.toy.model_card import caption_blind_chance

    v1 = caption_blind_chance("v1")
    assert v1["single_object"] == 1.0  # v1 holds out one bare shape: any render of it passes
    # v1 position: of 240 held-out prompts, a render passes its own caption and its mirror ("A left of B" is
    # "B right of A"), no other
    assert v1["position"] == pytest.approx(2 / 240)
