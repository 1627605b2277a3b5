"""ShapeCLIP: a tiny CLIP-style image-text model of the toy world, the stand-in for CLIP-like rewards.

Image tower: four 3x3 convolutions (GroupNorm + GELU, three of them stride 2) and an MLP of the
flattened 4x4 feature map, so positions survive (relations need them). Text tower: a 2-layer
transformers.CLIPTextModel over the toy world's word-level CLIPTokenizer (fastpref.toy.tokenizer),
pooled at the end-of-text token. Both are projected to a shared embedding and trained with CLIP's
symmetric contrastive loss.

Training data (fresh every step, no epochs): images rendered by the world for captions of *both*
splits -- ShapeCLIP plays a pretrained reward model, which has seen the whole world, unlike the
diffusion models whose compositional generalization the held-out split measures. Half of the
images are degraded (world.degrade: blur, color shift, noise) so that scores stay meaningful on
generated images. Each image also brings two hard-negative captions (world.one_attribute_variants;
for position captions the second one keeps the objects and changes the relation or their order),
and every caption that is *true* of an image counts as its positive (verifier.check_objects on
the ground-truth objects), not only the caption it was rendered from.

    python -m fastpref.toy.shapeclip --out fastpref/toy/weights/shapeclip --minutes 6 --seed 0

Weights are saved with save_pretrained (config.json + model.safetensors, huggingface_hub's
PyTorchModelHubMixin) and loaded with ShapeCLIP.from_pretrained(dir), offline.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastpref.toy import verifier, world
from fastpref.utils.imports import require

SHIPPED_WEIGHTS = Path(__file__).parent / "weights" / "shapeclip"
SHIPPED_WEIGHTS_BY_WORLD = {"v1": SHIPPED_WEIGHTS, "v2": SHIPPED_WEIGHTS.with_name("shapeclip-v2")}
NUM_NEGATIVES = 7  # hard negatives per image in hard_negative_accuracy (chance = 1/8)


def _hub_mixin():
    return require("huggingface_hub", "ShapeCLIP save_pretrained / from_pretrained").PyTorchModelHubMixin


class ShapeCLIP(nn.Module, _hub_mixin()):
    """Embeds images (float (B, 3, H, W) in [0, 1]) and captions into one unit-norm space."""

    def __init__(
        self,
        words: Sequence[str] | None = None,
        max_length: int = 16,
        embed_dim: int = 64,
        conv_channels: Sequence[int] = (32, 64, 96, 96),
        image_hidden: int = 96,
        text_hidden: int = 64,
        text_layers: int = 2,
        text_heads: int = 4,
        image_size: int = world.IMAGE_SIZE,
    ):
        super().__init__()
        transformers = require("transformers", "ShapeCLIP's text tower")
        from fastpref.toy.tokenizer import build_tokenizer

        self.words = sorted(words if words is not None else world.vocabulary())
        self.image_size = image_size
        self.tokenizer = build_tokenizer(self.words, max_length=max_length)
        self._token_cache: dict[str, list[int]] = {}

        layers: list[nn.Module] = []
        in_channels = 3
        for i, channels in enumerate(conv_channels):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(in_channels, channels, 3, stride, 1), nn.GroupNorm(8, channels), nn.GELU()]
            in_channels = channels
        self.conv = nn.Sequential(*layers)
        side = image_size // 2 ** (len(conv_channels) - 1)
        self.image_head = nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * side * side, image_hidden), nn.GELU(), nn.Linear(image_hidden, embed_dim)
        )
        text_config = transformers.CLIPTextConfig(
            vocab_size=len(self.tokenizer),
            hidden_size=text_hidden,
            intermediate_size=2 * text_hidden,
            num_hidden_layers=text_layers,
            num_attention_heads=text_heads,
            max_position_embeddings=max_length,
            bos_token_id=self.tokenizer.bos_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        self.text_model = transformers.CLIPTextModel(text_config)
        self.text_projection = nn.Linear(text_hidden, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    # -- towers -----------------------------------------------------------------------------

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), padded to the longest caption. Unknown words raise."""
        ids = []
        for caption in captions:
            if caption not in self._token_cache:
                unknown = [w for w in caption.lower().split() if w not in self.words]
                if unknown:
                    raise ValueError(f"ShapeCLIP: caption {caption!r} has words outside the vocabulary: {unknown}")
                self._token_cache[caption] = self.tokenizer(caption, truncation=True)["input_ids"]
            ids.append(self._token_cache[caption])
        length = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        return input_ids, attention_mask

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """float (B, 3, H, W) in [0, 1] -> unit (B, embed_dim); other sizes are resized."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"ShapeCLIP.encode_images: images must be (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        features = self.conv(images * 2.0 - 1.0)
        return F.normalize(self.image_head(features), dim=-1)

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """captions -> unit (B, embed_dim)."""
        input_ids, attention_mask = self.tokenize(captions)
        device = self.text_projection.weight.device
        out = self.text_model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        return F.normalize(self.text_projection(out.pooler_output), dim=-1)

    def forward(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """(B_images, B_captions) logits: logit_scale x cosine similarity."""
        scale = self.logit_scale.exp().clamp(max=100.0)
        return scale * self.encode_images(images) @ self.encode_text(captions).T

    def similarity(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """(B,) cosine similarity of each image with its own caption (differentiable in images)."""
        if len(images) != len(captions):
            raise ValueError(f"ShapeCLIP.similarity: {len(images)} images but {len(captions)} captions")
        return (self.encode_images(images) * self.encode_text(captions)).sum(-1)


def uint8_to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0)


def load_shipped(device: str | torch.device = "cpu", world_name: str = "v1") -> ShapeCLIP:
    """The weights shipped for `world_name` (fastpref/toy/weights/shapeclip, shapeclip-v2), in eval mode."""
    folder = SHIPPED_WEIGHTS_BY_WORLD.get(world.get_world(world_name).name)
    if folder is None or not (folder / "config.json").is_file():
        raise FileNotFoundError(f"ShapeCLIP: no shipped weights for world {world_name!r} in {folder}")
    return ShapeCLIP.from_pretrained(folder).to(device).eval()


# ---------------------------------------------------------------------------------------------
# Data


def _sample_any_spec(rng: np.random.Generator, world_name: str = "v1") -> world.PromptSpec:
    return world.sample_spec(rng, "train" if rng.random() < 0.5 else "eval", world_name)


def _signature(spec_or_objects) -> tuple[str, ...]:
    """Sorted shapes: a caption can only be true of an image with the same multiset of shapes."""
    if isinstance(spec_or_objects, world.PromptSpec):
        return tuple(sorted(g.shape for g in spec_or_objects.groups for _ in range(g.count)))
    return tuple(sorted(o.shape for o in spec_or_objects))


def truth_matrix(scenes: Sequence[Sequence[world.PlacedObject]], specs: Sequence[world.PromptSpec]) -> np.ndarray:
    """(len(scenes), len(specs)) bool: is caption j true of ground-truth scene i."""
    spec_signatures = [_signature(s) for s in specs]
    truth = np.zeros((len(scenes), len(specs)), dtype=bool)
    for i, objects in enumerate(scenes):
        signature = _signature(objects)
        for j, spec in enumerate(specs):
            if spec_signatures[j] == signature:
                truth[i, j] = all(verifier.check_objects(spec, objects).values())
    return truth


def training_batch(
    rng: np.random.Generator, batch_size: int, degrade_fraction: float = 0.5, negatives_per_image: int = 2,
    world_name: str = "v1",
):
    """images uint8 (B, 32, 32, 3), texts (B positives, then negatives_per_image x B hard negatives),
    positive (B, len(texts)) bool."""
    specs = [_sample_any_spec(rng, world_name) for _ in range(batch_size)]
    images = np.empty((batch_size, world.IMAGE_SIZE, world.IMAGE_SIZE, 3), dtype=np.uint8)
    scenes = []
    for i, spec in enumerate(specs):
        images[i], objects = world.render_scene(spec, rng)
        scenes.append(objects)
        if rng.random() < degrade_fraction:
            images[i] = world.degrade(
                images[i], rng, blur_sigma=rng.uniform(0.0, 1.0), color_shift=20.0, noise=rng.uniform(0.0, 10.0)
            )
    negatives = []
    for round_ in range(negatives_per_image):
        for spec in specs:
            variants = world.one_attribute_variants(spec)
            if round_ % 2 == 1 and spec.relation is not None:
                # same objects, other relation or order: only word order and relation words tell
                # these apart, and they are a small share of a position caption's variants
                variants = [v for v in variants if set(v.groups) == set(spec.groups)]
            negatives.append(variants[int(rng.integers(len(variants)))] if variants
                             else _sample_any_spec(rng, world_name))
    text_specs = specs + negatives
    return images, [s.caption for s in text_specs], truth_matrix(scenes, text_specs)


def contrastive_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric loss with several positives per row: cross-entropy against the uniform
    distribution over the positives. logits and positive are (B_images, B_texts); texts without
    a positive image (hard negatives) only enter the image->text direction."""
    positive = positive.to(logits.dtype)
    image_to_text = -(positive * logits.log_softmax(dim=1)).sum(1) / positive.sum(1)
    has_image = positive.sum(0) > 0
    text_to_image = -(positive * logits.log_softmax(dim=0)).sum(0)[has_image] / positive.sum(0)[has_image]
    return 0.5 * (image_to_text.mean() + text_to_image.mean())


# ---------------------------------------------------------------------------------------------
# Evaluation


def hard_negative_set(spec: world.PromptSpec, objects, rng: np.random.Generator, k: int = NUM_NEGATIVES) -> list:
    """k captions false of the scene (in the spec's world): one-attribute variants first, then random specs."""
    candidates = [v for v in world.one_attribute_variants(spec) if not truth_matrix([objects], [v])[0, 0]]
    rng.shuffle(candidates)
    negatives = candidates[:k]
    while len(negatives) < k:
        other = _sample_any_spec(rng, spec.world)
        if other not in negatives and other != spec and not truth_matrix([objects], [other])[0, 0]:
            negatives.append(other)
    return negatives


@torch.no_grad()
def hard_negative_accuracy(
    model: ShapeCLIP, num_images: int = 400, seed: int = 1234, degrade: bool = False, world_name: str = "v1"
) -> dict:
    """Share of ground-truth images (both splits) whose true caption outscores all of
    NUM_NEGATIVES hard negatives (chance = 1 / (1 + NUM_NEGATIVES)), overall and per category."""
    rng = np.random.default_rng(seed)
    specs, images, candidates = [], [], []
    for _ in range(num_images):
        spec = _sample_any_spec(rng, world_name)
        image, objects = world.render_scene(spec, rng)
        specs.append(spec)
        images.append(world.degrade(image, rng) if degrade else image)
        candidates.append([spec.caption] + [s.caption for s in hard_negative_set(spec, objects, rng)])
    was_training = model.training
    model.eval()
    vocabulary = sorted({c for row in candidates for c in row})
    image_embeddings = model.encode_images(uint8_to_float(np.stack(images)))
    text_embeddings = dict(zip(vocabulary, model.encode_text(vocabulary)))
    model.train(was_training)
    hits: dict[str, list[bool]] = {c: [] for c in world.CATEGORIES}
    for spec, image_embedding, row in zip(specs, image_embeddings, candidates):
        similarity = torch.stack([text_embeddings[c] for c in row]) @ image_embedding
        hits[spec.category].append(bool(similarity[0] > similarity[1:].max()))
    per_category = {c: float(np.mean(v)) for c, v in hits.items() if v}
    overall = float(np.mean([h for v in hits.values() for h in v]))
    return {"accuracy": overall, "per_category": per_category, "chance": 1 / (1 + NUM_NEGATIVES), "num_images": num_images}


# ---------------------------------------------------------------------------------------------
# Training


def train_shapeclip(
    out: str | Path | None,
    minutes: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    threads: int = 1,
    progress: bool = True,
    eval_images: int = 400,
    model_kwargs: dict | None = None,
    world_name: str = "v1",
) -> tuple[ShapeCLIP, dict]:
    """Train ShapeCLIP for `minutes` (the step count is fixed from the first steps' speed and
    recorded) or exactly `steps`; save it and metrics.json to `out` (unless None)."""
    from fastpref.toy.pretrain import StepBudget, optimizer_steps

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    # the vocabulary goes into config.json, so the saved weights describe their own tokenizer
    model = ShapeCLIP(**{"words": world.vocabulary(world_name), **(model_kwargs or {})})
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    budget = StepBudget(steps, minutes)

    def next_loss() -> torch.Tensor:
        images, texts, positive = training_batch(rng, batch_size, world_name=world_name)
        return contrastive_loss(model(uint8_to_float(images), texts), torch.from_numpy(positive))

    losses: list[float] = []
    step = 0
    for step in optimizer_steps(budget, optimizer, list(model.parameters()), next_loss, losses, base_lr=lr, warmup=100,
                                desc="shapeclip", progress=progress, show_loss_every=50, loss_digits=3):
        pass  # nothing to do between steps (no EMA, no checkpoints)
    model.eval()
    metrics = {
        "world": world_name,
        "seed": seed,
        "steps": step,
        "batch_size": batch_size,
        "lr": lr,
        "threads": threads,
        "train_minutes": round(budget.elapsed_minutes(), 2),
        "final_loss": float(np.mean(losses[-50:])),
        "parameters": sum(p.numel() for p in model.parameters()),
        "hard_negative_accuracy": hard_negative_accuracy(model, eval_images, world_name=world_name),
        "hard_negative_accuracy_degraded": hard_negative_accuracy(model, eval_images, degrade=True,
                                                                  world_name=world_name),
    }
    if out is not None:
        out = Path(out)
        model.save_pretrained(out)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return model, metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastpref.toy.shapeclip", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for config.json, model.safetensors, metrics.json")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="training budget in minutes (the step count is recorded)")
    budget.add_argument("--steps", type=int, help="exact number of steps (reruns a recorded schedule)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the CPU is shared)")
    parser.add_argument("--eval-images", type=int, default=400)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--world", default="v1", choices=sorted(world.WORLDS), help="the toy world (v1 | v2)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    _, metrics = train_shapeclip(
        args.out,
        minutes=args.minutes,
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        threads=args.threads,
        progress=not args.no_progress,
        eval_images=args.eval_images,
        world_name=args.world,
    )
    metrics["wall_minutes"] = round((time.perf_counter() - started) / 60, 2)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
