"""ShapeCLIP (fastpref/toy/shapeclip.py): the tiny CLIP of the toy world and its shipped weights."""

import json

import numpy as np
import pytest
import torch

from fastpref.toy import shapeclip, world

TINY = dict(conv_channels=(8, 8, 16, 16), image_hidden=32, text_hidden=32, text_layers=1, text_heads=2, embed_dim=16)


def _contrastive_float64(logits: np.ndarray, positive: np.ndarray) -> float:
    def log_softmax(x, axis):
        x = x - x.max(axis=axis, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))

    i2t = -(positive * log_softmax(logits, 1)).sum(1) / positive.sum(1)
    cols = positive.sum(0) > 0
    t2i = -(positive * log_softmax(logits, 0)).sum(0)[cols] / positive.sum(0)[cols]
    return 0.5 * (i2t.mean() + t2i.mean())


def test_contrastive_loss_matches_a_float64_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 12)) * 5
    positive = np.zeros((6, 12), dtype=bool)
    positive[np.arange(6), np.arange(6)] = True
    positive[0, 3] = positive[2, 9] = True  # extra positives; columns 6.. except 9 have no image
    got = shapeclip.contrastive_loss(torch.tensor(logits, dtype=torch.float32), torch.from_numpy(positive))
    assert got.item() == pytest.approx(_contrastive_float64(logits, positive), abs=1e-5)


def test_truth_matrix_counts_every_true_caption_as_positive():
    rng = np.random.default_rng(1)
    spec = world.parse_caption("a red circle")
    _, objects = world.render_scene(spec, rng)
    others = [world.parse_caption(c) for c in ("a circle", "a blue circle", "a red square", "two circles")]
    assert shapeclip.truth_matrix([objects], [spec, *others]).tolist() == [[True, True, False, False, False]]
    images, texts, positive = shapeclip.training_batch(rng, 16)
    assert images.shape == (16, 32, 32, 3) and len(texts) == 48 and positive.shape == (16, 48)
    assert positive[np.arange(16), np.arange(16)].all()  # every image's own caption
    assert not positive[np.arange(16), 16 + np.arange(16)].any()  # its hard negatives are false
    assert not positive[np.arange(16), 32 + np.arange(16)].any()


def test_tokenizer_is_word_level_and_names_unknown_words():
    model = shapeclip.ShapeCLIP(words=world.vocabulary(), **TINY)
    ids, mask = model.tokenize(["a red circle left of a blue square", "a circle"])
    assert ids.shape == (2, 10) and mask.sum(1).tolist() == [10, 4]  # bos + words + eos
    with pytest.raises(ValueError, match="purple"):
        model.tokenize(["a purple circle"])


def test_a_few_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = shapeclip.ShapeCLIP(words=world.vocabulary(), **TINY)
    images, texts, positive = shapeclip.training_batch(np.random.default_rng(2), 32)
    pixels, positive = shapeclip.uint8_to_float(images), torch.from_numpy(positive)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = shapeclip.contrastive_loss(model(pixels, texts), positive)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_save_and_load_round_trip(tmp_path):
    model = shapeclip.ShapeCLIP(words=world.vocabulary(), **TINY).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["words"] == world.vocabulary()
    loaded = shapeclip.ShapeCLIP.from_pretrained(tmp_path).eval()
    images, captions = world.sample_batch(np.random.default_rng(3), 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(shapeclip.uint8_to_float(images), captions),
                                   model(shapeclip.uint8_to_float(images), captions), rtol=0, atol=0)


def test_cli_trains_and_saves(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--out", str(out), "--steps", "2", "--batch-size", "8", "--eval-images", "4", "--no-progress"]
    assert shapeclip.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and 0 <= metrics["hard_negative_accuracy"]["accuracy"] <= 1
    assert (out / "model.safetensors").is_file()


@pytest.mark.skipif(not (shapeclip.SHIPPED_WEIGHTS / "config.json").is_file(), reason="weights not shipped yet")
def test_shipped_weights_rank_the_true_caption_above_hard_negatives():
    model = shapeclip.load_shipped()
    result = shapeclip.hard_negative_accuracy(model, num_images=150, seed=99)
    assert result["chance"] == pytest.approx(1 / 8)
    assert result["accuracy"] >= 0.6, result
    files = list(shapeclip.SHIPPED_WEIGHTS.iterdir())
    assert sum(f.stat().st_size for f in files) < 2 * 2**20


def test_v2_training_batches_and_evaluation_use_v2_captions():
    rng = np.random.default_rng(2)
    images, texts, positive = shapeclip.training_batch(rng, 24, world_name="v2")
    assert images.shape == (24, 32, 32, 3) and positive.shape == (24, 72)
    specs = [world.parse_caption(t, "v2") for t in texts]  # every caption is in v2's grammar
    assert positive[np.arange(24), np.arange(24)].all()  # an image's own caption is true of it
    assert {w for t in texts for w in t.split()} - set(world.vocabulary("v1"))  # v2's own words come up
    spec = world.parse_caption("a small red circle", "v2")
    _, objects = world.render_scene(spec, rng)
    sizes = [world.parse_caption(c, "v2") for c in ("a red circle", "a large red circle", "a small circle")]
    assert shapeclip.truth_matrix([objects], [spec, *sizes]).tolist() == [[True, True, False, True]]
    model = shapeclip.ShapeCLIP(words=world.vocabulary("v2"), **TINY)
    result = shapeclip.hard_negative_accuracy(model, num_images=12, world_name="v2")
    assert result["num_images"] == 12 and 0.0 <= result["accuracy"] <= 1.0


_V2_WEIGHTS = shapeclip.SHIPPED_WEIGHTS_BY_WORLD["v2"]


@pytest.mark.skipif(not (_V2_WEIGHTS / "config.json").is_file(), reason="v2 weights not shipped")
def test_shipped_v2_weights_rank_the_true_caption_above_hard_negatives():
    model = shapeclip.load_shipped(world_name="v2")
    assert set(model.words) == set(world.vocabulary("v2"))
    result = shapeclip.hard_negative_accuracy(model, num_images=150, seed=99, world_name="v2")
    assert result["accuracy"] >= 0.85, result  # measured 93.3% (chance 1/8); per category: the model card
    assert sum(f.stat().st_size for f in _V2_WEIGHTS.iterdir()) < 2 * 2**20
    with pytest.raises(ValueError, match="world"):
        shapeclip.load_shipped(world_name="v3")
