"""The toy rewards on world v2 (`world="v2"`): the verifier reads v2's grammar, ShapeCLIP loads shapeclip-v2, and
quality's palette holds v2's colors; a reward of one world refuses the other world's captions or weights."""

import numpy as np
import pytest
import torch

from fastpref.rewards import build_reward
from fastpref.rewards.toy import QualityReward, ShapeCLIPReward
from fastpref.toy import shapeclip, world

V2_ONLY_WORDS = set(world.vocabulary("v2")) - set(world.vocabulary("v1"))


def _v2_batch(n, seed=0, split="train"):
    images, captions = world.sample_batch(np.random.default_rng(seed), n, split, world="v2")
    assert any(set(c.split()) & V2_ONLY_WORDS for c in captions)  # the batch exercises what v1 lacks
    return images, captions


def _one_off(captions, seed):
    rng = np.random.default_rng(seed)
    wrong = []
    for caption in captions:
        variants = world.one_attribute_variants(world.parse_caption(caption, "v2"))
        wrong.append(variants[int(rng.integers(len(variants)))].caption)
    return wrong


def test_v2_verifier_reward_accepts_truth_and_rejects_one_attribute_off():
    images, captions = _v2_batch(40, seed=1)
    reward = build_reward("verifier", world="v2")
    assert reward(images, captions).tolist() == [1.0] * 40
    assert reward(images, _one_off(captions, 2)).sum() == 0


def test_a_v1_verifier_reward_refuses_v2_captions_naming_the_word():
    images, captions = _v2_batch(8, seed=3)
    with pytest.raises(ValueError, match="unknown word"):
        build_reward("verifier")(images, captions)
    with pytest.raises(ValueError, match="world='v3'"):
        build_reward("verifier", world="v3")


def test_v2_shapeclip_reward_uses_the_v2_weights_and_prefers_true_captions():
    reward = build_reward("shapeclip", world="v2")
    assert set(world.vocabulary("v2")) <= set(reward.model.words)
    assert reward.world == "v2"
    images, captions = _v2_batch(48, seed=6, split="eval")
    with torch.no_grad():
        true_scores, wrong_scores = reward(images, captions), reward(images, _one_off(captions, 7))
    assert (true_scores > wrong_scores).float().mean() >= 0.75
    # the v1 weights cannot read v2's words
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_reward("shapeclip")(images, captions)


def test_contrastive_shapeclip_is_the_probability_of_the_caption_against_its_one_attribute_variants():
    reward = build_reward("shapeclip", world="v2", contrastive=True)
    images, captions = _v2_batch(24, seed=8, split="eval")
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        scores = reward.score(pixels, captions)
        for pixel, caption, score in zip(pixels, captions, scores):
            # the reference: ShapeCLIP's own logits over the caption and every caption one attribute away
            candidates = [caption] + [v.caption for v in world.one_attribute_variants(world.parse_caption(caption, "v2"))]
            assert len(candidates) >= 8
            expected = reward.model(pixel[None], candidates)[0].softmax(0)[0]
            torch.testing.assert_close(score, expected, rtol=1e-4, atol=1e-6)
        # true captions win against a one-attribute-off caption scored the same way (whose variants hold the truth)
        wrong = reward.score(pixels, _one_off(captions, 9))
    assert ((0 <= scores) & (scores <= 1)).all()
    assert (scores > wrong).float().mean() >= 0.75
    assert scores.mean() > 2 * wrong.mean()
    with pytest.raises(ValueError, match="contrastive must be true or false"):
        ShapeCLIPReward(reward.model, world="v2", contrastive="yes")


def test_a_shapeclip_folder_of_another_world_is_refused(tmp_path):
    model = shapeclip.ShapeCLIP(words=world.vocabulary("v1"), conv_channels=(8, 8, 8, 8), image_hidden=16,
                                text_hidden=16, text_layers=1, text_heads=2, embed_dim=8)
    model.save_pretrained(tmp_path)
    assert ShapeCLIPReward.from_pretrained(tmp_path).world == "v1"
    with pytest.raises(ValueError, match=r"lacks world v2's words \[.*'purple'"):
        ShapeCLIPReward.from_pretrained(tmp_path, world="v2")


def test_v2_quality_counts_v2_colors_as_clean():
    """A clean v2 render scores as high under the v2 palette as a clean v1 render under v1's; under v1's palette
    the v2-only colors (white, cyan, ...) look off-palette."""
    v1_images, v1_captions = world.sample_batch(np.random.default_rng(4), 64, "train")
    images, captions = _v2_batch(64, seed=4)
    v1_clean = QualityReward()(v1_images, v1_captions).mean()
    v2_clean = QualityReward(world="v2")(images, captions)
    v2_under_v1_palette = QualityReward()(images, captions)
    assert abs(v2_clean.mean() - v1_clean) < 0.1
    assert (v2_clean >= v2_under_v1_palette - 1e-6).all()
    assert v2_clean.mean() - v2_under_v1_palette.mean() > 0.005
    degraded = QualityReward(world="v2")(world.degrade(images, np.random.default_rng(5), 1.0, 25, 10), captions)
    assert v2_clean.mean() > degraded.mean()
