"""Reward models behind one interface (base.Reward): build_reward(name) -> reward(images, prompts) -> (B,) scores."""

from fastpref.rewards.base import (
    LAZY_MODULES,
    REWARDS,
    Reward,
    available_rewards,
    build_reward,
    register_reward,
    require_differentiable,
    reward_class,
    to_pixels,
    to_uint8,
)

__all__ = [
    "LAZY_MODULES",
    "REWARDS",
    "Reward",
    "available_rewards",
    "build_reward",
    "register_reward",
    "require_differentiable",
    "reward_class",
    "to_pixels",
    "to_uint8",
]
