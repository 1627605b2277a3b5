"""The `random` reward: a seeded score per (image, prompt) that knows nothing of either — the control of the
RankDPO paper's ablations (labels from no signal at all).

The score is a pure function of (seed, prompt, image bytes), so labelling reproduces exactly whatever the batch
size, the shard layout or the order in which the images are scored.
"""

from __future__ import annotations

import hashlib

import torch

from fastpref.rewards.base import Reward, register_reward, to_uint8


@register_reward
class RandomReward(Reward):
    name = "random"
    differentiable = False

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        images = to_uint8(pixels)
        values = []
        for image, prompt in zip(images, prompts):
            digest = hashlib.sha256(f"{self.seed}\0{prompt}\0".encode() + image.tobytes()).digest()
            values.append(int.from_bytes(digest[:8], "little") / 2.0**64)  # uniform in [0, 1)
        return torch.tensor(values, dtype=torch.float32, device=pixels.device)
