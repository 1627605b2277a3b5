"""MiniGenEval: GenEval on the toy world -- held-out prompts, N seeds each, scored by the verifier.

    from fastpref.eval.minigeneval import evaluate, DiffusersGenerate
    result = evaluate(DiffusersGenerate.from_pretrained("fastpref/toy/weights/toy-sd"))
    result.overall, result.per_category

`generate(captions: list[str], seeds: list[int]) -> uint8 (B, H, W, 3)` is any text-to-image
callable; image i must depend only on (captions[i], seeds[i]) so that results do not depend on
batching. Scores follow GenEval: an image is correct if the verifier accepts it, a category's
accuracy is the mean over its images, and `overall` is the unweighted mean of the six category
accuracies (the "category mean"; v1's categories hold 1 to 240 held-out prompts, so one prompt can
carry a sixth of it). `prompt_mean()` weighs every prompt equally (each prompt's mean over its seeds).

Two models evaluated on the same prompts and seeds are compared with `paired_bootstrap`: a 95%
interval of the difference, resampling prompts and, within each drawn prompt, its seeds, with a fixed
bootstrap seed so that it reproduces. `verdict` turns it into "better than X: interval above zero" or
"not shown" -- the rule `fastpref run`'s report and the demo use.

Prompts: world.eval_prompts() (held out from pretraining captions), at most
`max_prompts_per_category` per category picked evenly through each category's list (fixed, so
every model sees the same prompts), each with seeds `seed_offset + 0 .. seeds_per_prompt - 1`
(more for categories with few prompts: see `min_images_per_category`). Defaults: 34 prompts,
144 images.

Noise (`noise`): "shared" (the default, every recorded result) gives every prompt the same seeds, so
an evaluation seed starts all prompts from one noise and its per-seed score moves with it as a whole;
"per_prompt" gives each prompt its own seeds (image_seed), as GenEval's own script draws fresh noise
for every prompt: an evaluation seed's score then averages independent noises, and its spread over
evaluation seeds measures the evaluation's own noise, not one noise's luck.

CLI (also `fastpref eval`):

    python -m fastpref.eval.minigeneval --model fastpref/toy/weights/toy-sd --model world \\
        --out outputs/minigeneval --seeds 4

writes <out>/<model name>.json per model, <out>/summary.json and <out>/grid.png (same prompts and
seeds in every row). `--model world` is the renderer itself: the accuracy ceiling.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fastpref.toy import verifier, world
from fastpref.utils.imports import require
from fastpref.utils.stats import sample_std

Generate = Callable[[list[str], list[int]], np.ndarray]
WORLD_MODEL = "world"


@dataclass
class Sample:
    caption: str
    category: str
    seed: int
    passed: bool
    checks: dict[str, bool]


@dataclass
class MiniGenEvalResult:
    overall: float
    per_category: dict[str, float]
    num_images: int
    settings: dict[str, Any]
    samples: list[Sample]
    images: np.ndarray | None = field(default=None, repr=False)  # (N, H, W, 3) uint8, samples' order
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("images")
        data["seed_scores"] = self.seed_scores()
        data["seed_spread"] = self.seed_spread()
        data["prompt_mean"] = self.prompt_mean()
        return data

    def prompt_outcomes(self) -> dict[str, dict[int, bool]]:
        """caption -> {seed: passed}, prompts in evaluation order."""
        outcomes: dict[str, dict[int, bool]] = {}
        for sample in self.samples:
            outcomes.setdefault(sample.caption, {})[sample.seed] = sample.passed
        return outcomes

    def prompt_mean(self) -> float:
        """Every prompt weighted equally: the mean over prompts of each prompt's accuracy over its seeds."""
        return float(np.mean([np.mean(list(seeds.values())) for seeds in self.prompt_outcomes().values()]))

    def seed_scores(self) -> list[float]:
        """`overall` recomputed on each seed alone (seed s = the s-th seed of every prompt).

        Their spread is the seed-to-seed spread a single-seed evaluation would show; it is larger than
        the standard error of `overall` (which averages all seeds), so "better by more than the seed
        spread" is a conservative test."""
        offset = self.settings.get("seed_offset", 0)
        folds = self.settings["seeds_per_prompt"]
        scores = []
        for fold in range(folds):
            per_category = [np.mean(outcomes) for category in world.CATEGORIES
                            if (outcomes := [s.passed for s in self.samples
                                             if s.category == category and (s.seed - offset) % folds == fold])]
            scores.append(float(np.mean(per_category)))
        return scores

    def seed_spread(self) -> float:
        """Sample standard deviation of `seed_scores` (0 with a single seed)."""
        scores = self.seed_scores()
        return sample_std(scores)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    def image_of(self, caption: str, seed: int) -> np.ndarray:
        for i, sample in enumerate(self.samples):
            if sample.caption == caption and sample.seed == seed:
                if self.images is None:
                    raise ValueError("MiniGenEvalResult: images were not kept (keep_images=False)")
                return self.images[i]
        raise KeyError(f"MiniGenEvalResult: no sample for caption {caption!r} with seed {seed}")


@dataclass(frozen=True)
class PairedInterval:
    """A paired bootstrap interval of `statistic`(model a) - `statistic`(model b), in [-1, 1] units."""

    statistic: str  # "prompt_mean" or "category_mean"
    difference: float  # on the evaluated prompts and seeds themselves
    low: float
    high: float
    level: float
    n_boot: int
    seed: int
    num_prompts: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


STATISTICS = ("prompt_mean", "category_mean")


def bootstrap_difference(
    a: Sequence[Sequence[float]],
    b: Sequence[Sequence[float]],
    categories: Sequence[str] | None = None,
    n_boot: int = 10000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedInterval:
    """Paired bootstrap interval of the difference of two models' mean accuracy on the same prompts.

    a[p][s] and b[p][s] are the outcomes (0/1 or scores) of prompt p at its s-th seed, the same seeds
    for both models; prompts may have different numbers of seeds. Each bootstrap draw resamples the
    prompts with replacement and then, within each drawn prompt, its seeds with replacement (a
    two-stage bootstrap: prompts are the population a claim is about, seeds the noise within a prompt),
    and takes the same draws for both models, so what is resampled is the per-image difference.
    Statistic: the mean over prompts of each prompt's mean (categories None), or with `categories`
    (one per prompt) the unweighted mean over categories of that within each category, prompts then
    resampled within their category. Percentile interval at `level`; fixed `seed` so it reproduces."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"bootstrap_difference: a and b need the same, non-zero number of prompts, "
                         f"got {len(a)} and {len(b)}")
    if n_boot < 1:
        raise ValueError(f"bootstrap_difference: n_boot={n_boot} must be >= 1")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_difference: level={level} must be in (0, 1)")
    seeds = np.array([len(x) for x in a])
    for p, (x, y) in enumerate(zip(a, b)):
        if len(x) != len(y) or not len(x):
            raise ValueError(f"bootstrap_difference: prompt {p} has {len(x)} and {len(y)} outcomes; paired "
                             "outcomes need the same, non-zero number of seeds")
    width = int(seeds.max())
    diff = np.zeros((len(a), width))
    for p, (x, y) in enumerate(zip(a, b)):
        diff[p, : seeds[p]] = np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    if categories is None:
        strata = [np.arange(len(a))]
        statistic = "prompt_mean"
    else:
        if len(categories) != len(a):
            raise ValueError(f"bootstrap_difference: {len(categories)} categories for {len(a)} prompts")
        names = list(dict.fromkeys(categories))
        strata = [np.flatnonzero(np.asarray(categories, dtype=object) == name) for name in names]
        statistic = "category_mean"
    order = np.concatenate(strata)

    def stat(prompt_means: np.ndarray) -> np.ndarray:  # (..., P) in `order`'s layout -> (...)
        bounds = np.cumsum([0] + [len(s) for s in strata])
        return np.mean([prompt_means[..., lo:hi].mean(-1) for lo, hi in zip(bounds[:-1], bounds[1:])], axis=0)

    observed = float(stat((diff.sum(1) / seeds)[order]))
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    chunk = max(1, 4_000_000 // (len(a) * width))  # bounds the (chunk, P, seeds) temporaries
    columns = np.arange(width)
    for start in range(0, n_boot, chunk):
        count = min(chunk, n_boot - start)
        prompts = np.concatenate([s[rng.integers(0, len(s), (count, len(s)))] for s in strata], axis=1)
        n = seeds[prompts][..., None]  # (count, P, 1)
        picks = np.minimum((rng.random((count, len(a), width)) * n).astype(np.int64), n - 1)
        values = np.where(columns < n, diff[prompts[..., None], picks], 0.0)
        draws[start : start + count] = stat(values.sum(-1) / n[..., 0])
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return PairedInterval(statistic, observed, float(low), float(high), level, n_boot, seed, len(a))


def paired_bootstrap(
    a: MiniGenEvalResult,
    b: MiniGenEvalResult,
    statistic: str = "prompt_mean",
    n_boot: int = 10000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedInterval:
    """bootstrap_difference of model a minus model b, evaluated on the same (prompt, seed) images;
    `statistic` "prompt_mean" (prompt_mean()) or "category_mean" (`overall`)."""
    if statistic not in STATISTICS:
        raise ValueError(f"paired_bootstrap: statistic={statistic!r} is not one of {STATISTICS}")
    ours, theirs = a.prompt_outcomes(), b.prompt_outcomes()
    keys_a = {(c, s) for c, seeds in ours.items() for s in seeds}
    keys_b = {(c, s) for c, seeds in theirs.items() for s in seeds}
    if keys_a != keys_b:
        only = sorted(keys_a - keys_b)[:1] or sorted(keys_b - keys_a)[:1]
        side = "first" if keys_a - keys_b else "second"
        raise ValueError(f"paired_bootstrap: the two results were not evaluated on the same prompts and seeds "
                         f"({len(keys_a ^ keys_b)} (caption, seed) pairs differ, e.g. {only[0]} only in the {side})")
    captions = list(ours)
    category = {s.caption: s.category for s in a.samples}
    return bootstrap_difference(
        [[ours[c][s] for s in sorted(ours[c])] for c in captions],
        [[theirs[c][s] for s in sorted(ours[c])] for c in captions],
        categories=[category[c] for c in captions] if statistic == "category_mean" else None,
        n_boot=n_boot, seed=seed, level=level,
    )


def verdict(interval: PairedInterval | dict[str, Any], other: str = "the base") -> str:
    """The claim an interval supports: better / worse than `other`, or "not shown" if it contains zero."""
    low, high = (interval["low"], interval["high"]) if isinstance(interval, dict) else (interval.low, interval.high)
    if low > 0.0:
        return f"better than {other}: interval above zero"
    if high < 0.0:
        return f"worse than {other}: interval below zero"
    return "not shown: interval contains zero"


SPLITS = ("held_out", "train")
NOISES = ("shared", "per_prompt")
# per_prompt seeds step by this per caption hash, so seed offsets less than it apart never share a noise
PROMPT_SEED_STRIDE = 1_000_000


def image_seed(caption: str, index: int, seed_offset: int, seeds_per_prompt: int, noise: str = "shared") -> int:
    """The generator seed of a prompt's index-th image. shared: seed_offset + index for every prompt; per_prompt:
    shifted by a multiple of seeds_per_prompt fixed by the caption, so that (seed - seed_offset) % seeds_per_prompt
    still names the image's evaluation-seed fold (seed_scores) while no two prompts (up to a crc32 collision)
    start from the same noise."""
    if noise not in NOISES:
        raise ValueError(f"noise: {noise!r} is not one of {NOISES}")
    shift = 0 if noise == "shared" else seeds_per_prompt * PROMPT_SEED_STRIDE * zlib.crc32(caption.encode())
    return seed_offset + index + shift


def select_prompts(max_prompts_per_category: int | None = 12, world_name: str = "v1",
                   split: str = "held_out") -> list[world.PromptSpec]:
    """The fixed evaluation prompts: up to max_prompts_per_category per category, spread evenly
    through world.eval_prompts(world_name)' order (None: all of them). split "train" picks the same way from the
    training captions instead: what a fine-tune learned on the prompts it saw, beside what carried over to unseen
    ones (MiniGenEval's claims are on the held-out split)."""
    if split not in SPLITS:
        raise ValueError(f"MiniGenEval split: {split!r} is not one of {SPLITS}")
    chosen = []
    pool = world.eval_prompts(world_name) if split == "held_out" else world.train_prompts(world_name)
    for category in world.CATEGORIES:
        specs = [s for s in pool if s.category == category]
        if max_prompts_per_category is not None and len(specs) > max_prompts_per_category:
            picks = np.linspace(0, len(specs) - 1, max_prompts_per_category).round().astype(int)
            specs = [specs[i] for i in picks]
        chosen += specs
    return chosen


def evaluate(
    generate: Generate,
    seeds_per_prompt: int = 4,
    max_prompts_per_category: int | None = 12,
    batch_size: int = 64,
    seed_offset: int = 0,
    min_images_per_category: int = 12,
    specs: Sequence[world.PromptSpec] | None = None,
    keep_images: bool = True,
    progress: bool = False,
    world_name: str = "v1",
    split: str = "held_out",
    noise: str = "shared",
) -> MiniGenEvalResult:
    """Generate every (prompt, seed) image in batches and score it with the verifier.

    Categories with few held-out prompts get more seeds per prompt, up to
    `min_images_per_category` images, so that no category's accuracy rests on a handful of images
    (single_object has one held-out prompt)."""
    if seeds_per_prompt < 1:
        raise ValueError(f"seeds_per_prompt={seeds_per_prompt} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    image_seed("", 0, seed_offset, seeds_per_prompt, noise)  # an unknown noise is named before any image
    world.get_world(world_name)  # an unknown world is named before any image is generated
    specs = list(specs) if specs is not None else select_prompts(max_prompts_per_category, world_name, split)
    seeds_of_category = {}
    for category in world.CATEGORIES:
        prompts = sum(s.category == category for s in specs)
        if prompts:
            seeds_of_category[category] = max(seeds_per_prompt, -(-min_images_per_category // prompts))
    jobs = [(spec, image_seed(spec.caption, s, seed_offset, seeds_per_prompt, noise))
            for spec in specs for s in range(seeds_of_category[spec.category])]
    started = time.perf_counter()
    tqdm = require("tqdm", "MiniGenEval progress") if progress else None
    bar = tqdm.tqdm(total=len(jobs), desc="minigeneval", mininterval=5.0) if tqdm else None
    samples: list[Sample] = []
    kept: list[np.ndarray] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        captions = [spec.caption for spec, _ in chunk]
        images = np.asarray(generate(captions, [seed for _, seed in chunk]))
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != len(chunk) or images.shape[-1] != 3:
            raise ValueError(
                f"generate() must return uint8 ({len(chunk)}, H, W, 3) for {len(chunk)} captions, "
                f"got {images.dtype} {images.shape}"
            )
        for (spec, seed), image in zip(chunk, images):
            result = verifier.verify_detailed(image, spec)
            samples.append(Sample(spec.caption, spec.category, seed, result.passed, result.checks))
        if keep_images:
            kept.append(images)
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    per_category = {}
    for category in world.CATEGORIES:
        outcomes = [s.passed for s in samples if s.category == category]
        if outcomes:
            per_category[category] = float(np.mean(outcomes))
    settings = {
        "seeds_per_prompt": seeds_per_prompt,
        "seeds_per_prompt_by_category": seeds_of_category,
        "min_images_per_category": min_images_per_category,
        "seed_offset": seed_offset,
        "max_prompts_per_category": max_prompts_per_category,
        "num_prompts": len(specs),
        "prompts_per_category": {c: sum(s.category == c for s in specs) for c in world.CATEGORIES},
        "world": specs[0].world if specs else world_name,
        "split": split,
        "noise": noise,
    }
    return MiniGenEvalResult(
        overall=float(np.mean(list(per_category.values()))),
        per_category=per_category,
        num_images=len(samples),
        settings=settings,
        samples=samples,
        images=np.concatenate(kept) if keep_images else None,
        seconds=round(time.perf_counter() - started, 3),
    )


# ---------------------------------------------------------------------------------------------
# Generators


def world_generate(captions: list[str], seeds: list[int], world_name: str = "v1") -> np.ndarray:
    """The renderer as a model: the ground truth for each (caption, seed) -- the accuracy ceiling.
    (`functools.partial(world_generate, world_name="v2")` for another world.)"""
    return np.stack(
        [world.render(world.parse_caption(c, world_name), np.random.default_rng(s)) for c, s in zip(captions, seeds)]
    )


class DiffusersGenerate:
    """Adapts a diffusers text-to-image pipeline to generate(captions, seeds).

    Each image gets its own torch.Generator seeded with its seed, so an image does not depend on
    the batch it was drawn in. Calls pipeline(prompt=..., generator=[...], num_inference_steps=...,
    guidance_scale=..., output_type="np") and converts its float [0, 1] images to uint8."""

    def __init__(
        self,
        pipeline,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.0,
        device: str | None = None,
        pipeline_kwargs: dict[str, Any] | None = None,
    ):
        self.pipeline = pipeline
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.device = device or str(getattr(pipeline, "device", "cpu"))
        self.pipeline_kwargs = dict(pipeline_kwargs or {})
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", **kwargs) -> "DiffusersGenerate":
        """Load a diffusers pipeline folder (model_index.json) with DiffusionPipeline."""
        from fastpref.models.bundle import load_pipeline, pipeline_call_kwargs

        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"MiniGenEval: {path} is not a diffusers pipeline folder (no model_index.json)")
        pipeline = load_pipeline(path).to(device)
        kwargs["pipeline_kwargs"] = {**pipeline_call_kwargs(path), **kwargs.get("pipeline_kwargs", {})}
        return cls(pipeline, device=device, **kwargs)

    def __call__(self, captions: list[str], seeds: list[int]) -> np.ndarray:
        torch = require("torch", "MiniGenEval of a diffusers pipeline")
        generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        with torch.no_grad():
            output = self.pipeline(
                prompt=list(captions),
                generator=generators,
                num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale,
                output_type="np",
                **self.pipeline_kwargs,
            )
        images = np.asarray(output.images)
        if images.dtype != np.uint8:
            images = (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return images


# ---------------------------------------------------------------------------------------------
# Comparison grid and CLI


def grid_columns(specs: Sequence[world.PromptSpec], per_category: int = 2, seed_offset: int = 0,
                 seeds_per_prompt: int = 1, noise: str = "shared") -> list[tuple[str, int]]:
    """(caption, seed) of the grid's columns: the first `per_category` prompts of each category, each at its
    first evaluation seed."""
    columns = []
    for category in world.CATEGORIES:
        columns += [(s.caption, image_seed(s.caption, 0, seed_offset, seeds_per_prompt, noise))
                    for s in specs if s.category == category][:per_category]
    return columns


def save_comparison_grid(
    results: dict[str, MiniGenEvalResult], path: str | Path, per_category: int = 2, scale: int = 4
) -> Path:
    """One row per model (labelled with its overall accuracy), the same prompts and seed in every
    column, framed green/red by the verifier."""
    from fastpref.eval import grids

    if not results:
        raise ValueError("save_comparison_grid: no results")
    first = next(iter(results.values()))
    captions = list(dict.fromkeys(s.caption for s in first.samples))
    settings = first.settings
    seed = settings["seed_offset"]
    by_caption = {x.caption: x for x in (world.parse_caption(c, first.settings.get("world", "v1")) for c in captions)}
    columns = grid_columns(list(by_caption.values()), per_category, seed, settings["seeds_per_prompt"],
                           settings.get("noise", "shared"))
    rows, passed = [], []
    for name, result in results.items():
        rows.append((f"{name}\n{100 * result.overall:.1f}%", np.stack([result.image_of(c, s) for c, s in columns])))
        outcome = {(x.caption, x.seed): x.passed for x in result.samples}
        passed.append([outcome[column] for column in columns])
    labels = [caption for caption, _ in columns]
    noise = "" if settings.get("noise", "shared") == "shared" else ", per-prompt noise"
    title = f"MiniGenEval (held-out prompts, seed {seed}{noise}; frame = verifier pass/fail; row % = overall accuracy)"
    return grids.save_grid(path, rows, labels, passed=passed, scale=scale, title=title)


def _model_name(spec: str) -> str:
    return WORLD_MODEL if spec == WORLD_MODEL else Path(spec).name or spec


def _models_world(models: list[str], asked: str | None) -> str:
    """The world to evaluate: the one the toy models record (they must agree, and agree with --world if given)."""
    from fastpref.models import model_world

    recorded = {spec: model_world(spec) for spec in models if spec != WORLD_MODEL}
    recorded = {spec: w for spec, w in recorded.items() if w is not None}
    for spec, its_world in recorded.items():
        wanted = asked or next(iter(recorded.values()))
        if its_world != wanted:
            source = f"--world {asked}" if asked else f"--model {next(iter(recorded))} (world {wanted})"
            raise SystemExit(f"fastpref eval: --model {spec} speaks toy world {its_world}, but {source}: "
                             "evaluate one world at a time")
    return asked or next(iter(recorded.values()), "v1")


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastpref eval", description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True,
                        help="diffusers pipeline folder, or 'world' (the renderer); repeat to compare")
    parser.add_argument("--out", type=Path, default=Path("outputs/minigeneval"))
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    parser.add_argument("--min-images-per-category", type=int, default=12,
                        help="more seeds for categories with few prompts, up to this many images")
    parser.add_argument("--seed-offset", type=int, default=0)
    parser.add_argument("--noise", default="shared", choices=NOISES,
                        help="shared: every prompt the same seeds; per_prompt: each prompt its own (GenEval's way)")
    parser.add_argument("--max-prompts-per-category", type=int, default=12, help="0: all held-out prompts")
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps")
    parser.add_argument("--guidance", type=float, default=4.0, help="guidance_scale")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--world", default=None, choices=sorted(world.WORLDS),
                        help="the toy world whose held-out prompts are evaluated (default: the one the models record, "
                             "fastpref.models.model_world; v1 when none does)")
    parser.add_argument("--split", default="held_out", choices=SPLITS,
                        help="held_out (the claims' prompts) or train (training captions: what a fine-tune fit)")
    parser.add_argument("--grid-per-category", type=int, default=2)
    args = parser.parse_args(argv)
    args.world = _models_world(args.model, args.world)
    max_prompts = args.max_prompts_per_category or None
    results: dict[str, MiniGenEvalResult] = {}
    for spec in args.model:
        name = _model_name(spec)
        if name in results:
            raise SystemExit(f"fastpref eval: two --model arguments are both named {name!r}")
        if spec == WORLD_MODEL:
            generate: Generate = functools.partial(world_generate, world_name=args.world)
        else:
            generate = DiffusersGenerate.from_pretrained(spec, device=args.device,
                                                         num_inference_steps=args.steps, guidance_scale=args.guidance)
        result = evaluate(generate, seeds_per_prompt=args.seeds, max_prompts_per_category=max_prompts,
                          batch_size=args.batch_size, seed_offset=args.seed_offset, noise=args.noise,
                          min_images_per_category=args.min_images_per_category, progress=True,
                          world_name=args.world, split=args.split)
        result.settings.update(model=spec, num_inference_steps=args.steps, guidance_scale=args.guidance)
        result.save(args.out / f"{name}.json")
        results[name] = result
        scores = ", ".join(f"{c} {100 * a:.1f}" for c, a in result.per_category.items())
        print(f"{name}: overall {100 * result.overall:.1f}%, prompt-weighted {100 * result.prompt_mean():.1f}% "
              f"({scores}); {result.num_images} images, {result.seconds:.1f} s")
    summary = {name: {"overall": r.overall, "prompt_mean": r.prompt_mean(), "per_category": r.per_category}
               for name, r in results.items()}
    first = next(iter(results))
    for name, result in list(results.items())[1:]:  # same prompts and seeds: paired against the first model
        intervals = {statistic: paired_bootstrap(result, results[first], statistic) for statistic in STATISTICS}
        summary[name]["paired"] = {first: {k: v.to_json() for k, v in intervals.items()}}
        iv = intervals["prompt_mean"]
        print(f"{name} - {first}: prompt-weighted {100 * iv.difference:+.1f} [{100 * iv.low:+.1f}, "
              f"{100 * iv.high:+.1f}] (paired bootstrap {100 * iv.level:.0f}%): {verdict(iv, first)}")
    from fastpref.eval import diversity  # diversity over each prompt's seeds and the toy rewards, beside MiniGenEval

    for name, result in results.items():
        summary[name].update(diversity.eval_extras(result))
        print(f"{name}: {diversity.describe(summary[name])}")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    grid = save_comparison_grid(results, args.out / "grid.png", per_category=args.grid_per_category)
    print(f"wrote {args.out / 'summary.json'} and {grid}")
    return 0


main = cli

if __name__ == "__main__":
    raise SystemExit(cli())
