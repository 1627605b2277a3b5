"""Rewards with gradients to the pixels (what DRaFT backpropagates): finite-difference checks in float64 on tiny
random models, the differentiable preprocessing against the PIL path of the reference processors, and the config
check that refuses a reward without gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers.clip import tiny_clip_model, tiny_clip_tokenizer  # noqa: E402

from fastpref.config import ConfigError  # noqa: E402
from fastpref.rewards import pretrained, require_differentiable, toy  # noqa: E402
from fastpref.rewards.base import to_pixels  # noqa: E402

PROMPTS = ["a red circle", "two blue squares"]
WORDS = sorted({w for p in PROMPTS for w in p.split()})


def directional_check(score, pixels: torch.Tensor, directions: int = 3, step: float = 1e-5) -> torch.Tensor:
    """d/dh sum_i w_i score(x + h v)_i by central differences vs <grad, v>, for random v and w, in float64
    (error ~ step^2, far below the tolerance); returns the gradient."""
    gen = torch.Generator().manual_seed(0)
    x = pixels.detach().double().requires_grad_()
    weights = torch.randn(len(x), generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((score(x) * weights).sum(), x)
    for _ in range(directions):
        v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            plus, minus = (score(x + step * v) * weights).sum(), (score(x - step * v) * weights).sum()
        numeric = (plus - minus) / (2 * step)
        analytic = (grad * v).sum()
        assert abs(float(numeric - analytic)) <= 1e-6 * max(1.0, abs(float(analytic))), (float(numeric), float(analytic))
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    return grad


def interior_pixels(*shape, seed=1) -> torch.Tensor:
    """Pixels away from 0 and 1, so the PIL-like clamps in the resize are inactive (the score is smooth there)."""
    return 0.3 + 0.4 * torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def clip_parts():
    tokenizer = tiny_clip_tokenizer(WORDS)
    return tiny_clip_model(tokenizer).double(), tokenizer


def test_quality_reward_gradient_matches_finite_differences():
    reward = toy.QualityReward()
    directional_check(lambda x: reward.score(x, PROMPTS), interior_pixels(2, 3, 8, 8))


def test_shapeclip_reward_gradient_matches_finite_differences():
    from fastpref.toy.shapeclip import ShapeCLIP

    torch.manual_seed(0)
    model = ShapeCLIP(words=WORDS, conv_channels=(8, 16), embed_dim=8, image_hidden=8, text_hidden=16,
                      text_layers=1, text_heads=2, image_size=16).double()
    reward = toy.ShapeCLIPReward(model)
    directional_check(lambda x: reward.score(x, PROMPTS), interior_pixels(2, 3, 16, 16))
    directional_check(lambda x: reward.score(x, PROMPTS), interior_pixels(2, 3, 20, 24))  # resized inside


def test_contrastive_shapeclip_reward_gradient_matches_finite_differences():
    from fastpref.toy.shapeclip import ShapeCLIP
    from fastpref.toy.world import vocabulary

    torch.manual_seed(0)
    model = ShapeCLIP(words=vocabulary("v1"), conv_channels=(8, 16), embed_dim=8, image_hidden=8, text_hidden=16,
                      text_layers=1, text_heads=2, image_size=16).double()
    reward = toy.ShapeCLIPReward(model, contrastive=True)
    prompts = ["a red circle", "two squares", "a blue triangle left of a green square"]  # in v1's grammar
    directional_check(lambda x: reward.score(x, prompts), interior_pixels(3, 3, 16, 16))


@pytest.mark.parametrize("name", ["clipscore", "pickscore", "aesthetic", "hpsv2", "hpsv2-crop"])
def test_clip_rewards_gradient_matches_finite_differences(clip_parts, name):
    model, tokenizer = clip_parts
    mean, std = pretrained.OPENAI_CLIP_MEAN, pretrained.OPENAI_CLIP_STD
    if name == "clipscore":
        # CLIPScore clamps at 0 (a kink): score the cosine it clamps, which random weights may make negative
        reward = pretrained.CLIPScoreReward(model, tokenizer, 32, mean, std)
        score = lambda x: 100.0 * reward.cosine(x, PROMPTS)  # noqa: E731
    elif name == "pickscore":
        reward = pretrained.PickScoreReward(model, tokenizer, 32, mean, std)
        score = lambda x: reward.score(x, PROMPTS)  # noqa: E731
    elif name == "aesthetic":
        torch.manual_seed(1)
        mlp = pretrained.aesthetic_mlp(model.config.projection_dim).double()
        reward = pretrained.AestheticReward(model, tokenizer, 32, mean, std, mlp=mlp)
        score = lambda x: reward.score(x, PROMPTS)  # noqa: E731
    else:
        reward = pretrained.HPSv2Reward(model, tokenizer, resize="crop" if name.endswith("crop") else "letterbox")
        score = lambda x: reward.score(x, PROMPTS)  # noqa: E731
    # 40 x 36: resized (downscaled) and cropped / letterboxed inside; 24 x 28: upscaled
    directional_check(score, interior_pixels(2, 3, 40, 36))
    directional_check(score, interior_pixels(2, 3, 24, 28, seed=2))
    assert all(p.grad is None for p in model.parameters())  # the reward model stays frozen


def _pil_letterbox(image: np.ndarray, size: int) -> torch.Tensor:
    """open_clip's ResizeMaxSize on a PIL image (torchvision's resize = PIL bicubic), black fill, ToTensor."""
    from PIL import Image

    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    resized = Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).double() / 255.0


# PIL rounds to uint8 after each of its two passes: up to ~1/255 apart pixel by pixel, ~0.3/255 on average.
PIL_MAX_ABS, PIL_MEAN_ABS = 0.005, 0.0015


@pytest.mark.parametrize("height, width, size", [(64, 48, 32), (20, 30, 32), (512, 384, 224), (300, 500, 224)])
def test_differentiable_preprocessing_matches_the_pil_path(height, width, size):
    rng = np.random.default_rng(height * width)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)  # white noise: the hardest case for clipping
    pixels = to_pixels(image[None]).double()
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = processor_class(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                image_mean=[0.0] * 3, image_std=[1.0] * 3)
    want = processor(images=[image], return_tensors="pt")["pixel_values"][0].double()
    got = pretrained.clip_preprocess(pixels, size, (0.0,) * 3, (1.0,) * 3)[0]
    assert got.shape == want.shape
    assert (got - want).abs().max() <= PIL_MAX_ABS and (got - want).abs().mean() <= PIL_MEAN_ABS
    got = pretrained.letterbox_preprocess(pixels, size, (0.0,) * 3, (1.0,) * 3)[0]
    want = _pil_letterbox(image, size)
    assert (got - want).abs().max() <= PIL_MAX_ABS and (got - want).abs().mean() <= PIL_MEAN_ABS


def test_single_pass_resize_would_miss_the_pil_path():
    """The two clamped passes matter: one unclamped bicubic pass is far from PIL on upscaled noise."""
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    one_pass = torch.nn.functional.interpolate(to_pixels(image[None]).double(), size=(32, 48), mode="bicubic",
                                               antialias=True)[0]
    want = _pil_letterbox(image, 48)[:, 8:40]
    assert (one_pass - want).abs().max() > 5 * PIL_MAX_ABS
    assert (pretrained.pil_bicubic_resize(to_pixels(image[None]).double(), (32, 48))[0] - want).abs().max() <= PIL_MAX_ABS


def test_require_differentiable_names_the_key():
    for good in ("shapeclip", "quality", "clipscore", "pickscore", "aesthetic", "hpsv2", toy.QualityReward(),
                 toy.ShapeCLIPReward):
        require_differentiable(good, "draft.reward")
    with pytest.raises(ConfigError, match=r"draft\.reward: the 'verifier' reward is not differentiable.*shapeclip"):
        require_differentiable("verifier", "draft.reward")
    with pytest.raises(ConfigError, match=r"draft\.reward: the 'imagereward' reward is not differentiable"):
        require_differentiable(pretrained.ImageRewardReward, "draft.reward")
    with pytest.raises(ConfigError, match=r"objective\.reward: unknown reward 'nope'"):
        require_differentiable("nope", "objective.reward")
