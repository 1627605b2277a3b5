"""`fastpref run <config>`: synth -> label (or import) -> cache -> train (one run per objective variant) -> MiniGenEval.

The data comes either from Syn-Pic (`synth:` + `label:` sections: generate K images per prompt, score and rank
them) or from an existing preference dataset (`importer:` section: fastpref.data.importers, e.g. Pick-a-Pic v2
parquet files); a recipe has exactly one of the two. Every stage config is built and validated before any work
starts; every stage skips work that is already done, so rerunning a finished or interrupted `run` picks up where
it stopped. The report (report.json, report.md, grid.png under output_dir) puts the base model and each trained
variant side by side.

Data roots: synth / label / import write into `data_root` (default <output_dir>/data); the cache, which depends
on the model, always goes to <output_dir>/data, the training root. Two recipes that share a `data_root` (and
identical synth / label sections) generate and score the images once and cache them for their own models.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastpref.config import ConfigError, apply_overrides, from_dict, load_config, to_dict


@dataclass
class EvalConfig:
    seeds_per_prompt: int = 2
    max_prompts_per_category: int | None = 12
    min_images_per_category: int = 12  # small categories (1-3 held-out prompts) get more seeds
    steps: int = 20
    guidance_scale: float = 4.0
    batch_size: int = 64
    seed_offset: int = 1000  # disjoint from the seeds Syn-Pic generated its training images with
    # the toy world whose held-out prompts are evaluated (v1, v2); null: the recipe's world (recipe_world)
    world: str | None = None
    # also evaluate the main variant's checkpoints at these training steps ("<main>@<step>"): DRaFT's path over
    # training, against which a DRaFT recipe's report compares DRaFT+ at a matched reward (fastpref.eval.tradeoff)
    main_checkpoints: list[int] = field(default_factory=list)
    # held_out (the claims') or train: the training captions, to see what a fine-tune fit beside what carried over
    split: str = "held_out"
    # shared: every prompt the same seeds (every recorded result); per_prompt: each prompt its own, so that the
    # spread over evaluation seeds is the evaluation's noise, not one shared noise's (fastpref.eval.minigeneval)
    noise: str = "shared"

    def validate(self) -> None:
        from fastpref.eval.minigeneval import NOISES, SPLITS
        from fastpref.toy.world import WORLDS

        if self.world is not None and self.world not in WORLDS:
            raise ConfigError(f"world: {self.world!r} is not one of {tuple(WORLDS)}")
        if self.split not in SPLITS:
            raise ConfigError(f"split: {self.split!r} is not one of {SPLITS}")
        if self.noise not in NOISES:
            raise ConfigError(f"noise: {self.noise!r} is not one of {NOISES}")


@dataclass
class RunConfig:
    output_dir: str
    train: dict[str, Any]  # fastpref.train.loop.TrainConfig without data.root / output_dir
    # fastpref.data.cache.CacheConfig without `input` / `output`; required, except in an online recipe
    cache: dict[str, Any] | None = None
    # the data: Syn-Pic (synth + label) or an existing preference dataset (importer), never both
    synth: dict[str, Any] | None = None  # fastpref.data.synth.SynthConfig without `output`
    label: dict[str, Any] | None = None  # fastpref.data.label.LabelConfig without `input`
    importer: dict[str, Any] | None = None  # fastpref.data.importers.ImportConfig without `output` (`fastpref import`)
    data_root: str | None = None  # where synth / label / import write; default <output_dir>/data
    # extra trainings on the same data, name -> overrides of `train` (e.g. {"objective.name": "dpo"})
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    main_variant: str = "main"  # the name of the run that uses `train` as it is
    eval: EvalConfig | None = field(default_factory=EvalConfig)
    progress: bool = True

    @property
    def is_online(self) -> bool:
        """An online recipe (train.objective.name grpo / spo / draft): its data stage is "online: prompts only",
        the policy samples its training images from train.online.prompts; no synth, label, import or cache."""
        from fastpref.online.config import ONLINE_METHODS

        return (self.train.get("objective") or {}).get("name") in ONLINE_METHODS

    def validate(self) -> None:
        if self.is_online:
            from fastpref.online.config import ONLINE_METHODS

            offline = [key for key in ("synth", "label", "importer", "cache", "data_root")
                       if getattr(self, key) is not None]
            if offline:
                raise ConfigError(f"{offline[0]}: an online recipe (train.objective.name: "
                                  f"{self.train['objective']['name']}) samples its own training images from "
                                  f"train.online.prompts; remove the {', '.join(offline)} section(s)")
            for name, overrides in self.variants.items():
                objective = overrides.get("objective.name", (overrides.get("objective") or {}).get("name"))
                if objective is not None and objective not in ONLINE_METHODS:
                    raise ConfigError(f"variants.{name}.objective.name: {objective!r} trains on a cached dataset, "
                                      "which an online recipe does not build; give it its own recipe")
            return
        if self.cache is None:
            raise ConfigError("cache: required (the latents / text embeddings the trainer reads), unless the recipe "
                              "is online (train.objective.name: grpo, spo or draft)")
        if self.importer is not None:
            if self.synth is not None or self.label is not None:
                both = " and ".join(key for key in ("synth", "label") if getattr(self, key) is not None)
                raise ConfigError(f"importer: cannot be combined with {both}: an import replaces the synth and "
                                  "label stages (keep either importer, or synth + label)")
            return
        if self.synth is None:
            raise ConfigError("synth: required (or an `importer:` section that imports an existing preference "
                              "dataset instead of synth + label)")
        if self.label is None:
            raise ConfigError("label: required with synth (the reward models that score and rank the images)")


@dataclass
class Stages:
    synth: Any  # SynthConfig, or None for an imported dataset
    label: Any  # LabelConfig, or None for an imported dataset
    cache: Any
    trains: dict[str, Any]  # run name ("<variant>", or "<variant>-seed<s>" under train.seeds) -> TrainConfig
    importer: Any = None  # ImportConfig, or None for Syn-Pic data
    seeds: list[int] | None = None  # train.seeds: every variant trained once per seed
    variant_of: dict[str, str] = field(default_factory=dict)  # run name -> variant
    world: str = "v1"  # the recipe's toy world (recipe_world)

    @property
    def main(self):
        """The first training of the main variant (`fastpref train` on a recipe trains this one)."""
        return next(iter(self.trains.values()))

    @property
    def group_size(self) -> int | None:
        """K images per prompt (None for an import: it is known only once the source is read)."""
        return self.synth.group_size if self.synth is not None else None


def build_stages(cfg: RunConfig) -> Stages:
    """Every stage config, validated up front; errors name the section (synth., train.variants.dpo., ...)."""
    from fastpref.data.cache import CacheConfig
    from fastpref.data.importers import ImportConfig
    from fastpref.data.label import LabelConfig
    from fastpref.data.synth import SynthConfig
    from fastpref.train.loop import TrainConfig

    if cfg.is_online:
        if not (cfg.train.get("model") or {}).get("path"):
            raise ConfigError("train.model.path: required in an online recipe (no cache stage names the model)")
        trains, seeds, variant_of = variant_trains(cfg)
        stages = Stages(None, None, None, trains, seeds=seeds, variant_of=variant_of)
        stages.world = recipe_world(cfg, stages)
        check_main_checkpoints(cfg, stages)
        if cfg.eval is not None:
            check_prompts_unscored(cfg.eval, stages.world, online_prompt_sources(cfg, stages))
        return stages
    root = str(Path(cfg.output_dir) / "data")  # the training root: cache/ (and, by default, everything else)
    source = cfg.data_root or root  # synth/ + label/ (Syn-Pic or imported)

    def build(cls, section: str, data: dict[str, Any]):
        try:
            return from_dict(cls, data)
        except ConfigError as err:
            raise ConfigError(f"{section}.{err}") from None

    synth = label = importer = None
    if cfg.importer is not None:
        importer = build(ImportConfig, "importer", {**cfg.importer, "output": source, "progress": cfg.progress})
    else:
        synth = build(SynthConfig, "synth", {**cfg.synth, "output": source, "progress": cfg.progress})
        label = build(LabelConfig, "label", {**cfg.label, "input": source, "progress": cfg.progress})
    cache_paths = {"input": source} if source == root else {"input": source, "output": root}
    cache = build(CacheConfig, "cache", {**cfg.cache, **cache_paths, "progress": cfg.progress})

    def on_the_cache(data: dict[str, Any]) -> None:
        data.setdefault("data", {})["root"] = root
        data.setdefault("model", {}).setdefault("path", cache.model)
        if cfg.cache.get("flow_timesteps") is not None:  # training must draw t as the cached e_ref were drawn
            data.setdefault("flow_timesteps", copy.deepcopy(cfg.cache["flow_timesteps"]))

    trains, seeds, variant_of = variant_trains(cfg, on_the_cache)
    stages = Stages(synth, label, cache, trains, importer, seeds, variant_of)
    stages.world = recipe_world(cfg, stages)
    check_main_checkpoints(cfg, stages)
    return stages


def online_prompt_sources(cfg: RunConfig, stages: Stages) -> list[tuple[str, Any]]:
    """(recipe key, PromptSource) of every online training's prompts, one per distinct source."""
    from fastpref.data.prompts import PromptSource

    sources: dict[tuple[str, int | None], str] = {}
    for name, train in stages.trains.items():
        variant = stages.variant_of.get(name, cfg.main_variant)
        key = "train.online.prompts" if variant == cfg.main_variant else f"variants.{variant}.online.prompts"
        sources.setdefault((train.online.prompts, train.online.prompt_limit), key)
    return [(key, PromptSource(path, limit=limit)) for (path, limit), key in sources.items()]


def check_prompts_unscored(ev: EvalConfig, world_name: str, sources: list[tuple[str, Any]]) -> None:
    """An online method trains on its prompts: none of them may be a caption the held-out MiniGenEval scores, or
    the evaluation would score the policy on its own training prompts. Refused naming the key, before training."""
    from fastpref.data.prompts import read_prompts
    from fastpref.eval.minigeneval import select_prompts

    if ev.split != "held_out" or not sources:
        return
    scored = {spec.caption for spec in select_prompts(ev.max_prompts_per_category, ev.world or world_name)}
    for key, source in sources:
        try:
            texts = {prompt.text for prompt in read_prompts(source)}
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"{key}: {err}") from None
        overlap = sorted(texts & scored)
        if overlap:
            per_category = ev.max_prompts_per_category
            raise ConfigError(
                f"{key}: {source.path!r} holds {len(overlap)} caption(s) that MiniGenEval scores at "
                f"eval.max_prompts_per_category = {per_category} (e.g. {overlap[0]!r}): the evaluation would score "
                f"the policy on its training prompts; train on prompts it does not score (toy:eval-unscored-"
                f"{per_category}, the training split, or a file without them)")


def check_main_checkpoints(cfg: RunConfig, stages: Stages) -> None:
    """eval.main_checkpoints: steps the main training saves (multiples of checkpoint_every below max_steps) and
    keeps (keep_checkpoints holds them and the last one), with one training per variant."""
    steps = cfg.eval.main_checkpoints if cfg.eval is not None else []
    if not steps:
        return
    if stages.seeds:
        raise ConfigError("eval.main_checkpoints: not supported with train.seeds (one main training to follow)")
    main = stages.main
    for step in steps:
        if not isinstance(step, int) or isinstance(step, bool) or not 0 < step < main.max_steps \
                or step % main.checkpoint_every:
            raise ConfigError(f"eval.main_checkpoints: {step!r} is not a step the main training saves (a multiple "
                              f"of train.checkpoint_every = {main.checkpoint_every} below train.max_steps = "
                              f"{main.max_steps})")
    if len(set(steps)) != len(steps):
        raise ConfigError(f"eval.main_checkpoints: {steps} lists a step twice")
    # the checkpoints saved from the earliest listed step on (every checkpoint_every steps, and at max_steps)
    saved = len({*range(min(steps), main.max_steps + 1, main.checkpoint_every), main.max_steps})
    if main.keep_checkpoints < saved:
        raise ConfigError(f"train.keep_checkpoints: {main.keep_checkpoints} would delete checkpoints that "
                          f"eval.main_checkpoints evaluates: the run saves {saved} from step {min(steps)} on; set it "
                          f">= {saved}")


def recipe_world(cfg: RunConfig, stages: Stages) -> str:
    """The one toy world (fastpref.toy.world.WORLDS) of a recipe, from one place: its toy models (synth
    generators, cache.model / cache.vae, every training's model.path), whose saved world (fastpref.models.
    model_world) must agree; with no toy model, its toy prompt sources' world; else v1. What depends on the world
    follows it: eval.world (null) is set to it, and the toy rewards of label.rewards (verifier, shapeclip, quality)
    get it as their `world` kwarg. A prompt source, eval.world or reward world that names another world is refused
    with both keys named, so that a recipe cannot pair a v1 model with v2 prompts, evaluation or rewards."""
    from fastpref.data.prompts import toy_prompt_world
    from fastpref.models import model_world
    from fastpref.rewards.toy import WORLD_REWARDS

    models: list[tuple[str, str]] = []
    if stages.synth is not None:
        models += [(f"synth.generators[{i}].model", g.model) for i, g in enumerate(stages.synth.generators)]
    if stages.cache is not None:
        models += [("cache.model", stages.cache.model)] + ([("cache.vae", stages.cache.vae)] if stages.cache.vae else [])
    def section(name: str) -> str:  # the recipe section a training comes from, for error messages
        variant = stages.variant_of.get(name, cfg.main_variant)
        return "train" if variant == cfg.main_variant else f"variants.{variant}"

    models += [(f"{section(name)}.model.path", train.model.path) for name, train in stages.trains.items()]
    prompt_sources: list[tuple[str, str]] = []
    if stages.synth is not None:
        prompt_sources.append(("synth.prompts.path", stages.synth.prompts.path))
    if cfg.is_online:
        prompt_sources.append(("train.online.prompts", stages.main.online.prompts))

    model_worlds = [(key, value, model_world(value)) for key, value in models]
    prompt_worlds = [(key, value, toy_prompt_world(value)) for key, value in prompt_sources]
    deciding = ([item for item in model_worlds if item[2] is not None]
                or [item for item in prompt_worlds if item[2] is not None])
    world, source = "v1", "the default (no toy model or toy prompts in the recipe)"
    if deciding:
        key, value, world = deciding[0]
        source = f"{key} ({value!r}, world {world})"

    def refuse(key: str, value, its_world: str, hint: str = "") -> None:
        which = "" if value == its_world else f" is toy world {its_world}"  # eval.world names its world itself
        raise ConfigError(f"{key}: {value!r}{which}, but the recipe's world is {world} from {source}: one recipe, "
                          f"one world{hint}")

    for key, value, its_world in model_worlds:
        if its_world is not None and its_world != world:
            refuse(key, value, its_world)
    for key, value, its_world in prompt_worlds:
        if its_world is not None and its_world != world:
            split = value.partition(":")[2]
            refuse(key, value, its_world, f" (use {'toy' if world == 'v1' else 'toy-' + world}:{split})")
    if cfg.eval is not None:
        if cfg.eval.world is None:
            cfg.eval.world = world
        elif cfg.eval.world != world:
            refuse("eval.world", cfg.eval.world, cfg.eval.world, " (or leave eval.world out: it follows the recipe)")
    if stages.label is not None:
        for i, spec in enumerate(stages.label.rewards):
            if spec.name not in WORLD_REWARDS:
                continue
            if "world" in spec.kwargs and spec.kwargs["world"] != world:
                refuse(f"label.rewards[{i}].kwargs.world", spec.kwargs["world"], spec.kwargs["world"])
            if world != "v1":  # v1 is the rewards' default: v1 label configs (and their recorded stage) stay as they were
                spec.kwargs["world"] = world
    if cfg.is_online:
        for name, train in stages.trains.items():
            if train.online.toy_world is not None and train.online.toy_world != world:
                refuse(f"{section(name)}.online.toy_world", train.online.toy_world, train.online.toy_world)
            if world != "v1":  # as for label.rewards: v1 online recipes (and their recorded runs) stay as they were
                train.online.toy_world = world
    return world


def variant_trains(cfg: RunConfig, prepare=None) -> tuple[dict[str, Any], list[int] | None, dict[str, str]]:
    """A TrainConfig per variant, or per (variant, seed) when `train.seeds` lists training seeds (each written into
    train.seed, named "<variant>-seed<s>"); `prepare` fills in what the data stages decide (an online recipe has
    none: its policy samples its own data)."""
    from fastpref.eval.verdicts import seeded_name
    from fastpref.train.config import TrainConfig

    train = copy.deepcopy(cfg.train)
    seeds = train.pop("seeds", None)
    if seeds is not None and (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                              or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
        raise ConfigError(f"train.seeds: a non-empty list of distinct integer training seeds, got {seeds!r}")
    trains, variant_of = {}, {}
    for variant, overrides in {cfg.main_variant: {}, **cfg.variants}.items():
        section = "train" if variant == cfg.main_variant else f"variants.{variant}"
        if "seed" in overrides and seeds is not None:
            raise ConfigError(f"{section}.seed: set by train.seeds; remove one of the two")
        for seed in seeds or [None]:
            name = variant if seed is None else seeded_name(variant, seed)
            data = copy.deepcopy(train)
            if prepare is not None:
                prepare(data)
            data["output_dir"] = str(Path(cfg.output_dir) / "train" / name)
            data["progress"] = cfg.progress
            apply_overrides(data, [f"{key}={json.dumps(value)}" for key, value in overrides.items()])
            if seed is not None:
                data["seed"] = seed
            try:
                trains[name] = from_dict(TrainConfig, data)
            except ConfigError as err:
                raise ConfigError(f"{section}.{err}") from None
            variant_of[name] = variant
    return trains, seeds, variant_of


def trained_pipeline(train_cfg, device: str = "cpu", step: int | None = None):
    """The base pipeline with the run's final weights (or those of checkpoint `step`): LoRA loaded with
    load_lora_weights, or the full denoiser."""
    from fastpref.models import load
    from fastpref.train.checkpoint import CheckpointManager

    bundle = load(train_cfg.model.path, family=train_cfg.model.family, device=device)
    manager = CheckpointManager(Path(train_cfg.output_dir) / "checkpoints")
    latest = manager.latest() if step is None else manager.path_for(step)
    if latest is None or not latest.is_dir():
        raise FileNotFoundError(f"{train_cfg.output_dir}: no checkpoint to evaluate"
                                + ("" if step is None else f" at step {step} ({latest} is missing)"))
    if (latest / "ema").is_dir():  # online runs with an EMA (online.grpo.ema) are evaluated with its weights
        latest = latest / "ema"
    pipeline = bundle.pipeline
    if train_cfg.mode == "lora":
        pipeline.load_lora_weights(str(latest / "lora"))
    else:
        denoiser_cls = type(bundle.denoiser)
        trained = denoiser_cls.from_pretrained(str(latest / "denoiser")).to(device)
        setattr(pipeline, "transformer" if hasattr(pipeline, "transformer") else "unet", trained)
    return pipeline


def evaluate_pipeline(pipeline, ev: EvalConfig, call_kwargs: dict | None = None, progress: bool = True):
    """MiniGenEval of one diffusers pipeline with a run's eval settings (shared by `fastpref run` and `study`)."""
    from fastpref.eval.minigeneval import DiffusersGenerate, evaluate

    if ev.world is None:
        raise ValueError("eval.world: not resolved; build_stages sets it to the recipe's world (recipe_world)")
    generate = DiffusersGenerate(pipeline, num_inference_steps=ev.steps, guidance_scale=ev.guidance_scale,
                                 pipeline_kwargs=call_kwargs or {})
    result = evaluate(generate, seeds_per_prompt=ev.seeds_per_prompt,
                      max_prompts_per_category=ev.max_prompts_per_category, batch_size=ev.batch_size,
                      seed_offset=ev.seed_offset, progress=progress,
                      min_images_per_category=ev.min_images_per_category, world_name=ev.world, split=ev.split,
                      noise=ev.noise)
    result.settings["eval_config"] = eval_identity(ev)
    return result


def eval_identity(ev: EvalConfig) -> dict[str, Any]:
    """The eval settings that decide a MiniGenEval's images and scores (not its batch size, nor which checkpoints
    a run also evaluates): a stored evaluation is reused only while these are unchanged."""
    identity = {k: v for k, v in dataclasses.asdict(ev).items() if k not in ("batch_size", "main_checkpoints")}
    if identity["noise"] == "shared":  # the evaluations stored before the choice existed stay valid
        del identity["noise"]
    return identity


def run_eval(stages: Stages, cfg: RunConfig, out: Path, report: dict[str, Any] | None = None) -> dict[str, Any]:
    """MiniGenEval of the base and every training (and eval.main_checkpoints), diversity and toy rewards beside it;
    a DRaFT recipe's reward-diversity trade-off goes into report["tradeoff"] and tradeoff.png."""
    from fastpref.eval.minigeneval import save_comparison_grid
    from fastpref.models import load, resolve_path
    from fastpref.models.bundle import pipeline_call_kwargs

    ev = cfg.eval
    main = stages.main
    main_name = next(iter(stages.trains))
    pipelines = {"base": load(main.model.path, family=main.model.family).pipeline}
    for name, train_cfg in stages.trains.items():
        if name == main_name:
            pipelines.update({f"{name}@{step}": trained_pipeline(train_cfg, step=step)
                              for step in sorted(ev.main_checkpoints)})
        pipelines[name] = trained_pipeline(train_cfg)
    results = {}
    call_kwargs = pipeline_call_kwargs(resolve_path(main.model.path))  # e.g. toy-sd3: no T5 tokens
    for name, pipeline in pipelines.items():
        result = evaluate_pipeline(pipeline, ev, call_kwargs, progress=cfg.progress)
        result.save(out / "eval" / f"{name}.json")
        results[name] = result
        print(f"[fastpref run] MiniGenEval {name}: {100 * result.overall:.1f}%")
    save_comparison_grid(results, out / "grid.png")
    summary = eval_summary(results, cfg.main_variant)
    # beside MiniGenEval: the diversity over each prompt's seeds and the toy rewards (DRaFT+'s trade-off, reward hacking)
    from fastpref.eval import diversity
    from fastpref.toy import shapeclip

    model = shapeclip.load_shipped(world_name=stages.world)
    for name, result in results.items():
        summary[name].update(diversity.eval_extras(result, model))
    if report is not None and draft_sweep(stages):
        from fastpref.eval import tradeoff

        steps = sorted(ev.main_checkpoints)
        curve = ["base", *[f"{main_name}@{step}" for step in steps], main_name]
        candidates = [name for name in stages.trains if name != main_name]
        labels = {"base": {"kl_coeff": None, "step": 0}, **{f"{main_name}@{s}": {"kl_coeff": 0.0, "step": s}
                                                             for s in steps}}
        labels.update({name: {"kl_coeff": t.online.draft.kl_coeff, "step": t.max_steps}
                       for name, t in stages.trains.items()})
        contrastive = tradeoff.trains_on_contrastive(stages.trains[main_name].online)
        report["tradeoff"] = tradeoff.measure(results, summary, curve, candidates, labels, shapeclip_model=model,
                                              contrastive=contrastive, world_name=stages.world)
        tradeoff.save_plot(report["tradeoff"], out / "tradeoff.png")
    return summary


def draft_sweep(stages: Stages) -> bool:
    """A DRaFT recipe whose main variant is DRaFT (kl_coeff 0) and whose other variants are DRaFT+ (kl_coeff > 0),
    one training each: its report compares them at a matched reward (fastpref.eval.tradeoff)."""
    trains = list(stages.trains.values())
    return (not stages.seeds and len(trains) > 1 and all(t.objective.name == "draft" for t in trains)
            and trains[0].online.draft.kl_coeff == 0 and all(t.online.draft.kl_coeff > 0 for t in trains[1:]))


def eval_summary(results: dict[str, Any], main_variant: str = "main") -> dict[str, dict[str, Any]]:
    """The report's per-model numbers, with paired bootstrap intervals (same prompts and seeds): every
    model against the base, and the main variant against every other variant."""
    from fastpref.eval.minigeneval import STATISTICS, paired_bootstrap

    summary = {name: {"overall": r.overall, "prompt_mean": r.prompt_mean(), "per_category": r.per_category,
                      "num_images": r.num_images, "seed_scores": r.seed_scores(), "seed_spread": r.seed_spread(),
                      "paired": {}}
               for name, r in results.items()}
    pairs = [(name, "base") for name in results if name != "base"]
    pairs += [(main_variant, name) for name in results if name not in ("base", main_variant)]
    for name, other in pairs:
        if name in results and other in results:
            summary[name]["paired"][other] = {
                statistic: paired_bootstrap(results[name], results[other], statistic).to_json()
                for statistic in STATISTICS}
    return summary


def improvement_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """The verdicts: each paired comparison's gain with its bootstrap 95% interval, "better than X: interval
    above zero" or "not shown", beside the base's seed-to-seed spread (the sample standard deviation of
    MiniGenEval computed on each evaluation seed alone)."""
    from fastpref.eval.minigeneval import verdict

    base = results.get("base")
    if base is None or not base.get("seed_scores"):
        return []
    lines = [f"Seed-to-seed spread of the base: {100 * base['seed_spread']:.1f} points (std over its per-seed scores)."]
    compared = [(name, other, intervals) for name, r in results.items()
                for other, intervals in r.get("paired", {}).items() if other in results]
    first = next((intervals["prompt_mean"] for _, _, intervals in compared), None)
    if first is not None:
        lines.append(f"Verdicts from the paired bootstrap {100 * first['level']:.0f}% interval of the difference in "
                     f"the prompt-weighted mean ({first['n_boot']} draws of the {first['num_prompts']} prompts, "
                     f"seeds redrawn within each, bootstrap seed {first['seed']}); a gain whose interval "
                     "contains zero is not shown.")

    def points(interval: dict[str, Any]) -> str:
        return (f"{100 * interval['difference']:+.1f} [{100 * interval['low']:+.1f}, "
                f"{100 * interval['high']:+.1f}]")

    for name, other, intervals in compared:
        against = "the base" if other == "base" else other
        lines.append(f"- {name} vs {other}: prompt-weighted {points(intervals['prompt_mean'])} points, category "
                     f"mean {points(intervals['category_mean'])}: {verdict(intervals['prompt_mean'], against)}")
    for name, r in results.items():
        if name != "base" and "base" not in r.get("paired", {}):
            gain = r["overall"] - base["overall"]
            lines.append(f"- {name} vs base: {100 * gain:+.1f} points (no paired interval: not shown)")
    return lines


def seed_summary(stages: Stages, cfg: RunConfig, out: Path) -> dict[str, Any]:
    """Under train.seeds: each variant's MiniGenEval as mean ± std over its training seeds, and the verdicts
    (variant vs base, main variant vs the others) against the combined spread (the base's evaluation-seed spread
    and both sides' training-seed spreads) and the paired bootstrap interval over all seeds' images."""
    from fastpref.eval.verdicts import judge_seeded_claim, variant_statistics

    results = {name: json.loads((out / "eval" / f"{name}.json").read_text()) for name in ["base", *stages.trains]}
    variants = list(dict.fromkeys(stages.variant_of.values()))
    stats = variant_statistics(results, variants, stages.seeds)
    pairs = [(v, "base") for v in variants] + [(cfg.main_variant, v) for v in variants if v != cfg.main_variant]
    return {"seeds": stages.seeds, "variants": stats,
            "claims": [judge_seeded_claim(results, stats, a, b, stages.seeds) for a, b in pairs]}


def seed_table_lines(stats: dict[str, dict[str, Any]]) -> list[str]:
    """A markdown table of fastpref.eval.verdicts.variant_statistics: mean ± std over training seeds."""
    categories = list(stats["base"]["per_category"])
    pct = (lambda m, s: f"{100 * m:.1f} ± {100 * s:.1f}")
    weighted = all("prompt_mean" in s for s in stats.values())
    # a study's training seconds per variant (the base trains nothing): what each score cost
    timed = any("train_seconds" in s for s in stats.values())
    lines = ["| model | seeds | overall | " + ("prompt-weighted | " if weighted else "") + " | ".join(categories)
             + (" | training seconds" if timed else "") + " |",
             "|---|---|---|" + ("---|" if weighted else "") + "---|" * len(categories) + ("---|" if timed else "")]
    for name, s in stats.items():
        cells = " | ".join(pct(s["per_category"][c], s["per_category_std"][c]) for c in categories)
        column = f"{pct(s['prompt_mean'], s['prompt_mean_std'])} | " if weighted else ""
        if timed:
            cells += (f" | {s['train_seconds']:.0f} ± {s['train_seconds_std']:.0f}" if "train_seconds" in s
                      else " | -")
        lines.append(f"| {name} | {s['seeds']} | **{pct(s['overall'], s['overall_std'])}** | {column}{cells} |")
    return lines


def claim_lines(claims: list[dict[str, Any]], name_of=lambda c: f"{c['better']} vs {c['than']}") -> list[str]:
    """One bullet per claim: the category-mean verdict, then the prompt-weighted one when it was judged; a claim on a
    reward: its prompt-weighted verdict, the training-seed means and the gain in units of the base's seed spread."""
    from fastpref.eval.verdicts import MINIGENEVAL, metric_label

    lines = []
    for c in claims:
        if c.get("metric", MINIGENEVAL) != MINIGENEVAL:
            (a, b), (sa, sb) = c["means"], c["stds"]
            ratio = c["gain_over_eval_seed_spread"]
            lines.append(f"- **{name_of(c)}**: {metric_label(c['metric'])} (prompt-weighted; {c['better']} "
                         f"{a:.4f} ± {sa:.4f}, {c['than']} {b:.4f} ± {sb:.4f}): {c['text']}; the gain is "
                         + (f"{ratio:+.1f}x" if ratio is not None else "not comparable to")
                         + f" the base's evaluation-seed spread ({c['eval_seed_spread']:.4f})")
            continue
        lines.append(f"- **{name_of(c)}**: category mean: {c['text']}")
        if "prompt_weighted" in c:
            lines.append(f"  prompt-weighted: {c['prompt_weighted']['text']}")
    return lines


def seed_summary_lines(summary: dict[str, Any]) -> list[str]:
    return [f"## Over training seeds {summary['seeds']}", "", *seed_table_lines(summary["variants"]), "",
            *claim_lines(summary["claims"]), ""]


def extras_report_lines(extras: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The rewards-and-diversity table of a run or study report (fastpref.eval.diversity), where every model's
    evaluation carries them (a report made before they were measured has none)."""
    from fastpref.eval.diversity import extras_lines, summarize_complete_extras

    summary = summarize_complete_extras(extras)
    return extras_lines(summary) if summary is not None else []


def write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# fastpref run: {out}", ""]
    if "eval" in report:
        categories = list(next(iter(report["eval"].values()))["per_category"])
        lines += ["| model | category mean | prompt-weighted | per-seed scores | " + " | ".join(categories) + " |",
                  "|---|---|---|---|" + "---|" * len(categories)]
        for name, r in report["eval"].items():
            cells = " | ".join(f"{100 * r['per_category'][c]:.1f}" for c in categories)
            seeds = ", ".join(f"{100 * x:.1f}" for x in r.get("seed_scores", []))
            weighted = f"{100 * r['prompt_mean']:.1f}" if "prompt_mean" in r else "-"
            lines.append(f"| {name} | **{100 * r['overall']:.1f}** | {weighted} | {seeds} | {cells} |")
        lines += ["", *improvement_lines(report["eval"]), ""]
        lines += extras_report_lines({name: [r] for name, r in report["eval"].items()})
        if "seeds" in report:
            lines += seed_summary_lines(report["seeds"])
        lines += ["![before/after](grid.png)", ""]
    if "tradeoff" in report:
        from fastpref.eval.tradeoff import report_lines

        lines += report_lines(report["tradeoff"], "tradeoff.png" if (out / "tradeoff.png").exists() else None)
    if (out / "training.png").exists():
        lines += ["![training curves: loss, implicit accuracy, margin](training.png)", ""]
    lines += ["| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in report["seconds"].items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def run(cfg: RunConfig) -> dict[str, Any]:
    from fastpref.data.cache import run_cache
    from fastpref.data.importers import run_import
    from fastpref.data.label import run_label
    from fastpref.data.synth import run_synth
    from fastpref.train.loop import train

    stages = build_stages(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    report: dict[str, Any] = {"config": to_dict(cfg), "seconds": seconds, "train": {}}

    def timed(name, fn, *args, **kwargs):
        print(f"[fastpref run] {name} ...", flush=True)
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds[name] = time.perf_counter() - start
        return result

    if stages.importer is not None:
        timed("import", run_import, stages.importer)
    elif stages.synth is not None:
        timed("synth", run_synth, stages.synth)
        timed("label", run_label, stages.label)
    if stages.cache is not None:  # an online recipe has no data stages: its trainer samples from its prompts
        timed("cache", run_cache, stages.cache)
    for name, train_cfg in stages.trains.items():
        report["train"][name] = timed(f"train {name}", train, train_cfg, resume=True)
    if stages.trains:
        from fastpref.train.metrics import plot_training_curves

        plot_training_curves({name: t.output_dir for name, t in stages.trains.items()}, out / "training.png")
    if cfg.eval is not None:
        report["eval"] = timed("eval", run_eval, stages, cfg, out, report)
        if stages.seeds:
            report["seeds"] = seed_summary(stages, cfg, out)
    write_report(out, report)
    print(f"[fastpref run] report: {out / 'report.md'}")
    return report


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastpref run", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML recipe, e.g. configs/toy-rankdpo.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=10")
    args = parser.parse_args(argv)
    run(load_config(RunConfig, args.config, args.overrides))
    return 0


# a recipe's top-level keys; any other key of a `fastpref train` override belongs to the recipe's `train`
RUN_KEYS = tuple(f.name for f in dataclasses.fields(RunConfig))


def train_config_of_recipe(path: str, overrides: list[str]):
    """A plain TrainConfig YAML, or a `fastpref run` recipe (its main training, on the data `run` caches)."""
    import yaml

    from fastpref.train.config import TrainConfig

    try:
        is_recipe = "train" in (yaml.safe_load(Path(path).read_text()) or {})
    except (OSError, yaml.YAMLError):
        is_recipe = False  # load_config reports it, naming the file
    if not is_recipe:
        return load_config(TrainConfig, path, overrides)
    run_cfg = load_config(RunConfig, path, [o if o.split("=", 1)[0].split(".")[0] in RUN_KEYS else f"train.{o}"
                                            for o in overrides])
    return build_stages(run_cfg).main


def train_cli(argv: list[str]) -> int:
    from fastpref.train.loop import train

    parser = argparse.ArgumentParser(prog="fastpref train", description="train with a preference objective "
                                     "from a YAML recipe (a TrainConfig, or a `fastpref run` recipe's training)")
    parser.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. lr=1e-5 objective.name=dpo")
    args = parser.parse_args(argv)
    summary = train(train_config_of_recipe(args.config, args.overrides), resume=args.resume)
    print(f"[fastpref train] done: {summary}")
    return 0
