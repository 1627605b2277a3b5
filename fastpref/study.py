"""`fastpref study <study.yaml>`: a grid of `fastpref run` variants x training seeds, with one report.

A study names a run recipe (`recipe`), overrides applied to all of it (`overrides`: e.g. smaller sizes), variants
(name -> overrides of the recipe in dotted keys over the whole recipe: `label.rewards`, `synth.generators`,
`train.objective.name`, ...), training seeds (each seed is written into every key of `seed_keys`) and claims
("A > B"). Each (variant, seed) is one training; every stage whose inputs are identical is run once:

    study/synth/<h>/synth           one per synth section
    study/data/<h>/{synth,label}    one per (synth, label) section; synth/ is a link to the shared one
    study/runs/<h>/                 one `fastpref run` per (synth, label, cache) section: its cache, and the
                                    trainings of every variant and seed that use that cache
    study/eval/base.json            the base model, evaluated once
    study/eval/<variant>-seed<s>.json

An online recipe (GRPO, SPO, DRaFT: prompts only, no synth / label / cache) is one `fastpref run` whose trainings
are every (variant, seed); a seed key whose section the recipe lacks (cache.reference_errors.seed there) is skipped.
A variant may name its own run recipe (`recipe: configs/toy-grpo-sd.yaml` among its overrides): offline and online
methods then sit in one report, trained from one base model (checked) and judged by the study recipe's eval section.

Every stage skips finished work (the stages of `fastpref run` do; evaluations are files), so running the same
command again after a kill resumes, and the same seeds give the same table. The report (report.md / .json /
scores.png) gives MiniGenEval overall and per category per variant as mean ± std over training seeds, the
base's seed-to-seed spread, each variant's training seconds, the per-stage seconds and a verdict per claim
(fastpref.eval.verdicts).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastpref.config import ConfigError, apply_overrides, flat_differences, from_dict, load_config
from fastpref.utils.atomic import atomic_file

SEED_KEYS = ["train.seed", "cache.reference_errors.seed"]


@dataclass
class ClaimConfig:
    better: str  # variant (or "base") claimed to score higher
    than: str
    name: str | None = None  # how the report names it (default "better > than")
    # what it is judged on: "minigeneval" (pass / fail), or a reward of the same images ("reward:shapeclip",
    # "reward:shapeclip_contrastive", "reward:quality"; fastpref.eval.verdicts.REWARD_METRICS), prompt-weighted
    metric: str = "minigeneval"


@dataclass
class StudyConfig:
    recipe: str  # a `fastpref run` recipe (e.g. configs/toy-rankdpo.yaml); its own `variants` are ignored
    output_dir: str
    # name -> dotted-key overrides of the recipe ({} = the recipe as it is); `recipe: <path>` among them trains that
    # variant from another run recipe (an online method beside offline ones), from the same base model
    variants: dict[str, dict[str, Any]]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    seed_keys: list[str] = field(default_factory=lambda: list(SEED_KEYS))
    overrides: dict[str, Any] = field(default_factory=dict)  # applied to every variant before its own
    # keys of the recipe's eval section to change, merged key by key (e.g. {split: train}, or on the command line
    # eval.split=train): the same trainings judged another way; changed settings re-evaluate, never retrain
    eval: dict[str, Any] = field(default_factory=dict)
    claims: list[ClaimConfig] = field(default_factory=list)
    progress: bool = True

    def validate(self) -> None:
        if not self.variants:
            raise ConfigError("variants: at least one variant is required")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: a non-empty list of distinct training seeds, got {self.seeds}")
        for name, overrides in self.variants.items():
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ConfigError(f"variants.{name}: names are letters, digits, '-' and '_' (they name folders)")
            for key in overrides or {}:
                if key == "recipe":
                    if not isinstance(overrides[key], str):
                        raise ConfigError(f"variants.{name}.recipe: the path of a run recipe, got {overrides[key]!r}")
                    continue
                if key.split(".")[0] in ("eval", "output_dir", "variants", "main_variant", "data_root"):
                    raise ConfigError(f"variants.{name}.{key}: the study sets {key.split('.')[0]} for every "
                                      "variant (all variants are evaluated on the same prompts and seeds)")
                if key in self.seed_keys:
                    raise ConfigError(f"variants.{name}.{key}: set by the study's seeds (seed_keys)")
        from fastpref.eval.verdicts import MINIGENEVAL, REWARD_METRICS

        for i, claim in enumerate(self.claims):
            if claim.metric != MINIGENEVAL and claim.metric not in REWARD_METRICS:
                raise ConfigError(f"claims[{i}].metric: {claim.metric!r} is not one of "
                                  f"{', '.join([MINIGENEVAL, *REWARD_METRICS])}")
            for side in ("better", "than"):
                value = getattr(claim, side)
                if value != "base" and value not in self.variants:
                    raise ConfigError(f"claims[{i}].{side}: {value!r} is not a variant "
                                      f"(variants: {', '.join(self.variants)}, or base)")


@dataclass
class Training:
    variant: str
    seed: int
    run: str  # key of the `fastpref run` that trains it

    @property
    def name(self) -> str:
        from fastpref.eval.verdicts import seeded_name

        return seeded_name(self.variant, self.seed)


@dataclass
class Plan:
    """What the study runs, each shared stage once (keys are content hashes of the stage's sections)."""

    synth: dict[str, dict]  # synth key -> synth section
    data: dict[str, str]  # data (synth + label) key -> its synth key
    runs: dict[str, dict]  # run key -> the run recipe (data_root/output_dir unset; variants = its trainings)
    run_data: dict[str, str | None]  # run key -> data key (None: an online recipe, prompts only)
    trainings: list[Training]
    eval: dict | None  # the eval section shared by all

    def counts(self) -> dict[str, int]:
        return {"synth": len(self.synth), "label": len(self.data),
                "cache": sum(key is not None for key in self.run_data.values()),
                "train": len(self.trainings), "eval": len(self.trainings) + 1}


def content_key(*sections: Any) -> str:
    return hashlib.sha256(json.dumps(sections, sort_keys=True, default=str).encode()).hexdigest()[:12]


def read_recipe(path: str) -> dict[str, Any]:
    recipe = Path(path)
    if not recipe.is_file():
        raise ConfigError(f"recipe: {path!r} is not a file")
    data = yaml.safe_load(recipe.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe: {path}: expected a mapping at the top level")
    return data


def with_overrides(data: dict[str, Any], overrides: dict[str, Any], section: str) -> dict[str, Any]:
    out = copy.deepcopy(data)
    try:
        apply_overrides(out, [f"{key}={json.dumps(value)}" for key, value in (overrides or {}).items()])
    except ConfigError as err:
        raise ConfigError(f"{section}.{err}") from None
    return out


def variant_recipe(cfg: StudyConfig, recipe: dict[str, Any], variant: str, seed: int) -> dict[str, Any]:
    """The full run recipe of one (variant, seed): recipe (the variant's own, where it names one) + study overrides
    + variant overrides + seed keys."""
    overrides = dict(cfg.variants[variant] or {})
    shared = cfg.overrides or {}
    if "recipe" in overrides:
        try:
            recipe = read_recipe(overrides.pop("recipe"))
        except ConfigError as err:
            raise ConfigError(f"variants.{variant}.{err}") from None
        # the study's overrides are written for its recipe: another recipe takes those whose section it has (an
        # online one has no synth / label / cache to shrink), as seed keys are
        shared = {key: value for key, value in shared.items() if key.split(".")[0] in recipe}
    data = with_overrides(recipe, shared, "overrides")
    data = with_overrides(data, overrides, f"variants.{variant}")
    # a seed key whose section the recipe lacks (an online recipe has no cache) has nothing to seed
    seeded = {key: seed for key in cfg.seed_keys if key.split(".")[0] in data}
    data = with_overrides(data, seeded, "seed_keys")
    for key in ("variants", "main_variant", "data_root", "output_dir", "eval"):
        data.pop(key, None)
    return data


def plan_study(cfg: StudyConfig, recipe: dict[str, Any]) -> Plan:
    from fastpref.pipeline import EvalConfig, RunConfig, build_stages, check_prompts_unscored, online_prompt_sources

    shared = with_overrides(recipe, cfg.overrides, "overrides")
    if shared.get("importer") is not None:
        raise ConfigError("recipe: a study runs Syn-Pic recipes (synth + label) or online ones (prompts only); this "
                          "one has an importer: section")
    plan = Plan({}, {}, {}, {}, [], {**(shared.get("eval") or {}), **cfg.eval})
    from_dict(EvalConfig, plan.eval, "eval.")  # a bad eval key is refused before anything trains
    base = None  # (first variant, its model, its world)
    for variant in cfg.variants:
        for seed in cfg.seeds:
            data = variant_recipe(cfg, recipe, variant, seed)
            # validate every section up front, naming the variant (as `fastpref run` does for its own)
            try:
                run = from_dict(RunConfig, {**data, "output_dir": "-", "eval": None})
                run.validate()
                stages = build_stages(run)
            except ConfigError as err:
                raise ConfigError(f"variants.{variant} (seed {seed}): {err}") from None
            if run.is_online:  # the study's evaluation must not score the policy's training prompts
                try:
                    check_prompts_unscored(from_dict(EvalConfig, dict(plan.eval), "eval."), stages.world,
                                           online_prompt_sources(run, stages))
                except ConfigError as err:
                    raise ConfigError(f"variants.{variant} (seed {seed}): {err}") from None
            # the base is evaluated once, from the first training's model: a variant that starts elsewhere would be
            # judged against a model it never was
            start = (stages.main.model.path, stages.world)
            if base is None:
                base = (variant, *start)
            elif start != base[1:]:
                raise ConfigError(f"variants.{variant}: trains model {start[0]!r} of toy world {start[1]}, but "
                                  f"variants.{base[0]} trains {base[1]!r} of world {base[2]}: every variant of a study "
                                  "starts from the one base it is compared with (train.model.path / cache.model)")
            # the trainings of one run are its first one plus overrides (run_config), which can set keys but not
            # remove them: a variant with its own recipe trains in a run of its own
            own = [cfg.variants[variant]["recipe"]] if "recipe" in (cfg.variants[variant] or {}) else []
            if data.get("synth") is None:  # online: the policy samples its own images; one run trains them all
                run_key = content_key({key: value for key, value in data.items() if key != "train"}, *own)
                plan.run_data[run_key] = None
            else:
                synth_key = content_key(data["synth"])
                data_key = content_key(data["synth"], data["label"])
                run_key = content_key(data["synth"], data["label"], data["cache"], *own)
                plan.synth[synth_key] = data["synth"]
                plan.data[data_key] = synth_key
                plan.run_data[run_key] = data_key
            training = Training(variant, seed, run_key)
            run = plan.runs.setdefault(run_key, {**{k: v for k, v in data.items() if k != "train"}, "trainings": {}})
            run["trainings"][training.name] = data["train"]
            plan.trainings.append(training)
    return plan


class Study:
    def __init__(self, cfg: StudyConfig):
        cfg.validate()
        self.cfg = cfg
        self.recipe = read_recipe(cfg.recipe)
        self.plan = plan_study(cfg, self.recipe)
        self.out = Path(cfg.output_dir)

    # -- paths ---------------------------------------------------------------------------------------------
    def synth_root(self, synth_key: str) -> Path:
        return self.out / "synth" / synth_key

    def data_root(self, data_key: str) -> Path:
        return self.out / "data" / data_key

    def run_dir(self, run_key: str) -> Path:
        return self.out / "runs" / run_key

    def eval_path(self, name: str) -> Path:
        return self.out / "eval" / f"{name}.json"

    # -- stages --------------------------------------------------------------------------------------------
    def run_config(self, run_key: str):
        """The `fastpref run` of one cache: every training that reads it, as that run's variants; no eval (the
        study evaluates each model once, the base once for all)."""
        from fastpref.pipeline import RunConfig

        run = copy.deepcopy(self.plan.runs[run_key])
        trainings = run.pop("trainings")
        names = list(trainings)
        data = {**run, "train": trainings[names[0]], "main_variant": names[0], "eval": None,
                "output_dir": str(self.run_dir(run_key)), "progress": self.cfg.progress}
        if self.plan.run_data[run_key] is not None:
            data["data_root"] = str(self.data_root(self.plan.run_data[run_key]))
        # each further training as overrides of the first: only the keys that differ
        data["variants"] = {name: flat_differences(trainings[names[0]], trainings[name]) for name in names[1:]}
        return from_dict(RunConfig, data)

    def link_synth(self, data_key: str) -> None:
        """data/<h>/synth -> synth/<h>/synth, so that label variants of one synth section share its images."""
        target = self.synth_root(self.plan.data[data_key]) / "synth"
        target.mkdir(parents=True, exist_ok=True)
        link = self.data_root(data_key) / "synth"
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            if link.resolve() != target.resolve():
                raise ConfigError(f"{link}: exists and is not the study's shared synth folder {target}")
            return
        os.symlink(os.path.relpath(target, link.parent), link)

    def run(self) -> dict[str, Any]:
        from fastpref.pipeline import run as run_pipeline

        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "plan.json").write_text(json.dumps(
            {"counts": self.plan.counts(), "trainings": [t.__dict__ for t in self.plan.trainings]}, indent=2) + "\n")
        # seconds spent in every invocation of this study, per stage kind and per training: a resumed or re-run
        # study skips finished stages, and its report must still say what each result cost (each variant's scores
        # stand beside its trainings' seconds), not what the last invocation re-checked
        ledger = self.out / "seconds.json"
        spent = json.loads(ledger.read_text()) if ledger.exists() else {}
        if "stages" not in spent:  # a ledger written before trainings were counted apart: stage kinds only
            spent = {"stages": spent, "trainings": {}}
        seconds: dict[str, float] = {}
        trainings: dict[str, float] = {}
        for i, run_key in enumerate(self.plan.runs):
            print(f"[fastpref study] run {i + 1}/{len(self.plan.runs)}: {self.run_dir(run_key)}", flush=True)
            if self.plan.run_data[run_key] is not None:
                self.link_synth(self.plan.run_data[run_key])
            report = run_pipeline(self.run_config(run_key))
            for stage, value in report["seconds"].items():
                kind, _, name = stage.partition(" ")
                seconds[kind] = seconds.get(kind, 0.0) + value
                if kind == "train":
                    trainings[name] = value
        start = time.perf_counter()
        results = self.evaluate()
        seconds["eval"] = time.perf_counter() - start

        def added(before: dict[str, float], now: dict[str, float]) -> dict[str, float]:
            return {key: before.get(key, 0.0) + now.get(key, 0.0) for key in {**before, **now}}

        spent = {"stages": added(spent["stages"], seconds), "trainings": added(spent["trainings"], trainings)}
        with atomic_file(ledger, "w") as handle:
            handle.write(json.dumps(spent, indent=2) + "\n")
        report = build_report(self.cfg, results, spent["stages"], self.plan.counts(), spent["trainings"])
        write_study_report(self.out, report)
        print(f"[fastpref study] report: {self.out / 'report.md'}")
        return report

    def evaluate(self) -> dict[str, dict[str, Any]]:
        """MiniGenEval of the base (once) and of every trained model; a finished evaluation is read back."""
        from fastpref.pipeline import EvalConfig, build_stages

        ev = from_dict(EvalConfig, self.plan.eval or {})
        first = self.run_config(next(iter(self.plan.runs)))
        world = build_stages(first).world  # the recipe's toy world (fastpref.pipeline.recipe_world)
        if ev.world is None:
            ev.world = world
        elif ev.world != world:
            raise ConfigError(f"eval.world: {ev.world!r}, but the recipe's models speak toy world {world}")
        results = {"base": self._evaluated("base", lambda: self._base_pipeline(), ev)}
        for training in self.plan.trainings:
            run = self.run_config(training.run)
            stages_train = _train_config(run, training.name)
            results[training.name] = self._evaluated(training.name, lambda: _trained(stages_train), ev)
        return results

    def _base_pipeline(self):
        from fastpref.models import load

        first = self.run_config(next(iter(self.plan.runs)))
        train = _train_config(first, first.main_variant)
        return load(train.model.path, family=train.model.family).pipeline

    def _evaluated(self, name: str, make_pipeline, ev) -> dict[str, Any]:
        from fastpref.eval.diversity import eval_extras
        from fastpref.pipeline import eval_identity, evaluate_pipeline

        path = self.eval_path(name)
        stored = json.loads(path.read_text()) if path.exists() else None
        if stored is not None:
            same_settings = stored["settings"].get("eval_config") == eval_identity(ev)
            if same_settings and "reward_per_image" in stored.get("extras", {}):
                return stored
            # the study's eval section changed since (or the file predates the record of its settings, or of the
            # rewards and diversity of its images, image by image): a stale score must not pass for the new one
            why = "made with other eval settings" if not same_settings else "made before each image's rewards were kept"
            print(f"[fastpref study] {path}: {why}; evaluating {name} again", flush=True)
        result = evaluate_pipeline(make_pipeline(), ev, self._call_kwargs(), progress=self.cfg.progress)
        data = result.to_json()
        # the images are not stored: their rewards and diversity are measured now, beside the scores
        data["extras"] = eval_extras(result, self._shapeclip(ev.world), per_image=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)  # a killed evaluation leaves no file that looks finished
        print(f"[fastpref study] MiniGenEval {name}: {100 * result.overall:.1f}%", flush=True)
        return json.loads(path.read_text())

    def _shapeclip(self, world: str):
        """The shipped ShapeCLIP of the evaluated world, loaded once per study."""
        from fastpref.toy import shapeclip

        if getattr(self, "_shapeclip_model", (None, None))[0] != world:
            self._shapeclip_model = (world, shapeclip.load_shipped(world_name=world))
        return self._shapeclip_model[1]

    def _call_kwargs(self) -> dict:
        from fastpref.models import resolve_path
        from fastpref.models.bundle import pipeline_call_kwargs

        first = self.run_config(next(iter(self.plan.runs)))
        return pipeline_call_kwargs(resolve_path(_train_config(first, first.main_variant).model.path))


def _train_config(run_cfg, name: str):
    from fastpref.pipeline import build_stages

    return build_stages(run_cfg).trains[name]


def _trained(train_cfg):
    from fastpref.pipeline import trained_pipeline

    return trained_pipeline(train_cfg)


# -- the report ------------------------------------------------------------------------------------------------


def build_report(cfg: StudyConfig, results: dict[str, dict[str, Any]], seconds: dict[str, float],
                 counts: dict[str, int], training_seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """`seconds`: per stage kind; `training_seconds`: per training ("<variant>-seed<s>"), whose mean ± std over the
    seeds each variant's row gets (train_seconds, train_seconds_std)."""
    import numpy as np

    from fastpref.eval.verdicts import judge_seeded_claim, runs_of, seeded_name, variant_statistics
    from fastpref.utils.stats import sample_std

    stats = variant_statistics(results, list(cfg.variants), cfg.seeds)
    for variant in cfg.variants:
        spent = [(training_seconds or {}).get(seeded_name(variant, seed)) for seed in cfg.seeds]
        if all(value is not None for value in spent):
            stats[variant]["train_seconds"] = float(np.mean(spent))
            stats[variant]["train_seconds_std"] = sample_std(spent)
    eval_spread = results["base"]["seed_spread"]
    claims = [{"name": claim.name or f"{claim.better} > {claim.than}",
               **judge_seeded_claim(results, stats, claim.better, claim.than, cfg.seeds, claim.metric)}
              for claim in cfg.claims]
    report = {"recipe": cfg.recipe, "seeds": cfg.seeds, "counts": counts, "variants": stats, "claims": claims,
              "base_eval_seed_spread": eval_spread, "seconds": seconds}
    extras = {name: [run.get("extras") for run in runs_of(results, name, cfg.seeds)]
              for name in ["base", *cfg.variants]}
    from fastpref.eval.diversity import summarize_complete_extras

    summary = summarize_complete_extras(extras)
    if summary is not None:
        report["extras"] = summary
    return report


def write_study_report(out: Path, report: dict[str, Any]) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    from fastpref.pipeline import claim_lines, seed_table_lines

    stats = report["variants"]
    lines = [f"# fastpref study: {out}", "",
             f"Recipe `{report['recipe']}`, training seeds {report['seeds']}; MiniGenEval as mean ± std over the "
             f"training seeds (the base: one model), beside each variant's training seconds (wall, on the machine of "
             f"its trainings' summary.json `host`). Seed-to-seed spread of the base's evaluation: "
             f"{100 * report['base_eval_seed_spread']:.1f} points (category mean)"
             + (f", {100 * stats['base']['prompt_mean_eval_seed_spread']:.1f} points (prompt-weighted)."
                if "prompt_mean_eval_seed_spread" in stats["base"] else "."), "", *seed_table_lines(stats)]
    lines += ["", "## Claims", ""]
    lines += claim_lines(report["claims"], name_of=lambda c: c["name"])
    if "extras" in report:
        from fastpref.eval.diversity import extras_lines

        lines += ["", *extras_lines(report["extras"])]
    lines += ["", "![MiniGenEval per variant](scores.png)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["seconds"].items()]
    lines += ["", "Stages run: " + ", ".join(f"{k} {v}" for k, v in report["counts"].items()), ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot_scores(stats, out / "scores.png")


def plot_scores(stats: dict[str, dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stats)
    means = [100 * stats[n]["overall"] for n in names]
    errors = [100 * stats[n]["overall_std"] for n in names]
    timed = [n for n in names if "train_seconds" in stats[n]]
    width = 1.2 * len(names) + 2
    if timed:  # beside the bars: each variant's score against the seconds its trainings took
        fig, (ax, cost) = plt.subplots(1, 2, figsize=(width + 5, 3.5), gridspec_kw={"width_ratios": [width, 5]})
    else:
        fig, ax = plt.subplots(figsize=(width, 3.5))
    ax.bar(names, means, yerr=errors, capsize=4, color=["#999999"] + ["#4c72b0"] * (len(names) - 1))
    spread = 100 * stats["base"].get("eval_seed_spread", 0.0)
    ax.axhspan(means[0] - spread, means[0] + spread, color="#999999", alpha=0.2, label="base ± eval-seed spread")
    ax.set_ylabel("MiniGenEval overall (%)")
    ax.legend(loc="lower right", fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    if timed:
        cost.axhspan(means[0] - spread, means[0] + spread, color="#999999", alpha=0.2)
        cost.axhline(means[0], color="#999999", lw=1)
        for n in timed:
            x, y = stats[n]["train_seconds"], 100 * stats[n]["overall"]
            cost.errorbar(x, y, xerr=stats[n]["train_seconds_std"], yerr=100 * stats[n]["overall_std"], fmt="o",
                          color="#4c72b0", capsize=3)
            cost.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        cost.set_xscale("log")
        cost.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        cost.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        cost.set_xlabel("training seconds per run (log)")
        cost.set_ylabel("MiniGenEval overall (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastpref study", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="study YAML, e.g. configs/studies/rankdpo-ablations.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the study, e.g. seeds=[0]")
    parser.add_argument("--plan", action="store_true", help="print the stages the study would run, then stop")
    args = parser.parse_args(argv)
    study = Study(load_config(StudyConfig, args.config, args.overrides))
    if args.plan:
        print(json.dumps({"counts": study.plan.counts(),
                          "trainings": [f"{t.name} -> runs/{t.run}" for t in study.plan.trainings]}, indent=2))
        return 0
    study.run()
    return 0
