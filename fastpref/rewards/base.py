"""The Reward interface shared by every reward model (toy verifier/ShapeCLIP/quality, HPSv2, PickScore, ...).

A reward maps a batch of images and their prompts to one float per image:

    reward = build_reward("shapeclip")               # or SomeReward.from_pretrained(path_or_hub_id)
    scores = reward(images, prompts)                 # torch.float32 (B,), on the images' device

Canonical input: float pixels (B, 3, H, W) in [0, 1] -- what a diffusion decoder yields, and the
only form that can carry gradients. `__call__` also takes uint8 images (B, H, W, 3) as numpy
arrays or tensors (what pipelines, shards and PNGs hold) and converts them with `to_pixels`;
rewards that work on uint8 (the verifier) convert back with `to_uint8`. Subclasses implement
`score(pixels, prompts)` only.

`differentiable` says whether scores carry gradients to the pixels (usable for reward
backpropagation); non-differentiable rewards are evaluated under torch.no_grad.
`require_differentiable(name_or_reward, key)` is the config check of objectives that backpropagate
a reward (DRaFT): a ConfigError naming the key, before any model loads.

The registry maps names to classes. Heavy reward models live in their own modules and register
on import; `build_reward` imports the module named in LAZY_MODULES on first use, so optional
dependencies load only for the rewards asked for.
"""

from __future__ import annotations

import abc
import importlib
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

ImageBatch = torch.Tensor | np.ndarray

# reward name -> module that registers it (imported on first build_reward of that name)
LAZY_MODULES: dict[str, str] = {
    "verifier": "fastpref.rewards.toy",
    "shapeclip": "fastpref.rewards.toy",
    "quality": "fastpref.rewards.toy",
    "random": "fastpref.rewards.random_label",
    "clipscore": "fastpref.rewards.pretrained",
    "pickscore": "fastpref.rewards.pretrained",
    "aesthetic": "fastpref.rewards.pretrained",
    "hpsv2": "fastpref.rewards.pretrained",
    "imagereward": "fastpref.rewards.pretrained",
    "spm": "fastpref.rewards.spm",
}
REWARDS: dict[str, type["Reward"]] = {}


def to_pixels(images: ImageBatch, argument: str = "images") -> torch.Tensor:
    """Any accepted image batch -> float32 (B, 3, H, W) in [0, 1] (float inputs keep their graph).

    Accepted: uint8 (B, H, W, 3) numpy array or tensor; float tensor (B, 3, H, W) in [0, 1];
    float numpy array (B, H, W, 3) in [0, 1] (what diffusers' output_type="np" returns)."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{argument}: numpy images must be (B, H, W, 3), got shape {images.shape}")
        if images.dtype == np.uint8:
            return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0)
        if np.issubdtype(images.dtype, np.floating):
            return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2).clamp(0, 1)
        raise ValueError(f"{argument}: numpy images must be uint8 or float in [0, 1], got dtype {images.dtype}")
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"{argument}: image tensors must be 4-D, got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            if images.shape[-1] != 3:
                raise ValueError(f"{argument}: uint8 tensors must be (B, H, W, 3), got {tuple(images.shape)}")
            return images.permute(0, 3, 1, 2).float().div(255.0)
        if images.is_floating_point():
            if images.shape[1] != 3:
                raise ValueError(f"{argument}: float tensors must be (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
            return images.float()
        raise ValueError(f"{argument}: unsupported tensor dtype {images.dtype}")
    raise ValueError(f"{argument}: expected a numpy array or torch tensor, got {type(images).__name__}")


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3) numpy (no gradient)."""
    return pixels.detach().clamp(0, 1).mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class Reward(abc.ABC):
    """One float score per (image, prompt); higher is better."""

    name: ClassVar[str] = "reward"
    differentiable: ClassVar[bool] = False

    @abc.abstractmethod
    def score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """float (B, 3, H, W) in [0, 1] and B prompts -> float32 (B,)."""

    def __call__(self, images: ImageBatch, prompts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        pixels = to_pixels(images)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(pixels):
            raise ValueError(f"{self.name} reward: {len(pixels)} images but {len(prompts)} prompts")
        step = batch_size or len(pixels) or 1
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.differentiable):
            scores = [self.score(pixels[i : i + step], prompts[i : i + step]) for i in range(0, len(pixels), step)]
        out = torch.cat(scores) if scores else torch.zeros(0)
        if out.shape != (len(pixels),):
            raise RuntimeError(f"{self.name} reward returned shape {tuple(out.shape)} for {len(pixels)} images")
        return out.float()

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | None = None, **kwargs: Any) -> "Reward":
        """Load the reward's weights (None: its default). Rewards without weights take none."""
        if path_or_hub_id is not None:
            raise ValueError(f"{cls.name} reward has no weights to load, got path_or_hub_id={path_or_hub_id!r}")
        return cls(**kwargs)

    def to(self, device: str | torch.device) -> "Reward":
        """Move the reward's model (if any) to `device`; returns self."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, differentiable={self.differentiable})"


def register_reward(cls: type[Reward]) -> type[Reward]:
    """Class decorator: make `cls` buildable by its `name`."""
    existing = REWARDS.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"reward name {cls.name!r} is already registered by {existing.__qualname__}")
    REWARDS[cls.name] = cls
    return cls


def reward_class(name: str) -> type[Reward]:
    if name not in REWARDS and name in LAZY_MODULES:
        importlib.import_module(LAZY_MODULES[name])
    if name not in REWARDS:
        known = sorted(set(REWARDS) | set(LAZY_MODULES))
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(known)}")
    return REWARDS[name]


def build_reward(name: str, path_or_hub_id: str | None = None, **kwargs: Any) -> Reward:
    """The reward registered as `name`, loaded with from_pretrained(path_or_hub_id, **kwargs)."""
    return reward_class(name).from_pretrained(path_or_hub_id, **kwargs)


def available_rewards() -> list[str]:
    return sorted(set(REWARDS) | set(LAZY_MODULES))


def require_differentiable(reward: "Reward | type[Reward] | str", key: str = "reward") -> None:
    """Refuse a reward whose scores carry no gradient to the pixels, for objectives that backpropagate
    through it (DRaFT): a config error naming `key`. Takes a reward, its class or its registry name,
    so a config is checked before any model loads."""
    from fastpref.config import ConfigError

    if isinstance(reward, str):
        try:
            cls = reward_class(reward)
        except ValueError as err:
            raise ConfigError(f"{key}: {err}") from None
    else:
        cls = reward if isinstance(reward, type) else type(reward)
    differentiable = getattr(reward, "differentiable", getattr(cls, "differentiable", False))
    if not differentiable:
        usable = []
        for name in available_rewards():
            try:
                if reward_class(name).differentiable:
                    usable.append(name)
            except Exception:  # an optional reward whose module does not import here is no suggestion
                continue
        raise ConfigError(
            f"{key}: the {cls.name!r} reward is not differentiable (its scores carry no gradient to the pixels), "
            f"so it cannot be backpropagated; differentiable rewards: {', '.join(usable)}"
        )
