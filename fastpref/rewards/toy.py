"""Rewards of the toy world: stand-ins for the real reward models, checkable on a CPU.

- "verifier"  (VerifierReward): 1 if the image satisfies the caption exactly, else 0 (or, with
  partial_credit=True, the fraction of the verifier's checks passed) -- GenEval-like correctness;
- "shapeclip" (ShapeCLIPReward): cosine similarity of ShapeCLIP's image and caption embeddings,
  differentiable -- the CLIP-score / PickScore / HPS stand-in;
- "quality"   (QualityReward): a prompt-blind, differentiable image-quality score (clean flat colors
  plus contrast) -- the aesthetic-predictor stand-in.

Each takes `world=` ("v1" by default, or "v2"; fastpref.toy.world.WORLDS): the verifier reads captions in that
world's grammar, ShapeCLIP loads that world's shipped weights, and quality's palette is that world's colors (v2's
orange / purple / cyan / white would otherwise count as off-palette). `fastpref run` passes the recipe's world
(fastpref.pipeline.recipe_world), so a recipe does not name it per reward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastpref.rewards.base import Reward, register_reward, to_uint8

# the rewards that take `world=` (fastpref.pipeline.recipe_world passes the recipe's): this module's, and the toy
# step-aware preference model (fastpref/rewards/spm.py: its shipped weights per world)
WORLD_REWARDS = ("verifier", "shapeclip", "quality", "spm")


@register_reward
class VerifierReward(Reward):
    """The hand-written verifier as a reward (not differentiable)."""

    name = "verifier"
    differentiable = False

    def __init__(self, partial_credit: bool = False, strict: bool = True, world: str = "v1"):
        from fastpref.toy import verifier
        from fastpref.toy.world import get_world

        self._verifier = verifier
        self.partial_credit = partial_credit
        self.config = verifier.VerifierConfig(strict=strict)
        self.world = get_world(world).name

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from fastpref.toy.world import parse_caption

        # a caption outside the world's grammar is an error naming the caption and the word, never a 0
        specs = [parse_caption(prompt, self.world) for prompt in prompts]
        results = self._verifier.verify_batch(to_uint8(pixels), specs, self.config)
        values = [r.score if self.partial_credit else float(r.passed) for r in results]
        return torch.tensor(values, dtype=torch.float32, device=pixels.device)


@register_reward
class ShapeCLIPReward(Reward):
    """Cosine similarity in ShapeCLIP's space, in [-1, 1]; gradients reach the pixels.

    contrastive=True scores instead the probability ShapeCLIP gives the caption against every caption one
    attribute away from it (fastpref.toy.world.one_attribute_variants: another shape, color, count, relation or
    order), softmax at ShapeCLIP's logit scale, in [0, 1]. The cosine saturates on a good base (world v2's base
    images score ~0.8 whatever their mistakes), while the probability stays low exactly where an attribute is
    wrong: a differentiable stand-in for the verifier."""

    name = "shapeclip"
    differentiable = True

    def __init__(self, model=None, world: str = "v1", contrastive: bool = False):
        from fastpref.toy import shapeclip, world as toy_world

        self.world = toy_world.get_world(world).name
        self.model = model if model is not None else shapeclip.load_shipped(world_name=self.world)
        self.model.eval().requires_grad_(False)
        if not isinstance(contrastive, bool):
            raise ValueError(f"shapeclip reward: contrastive must be true or false, got {contrastive!r}")
        self.contrastive = contrastive
        self._candidates: dict[str, list[str]] = {}  # prompt -> [prompt, its one-attribute variants]

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path | None = None, **kwargs: Any) -> "ShapeCLIPReward":
        """None: the weights shipped for `world` (fastpref/toy/weights/shapeclip, shapeclip-v2); else a
        save_pretrained folder, which must know every word of `world`."""
        from fastpref.toy import shapeclip
        from fastpref.toy.world import get_world, vocabulary

        if path_or_hub_id is None:
            return cls(None, **kwargs)
        path = Path(path_or_hub_id)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"shapeclip reward: {path} has no config.json (not a ShapeCLIP save_pretrained folder)")
        model = shapeclip.ShapeCLIP.from_pretrained(path)
        world_name = get_world(kwargs.get("world", "v1")).name
        missing = sorted(set(vocabulary(world_name)) - set(model.words))
        if missing:
            raise ValueError(f"shapeclip reward: {path} lacks world {world_name}'s words {missing}: it was trained on "
                             f"another world (set the reward's world to the one of its weights)")
        return cls(model, **kwargs)

    def to(self, device: str | torch.device) -> "ShapeCLIPReward":
        self.model.to(device)
        return self

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        if not self.contrastive:
            return self.model.similarity(pixels.to(device), prompts).to(pixels.device)
        if len(pixels) != len(prompts):
            raise ValueError(f"shapeclip reward: {len(pixels)} images but {len(prompts)} prompts")
        rows = [self._candidate_captions(prompt) for prompt in prompts]
        captions = sorted({c for row in rows for c in row})
        index = {c: i for i, c in enumerate(captions)}
        with torch.no_grad():  # the text side is frozen and shared by the batch
            text = self.model.encode_text(captions)
        logits = self.model.logit_scale.exp().clamp(max=100.0) * self.model.encode_images(pixels.to(device)) @ text.T
        probabilities = []
        for i, row in enumerate(rows):
            # the prompt first: its probability among the candidates of its own row
            probabilities.append(logits[i, [index[c] for c in row]].softmax(dim=0)[0])
        return torch.stack(probabilities).to(pixels.device)

    def _candidate_captions(self, prompt: str) -> list[str]:
        if prompt not in self._candidates:
            from fastpref.toy.world import one_attribute_variants, parse_caption

            spec = parse_caption(prompt, self.world)
            self._candidates[prompt] = [spec.caption] + [v.caption for v in one_attribute_variants(spec)]
        return self._candidates[prompt]


@register_reward
class QualityReward(Reward):
    """Prompt-blind quality of toy images, differentiable, about 1.2 for a clean render:

        quality = fidelity + contrast_weight * contrast
        fidelity = 1 - mean over pixels of soft-min distance to the nearest palette or background
                   color (RGB in [0, 1], divided by sqrt(3)): blur, noise and color casts lower it;
        contrast = std of the luminance over the image: an empty canvas scores low.

    Like a real aesthetic predictor it says nothing about whether the image matches the prompt.
    """

    name = "quality"
    differentiable = True

    def __init__(self, contrast_weight: float = 1.0, temperature: float = 0.02, world: str = "v1"):
        from fastpref.toy import world as toy_world

        self.world = toy_world.get_world(world).name
        colors = [*toy_world.get_world(world).colors.values(), toy_world.BACKGROUND]
        self.palette = torch.tensor(colors, dtype=torch.float32) / 255.0  # (K, 3)
        self.contrast_weight = contrast_weight
        self.temperature = temperature
        self.luma = torch.tensor([0.299, 0.587, 0.114])

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        palette = self.palette.to(pixels.device, pixels.dtype)
        flat = pixels.permute(0, 2, 3, 1).reshape(len(pixels), -1, 1, 3)  # (B, P, 1, 3)
        distance = ((flat - palette).square().sum(-1) + 1e-8).sqrt()  # (B, P, K)
        soft_min = -self.temperature * torch.logsumexp(-distance / self.temperature, dim=-1)
        fidelity = 1.0 - soft_min.clamp(min=0).mean(1) / 3**0.5
        luminance = (pixels * self.luma.to(pixels.device, pixels.dtype)[None, :, None, None]).sum(1)
        contrast = luminance.flatten(1).std(1)
        return fidelity + self.contrast_weight * contrast
