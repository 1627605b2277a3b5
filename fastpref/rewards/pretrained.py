"""Published reward models behind the Reward interface; their libraries are imported only when one is loaded.

    clipscore    CLIP image-text cosine * 100, clamped at 0 (torchmetrics' CLIPScore); openai/clip-vit-large-patch14
    pickscore    PickScore v1 (a CLIP-H fine-tuned on Pick-a-Pic): logit_scale * cosine; yuvalkirstain/PickScore_v1
    aesthetic    LAION improved aesthetic predictor: an MLP on normalized CLIP ViT-L/14 image embeddings
                 (weights file sac+logos+ava1-l14-linearMSE.pth, passed as mlp_path=...)
    hpsv2        HPSv2.1 (an OpenCLIP ViT-H-14 fine-tuned on HPD v2): cosine; HPS_v2.1_compressed.pt converted to a
                 transformers CLIPModel (fastpref.rewards.openclip_convert), no open_clip needed
    imagereward  ImageReward v1.0 through the image-reward package (which does not import with transformers 5)

The CLIP-based ones run on transformers' CLIPModel and preprocess in torch (resize, center crop, normalize), so
their scores are differentiable with respect to the pixels; the resize reproduces PIL's bicubic (the reference
processors' path) to within 0.004 in [0, 1] pixel units (pil_bicubic_resize).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from fastpref.rewards.base import Reward, register_reward, to_uint8
from fastpref.utils.imports import require


# Differentiable preprocessing vs the PIL path of the reference processors (transformers' CLIPImageProcessorPil,
# open_clip's ResizeMaxSize on PIL images): on uint8 inputs of any size the two differ by at most 0.004 in [0, 1]
# pixel units (about 1/255: PIL rounds to uint8 after each pass) and 0.0013 on average (tests/rewards).


def pil_bicubic_resize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL's bicubic resize (Image.resize(..., BICUBIC)) in differentiable torch ops: antialiased bicubic (a=-0.5,
    PIL's kernel and support), horizontal pass then vertical, each clamped to [0, 1] as PIL clips to uint8 after
    each pass (one pass with a single clamp was 0.07 off PIL on upscaled noise)."""
    height, width = pixels.shape[-2:]
    if width != size[1]:
        pixels = F.interpolate(pixels, size=(height, size[1]), mode="bicubic", align_corners=False, antialias=True)
        pixels = pixels.clamp(0.0, 1.0)
    if height != size[0]:
        pixels = F.interpolate(pixels, size=tuple(size), mode="bicubic", align_corners=False, antialias=True)
        pixels = pixels.clamp(0.0, 1.0)
    return pixels


def clip_preprocess(pixels: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> CLIP input: shortest side resized to `size` (bicubic), center crop, normalize."""
    height, width = pixels.shape[-2:]
    if min(height, width) != size:
        short, long = min(height, width), max(height, width)
        new_long = int(size * long / short)  # truncation, as transformers' get_resize_output_image_size
        new = (size, new_long) if height <= width else (new_long, size)
        pixels = pil_bicubic_resize(pixels, new)
    top, left = (pixels.shape[-2] - size) // 2, (pixels.shape[-1] - size) // 2
    pixels = pixels[..., top : top + size, left : left + size]
    mean = torch.tensor(mean, device=pixels.device, dtype=pixels.dtype)[None, :, None, None]
    std = torch.tensor(std, device=pixels.device, dtype=pixels.dtype)[None, :, None, None]
    return (pixels - mean) / std


def _features(output) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output holds the projected features; 4.x a tensor
    return output.pooler_output if hasattr(output, "pooler_output") else output


class CLIPReward(Reward):
    """A transformers CLIPModel scoring (image, prompt) pairs; subclasses set the defaults and the scale."""

    differentiable = True
    default_model: ClassVar[str] = ""
    default_processor: ClassVar[str | None] = None  # where tokenizer / preprocessing config live, if elsewhere

    def __init__(self, model, tokenizer, image_size: int, mean, std):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.image_size, self.mean, self.std = tokenizer, image_size, tuple(mean), tuple(std)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path | None = None, processor: str | None = None, **kwargs: Any):
        transformers = require("transformers", f"the {cls.name} reward")
        path = str(path_or_hub_id or cls.default_model)
        processor = processor or (cls.default_processor if path_or_hub_id is None else None) or path
        try:
            model = transformers.CLIPModel.from_pretrained(path)
            tokenizer = transformers.AutoTokenizer.from_pretrained(processor)
            image_processor = transformers.AutoImageProcessor.from_pretrained(processor)
        except OSError as err:
            raise OSError(f"{cls.name} reward: cannot load CLIP weights / processor from {path!r} ({err})") from err
        crop = image_processor.crop_size
        size = crop["height"] if isinstance(crop, dict) else crop.height
        return cls(model, tokenizer, size, image_processor.image_mean, image_processor.image_std, **kwargs)

    def to(self, device):
        self.model.to(device)
        return self

    def cosine(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        images = clip_preprocess(pixels.to(device), self.image_size, self.mean, self.std)
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(device)
        image = F.normalize(_features(self.model.get_image_features(pixel_values=images)), dim=-1)
        text = F.normalize(_features(self.model.get_text_features(**tokens)), dim=-1)
        return (image * text).sum(-1)


@register_reward
class CLIPScoreReward(CLIPReward):
    name = "clipscore"
    default_model = "openai/clip-vit-large-patch14"

    def score(self, pixels, prompts):
        return (100.0 * self.cosine(pixels, prompts)).clamp(min=0).to(pixels.device)


@register_reward
class PickScoreReward(CLIPReward):
    name = "pickscore"
    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def score(self, pixels, prompts):
        return (self.model.logit_scale.exp() * self.cosine(pixels, prompts)).to(pixels.device)


def aesthetic_mlp(embed_dim: int = 768) -> torch.nn.Sequential:
    """The improved-aesthetic-predictor head; its state-dict keys (layers.N.*) match the published .pth file."""
    layers = torch.nn.Sequential(
        torch.nn.Linear(embed_dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
    )
    wrapper = torch.nn.Module()
    wrapper.layers = layers
    return wrapper


@register_reward
class AestheticReward(CLIPReward):
    """LAION aesthetic score (about 1-10), prompt-blind."""

    name = "aesthetic"
    default_model = "openai/clip-vit-large-patch14"

    def __init__(self, model, tokenizer, image_size, mean, std, mlp_path: str | None = None, mlp=None):
        super().__init__(model, tokenizer, image_size, mean, std)
        if mlp is None:
            if mlp_path is None:
                raise ValueError("aesthetic reward: pass mlp_path=... (sac+logos+ava1-l14-linearMSE.pth)")
            mlp = aesthetic_mlp(model.config.projection_dim)
            state = _load_state_dict(mlp_path)
            mlp.load_state_dict(state)
        self.mlp = mlp.eval().requires_grad_(False)

    def to(self, device):
        self.mlp.to(device)
        return super().to(device)

    def score(self, pixels, prompts):
        device = next(self.model.parameters()).device
        images = clip_preprocess(pixels.to(device), self.image_size, self.mean, self.std)
        embeds = F.normalize(_features(self.model.get_image_features(pixel_values=images)), dim=-1)
        return self.mlp.layers(embeds).squeeze(-1).to(pixels.device)


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"reward weights {path}: not found")
    if str(path).endswith(".safetensors"):
        return require("safetensors.torch", "loading reward weights").load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


# OpenAI CLIP normalization (open_clip's OPENAI_DATASET_MEAN / _STD), used by HPSv2
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def letterbox_preprocess(pixels: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> longest side resized to `size` (bicubic), centered on a black size x size canvas,
    normalized: HPSv2's evaluation transform (open_clip ResizeMaxSize with fill 0, applied after ToTensor)."""
    height, width = pixels.shape[-2:]
    scale = size / max(height, width)
    new = (round(height * scale), round(width * scale))
    if new != (height, width):
        pixels = pil_bicubic_resize(pixels, new)
    pad_h, pad_w = size - new[0], size - new[1]
    if pad_h or pad_w:
        pixels = F.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    mean = torch.tensor(mean, device=pixels.device, dtype=pixels.dtype)[None, :, None, None]
    std = torch.tensor(std, device=pixels.device, dtype=pixels.dtype)[None, :, None, None]
    return (pixels - mean) / std


@register_reward
class HPSv2Reward(Reward):
    """HPSv2.1: cosine of OpenCLIP ViT-H-14 embeddings after HPS fine-tuning (scores about 0.2-0.35).

    The open_clip checkpoint is converted to a transformers CLIPModel (fastpref.rewards.openclip_convert; no
    open_clip needed). The score is HPSv2's own: hpsv2.score runs the open_clip model with output_dict=True, whose
    image_features / text_features are L2-normalized, and returns diag(image_features @ text_features.T) -- the
    plain cosine, without logit_scale. Images go through HPSv2's evaluation transform (light_augmentation=True:
    longest side to 224 bicubic, black padding to a square, OpenAI CLIP mean/std; `resize="crop"` gives open_clip's
    default resize-shortest + center crop instead; both agree on square images). Text: the OpenAI CLIP BPE
    (transformers CLIPTokenizer), bos + at most 75 tokens + eos, like open_clip's tokenizer at context length 77.
    Known differences from the reference: hpsv2 runs under CUDA autocast (fp16) and resizes PIL images with
    torchvision; here everything runs in `dtype` (float32 by default) and resizes with pil_bicubic_resize
    (within 0.004 of PIL's uint8 result, differentiable).
    """

    name = "hpsv2"
    differentiable = True
    default_tokenizer: ClassVar[str] = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # HPSv2's base model (OpenAI BPE)

    def __init__(self, model, tokenizer, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, image_size: int | None = None,
                 resize: str = "letterbox"):
        if resize not in ("letterbox", "crop"):
            raise ValueError(f"hpsv2 reward: resize must be 'letterbox' or 'crop', got {resize!r}")
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.mean, self.std, self.resize = tuple(mean), tuple(std), resize
        self.image_size = image_size or model.config.vision_config.image_size
        self.context_length = model.config.text_config.max_position_embeddings

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path | None = None, tokenizer: Any = None,
                        dtype: torch.dtype = torch.float32, vision_heads: int | None = None,
                        text_heads: int | None = None, hidden_act: str = "gelu", **kwargs: Any) -> "HPSv2Reward":
        """path_or_hub_id: the open_clip checkpoint (HPS_v2.1_compressed.pt from the xswu/HPSv2 hub repo, or a
        .safetensors of the same state dict); tokenizer: a CLIPTokenizer, a local folder or a hub id (default
        laion/CLIP-ViT-H-14-laion2B-s32B-b79K; openai/clip-vit-large-patch14 has the same vocabulary)."""
        if path_or_hub_id is None:
            raise ValueError("hpsv2 reward: pass the path of HPS_v2.1_compressed.pt (from the xswu/HPSv2 hub repo)")
        transformers = require("transformers", "the hpsv2 reward")
        from fastpref.rewards import openclip_convert

        state = openclip_convert.load_openclip_state_dict(path_or_hub_id)  # first: a wrong path fails fast
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            where = str(tokenizer or cls.default_tokenizer)
            try:
                tokenizer = transformers.CLIPTokenizer.from_pretrained(where)
            except OSError as err:
                raise OSError(f"hpsv2 reward: cannot load the CLIP tokenizer from {where!r} ({err})") from err
            if len(tokenizer) <= 2:  # transformers 5 returns an empty tokenizer when no vocabulary file was found
                raise OSError(f"hpsv2 reward: no CLIP tokenizer vocabulary found at {where!r}")
        model = openclip_convert.openclip_to_transformers(
            state, tokenizer, source=str(path_or_hub_id), dtype=dtype, vision_heads=vision_heads,
            text_heads=text_heads, hidden_act=hidden_act,
        )
        return cls(model, tokenizer, **kwargs)

    def to(self, device):
        self.model.to(device)
        return self

    def features(self, pixels: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalized (image, text) embeddings, (B, D) each, in the model's dtype."""
        parameter = next(self.model.parameters())
        pixels = pixels.to(parameter.device, parameter.dtype)
        preprocess = letterbox_preprocess if self.resize == "letterbox" else clip_preprocess
        images = preprocess(pixels, self.image_size, self.mean, self.std)
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.context_length,
                                return_tensors="pt").to(parameter.device)
        image = F.normalize(_features(self.model.get_image_features(pixel_values=images)), dim=-1)
        text = F.normalize(_features(self.model.get_text_features(**tokens)), dim=-1)
        return image, text

    def score(self, pixels, prompts):
        image, text = self.features(pixels, prompts)
        return (image * text).sum(-1).to(pixels.device)


@register_reward
class ImageRewardReward(Reward):
    """ImageReward v1.0 (BLIP-based) through the image-reward package; not differentiable through its API."""

    name = "imagereward"
    differentiable = False

    def __init__(self, model):
        self.model = model

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path | None = None, **kwargs: Any) -> "ImageRewardReward":
        try:
            image_reward = require("ImageReward", "the imagereward reward (pip install image-reward)")
        except ImportError as err:
            raise ImportError(
                f"{err}. Note: image-reward 1.5 pins timm 0.6.13, needs an undeclared 'clip' package and fails to "
                "import against transformers >= 5; use it in a separate environment with transformers 4.x"
            ) from err
        return cls(image_reward.load(str(path_or_hub_id or "ImageReward-v1.0"), **kwargs))

    def to(self, device):
        self.model.to(device)
        self.model.device = device
        return self

    def score(self, pixels, prompts):
        pil = require("PIL.Image")
        images = [pil.fromarray(image) for image in to_uint8(pixels)]
        scores = [float(self.model.score(prompt, [image])) for prompt, image in zip(prompts, images)]
        return torch.tensor(scores, dtype=torch.float32, device=pixels.device)
