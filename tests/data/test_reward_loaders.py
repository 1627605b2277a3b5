"""The published-reward loaders (fastpref.rewards.pretrained) on tiny random-weight CLIP models built from configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastpref.data.label import RewardSpec, build_rewards  # noqa: E402
from fastpref.rewards import pretrained  # noqa: E402
from fastpref.utils.imports import available  # noqa: E402
from helpers.rewards import save_tiny_clip  # noqa: E402

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A saved random CLIPModel (32x32 images) with the toy tokenizer and a CLIP image-processor config."""
    return str(save_tiny_clip(tmp_path_factory.mktemp("tiny-clip")))


def images(count=3, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


def transformers_reference(path, batch):
    """logit_scale * cosine per pair, the way the CLIP model card computes it (processor + forward)."""
    model = transformers.CLIPModel.from_pretrained(path).eval()
    processor = transformers.CLIPProcessor.from_pretrained(path)
    inputs = processor(text=PROMPTS, images=list(batch), return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    return logits.diagonal(), model.logit_scale.exp()


def test_pickscore_and_clipscore_match_the_transformers_forward(tiny_clip):
    batch = images()
    expected, logit_scale = transformers_reference(tiny_clip, batch)
    pick, clip = build_rewards([RewardSpec("pickscore", tiny_clip), RewardSpec("clipscore", tiny_clip)], "cpu")
    torch.testing.assert_close(pick(batch, PROMPTS), expected, rtol=1e-4, atol=1e-5)
    cosine = expected / logit_scale
    torch.testing.assert_close(clip(batch, PROMPTS), (100 * cosine).clamp(min=0), rtol=1e-4, atol=1e-4)


def test_clip_rewards_are_differentiable(tiny_clip):
    reward = pretrained.PickScoreReward.from_pretrained(tiny_clip)
    pixels = torch.rand(2, 3, 48, 40, requires_grad=True)  # resized and center-cropped inside
    reward(pixels, PROMPTS[:2]).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_clip_preprocess_matches_the_processor_on_a_smooth_image():
    """Resize (shortest side) + center crop + normalize, against transformers' PIL processor."""
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    y, x = np.mgrid[0:48, 0:64]
    image = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8)  # smooth: resampling agrees
    expected = processor(images=[image], return_tensors="pt")["pixel_values"]
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    got = pretrained.clip_preprocess(pixels, 32, processor.image_mean, processor.image_std)
    assert got.shape == expected.shape == (1, 3, 32, 32)
    assert (got - expected).abs().mean() < 0.01  # PIL resamples in uint8; torch in float


def test_aesthetic_is_the_mlp_on_normalized_image_embeddings(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    mlp = pretrained.aesthetic_mlp(8)
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, tmp_path / "mlp.safetensors")
    reward = build_rewards([RewardSpec("aesthetic", tiny_clip, {"mlp_path": str(tmp_path / "mlp.safetensors")})], "cpu")[0]
    batch = images()
    model = transformers.CLIPModel.from_pretrained(tiny_clip).eval()
    processor = transformers.CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        embeds = model(**processor(text=PROMPTS, images=list(batch), return_tensors="pt", padding=True)).image_embeds
        expected = mlp.layers.eval()(embeds.double().float()).squeeze(-1)
    torch.testing.assert_close(reward(batch, ["ignored"] * 3), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="mlp_path"):
        pretrained.AestheticReward.from_pretrained(tiny_clip)


def test_missing_weights_and_libraries_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="HPS_v2.1_compressed.pt"):
        pretrained.HPSv2Reward.from_pretrained(None)
    with pytest.raises(FileNotFoundError, match="hps.pt: not found"):  # converted to CLIPModel: no open_clip needed
        pretrained.HPSv2Reward.from_pretrained(str(tmp_path / "hps.pt"))
    if not available("ImageReward"):
        with pytest.raises(ImportError, match="transformers 4.x"):
            pretrained.ImageRewardReward.from_pretrained()
    with pytest.raises(OSError, match=r"pickscore reward: cannot load CLIP weights .*nowhere"):
        pretrained.PickScoreReward.from_pretrained(str(tmp_path / "nowhere"))
