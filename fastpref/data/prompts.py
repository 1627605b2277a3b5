"""Prompt lists from text files (one per line), JSONL, parquet, or a toy world (`toy:train`, `toy-v2:eval`, ...).

Each prompt gets a stable string id (the file's id column when there is one, else its line/row number), which
seeds its images, so editing other lines of the file does not change this prompt's images.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from fastpref.utils.imports import require

TEXT_FIELDS = ("prompt", "caption", "text")
ID_FIELDS = ("id", "prompt_id", "uid")


@dataclasses.dataclass
class PromptSource:
    """Where prompts come from. `path`: .txt / .jsonl / .parquet file, or a toy split: `toy:train`, `toy:eval`,
    or `toy:train-balanced` (the training captions category by category in turn, each category's list cycled, so
    every GenEval category is equally frequent as in pretraining; a caption may repeat under a new id) of world
    v1; `toy-v2:train`, `toy-v2:eval`, `toy-v2:train-balanced` the same of world v2 (toy_prompt_world).
    `toy:eval-unscored-N` (`toy-v2:eval-unscored-N`): the held-out captions that MiniGenEval does not score at
    max_prompts_per_category N: prompts an online method may train on that bind what the pretraining never bound,
    disjoint from the captions its evaluation scores (fastpref run refuses an online recipe whose prompts overlap
    them)."""

    path: str
    field: str | None = None  # the text column/key; default: the first of prompt, caption, text
    id_field: str | None = None  # default: the first of id, prompt_id, uid, else the row number
    limit: int | None = None  # keep the first N prompts
    deduplicate: bool = False  # drop repeated prompt texts (keeps the first)

    def validate(self) -> None:
        from fastpref.config import ConfigError

        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: must be >= 1, got {self.limit}")


@dataclasses.dataclass(frozen=True)
class Prompt:
    id: str
    text: str


def _pick(keys, wanted: str | None, defaults: tuple[str, ...], source: str, what: str) -> str | None:
    if wanted is not None:
        if wanted not in keys:
            raise KeyError(f"{source}: no {what} column/key {wanted!r}; found {sorted(keys)}")
        return wanted
    return next((k for k in defaults if k in keys), None)


def _rows_to_prompts(rows: list[dict], source: PromptSource) -> list[Prompt]:
    if not rows:
        return []
    keys = set(rows[0])
    text_key = _pick(keys, source.field, TEXT_FIELDS, source.path, "prompt")
    if text_key is None:
        raise KeyError(f"{source.path}: none of the prompt keys {list(TEXT_FIELDS)} found; set field=...")
    id_key = _pick(keys, source.id_field, ID_FIELDS, source.path, "id")
    prompts = []
    for row_number, row in enumerate(rows):
        text = row.get(text_key)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{source.path}: row {row_number + 1}: {text_key!r} is empty or not text: {text!r}")
        prompt_id = str(row[id_key]) if id_key is not None else f"{row_number:08d}"
        prompts.append(Prompt(prompt_id, text.strip()))
    return prompts


def balanced_by_category(specs: list) -> list:
    """Round robin over the specs' categories (first-seen order), cycling each category's list, until the largest
    category has appeared in full once: every prefix is as balanced as it can be."""
    by_category: dict[str, list] = {}
    for spec in specs:
        by_category.setdefault(spec.category, []).append(spec)
    rounds = max((len(group) for group in by_category.values()), default=0)
    return [group[i % len(group)] for i in range(rounds) for group in by_category.values()]


FIXED_TOY_SPLITS = ("train", "eval", "train-balanced")
UNSCORED_SPLIT = re.compile(r"eval-unscored-([1-9][0-9]*)")  # N: MiniGenEval's max_prompts_per_category
TOY_SPLITS = (*FIXED_TOY_SPLITS, "eval-unscored-N")  # as error messages name them


def toy_prompt_world(path: str) -> str | None:
    """The toy world of a prompt source: `toy:<split>` is world v1 (it predates worlds), `toy-<world>:<split>` that
    world; None for a file. A toy-looking path with an unknown world or split is an error naming both."""
    from fastpref.toy.world import WORLDS

    prefix, colon, split = path.partition(":")
    if not colon or not (prefix == "toy" or prefix.startswith("toy-")):
        return None
    world_name = "v1" if prefix == "toy" else prefix[len("toy-"):]
    choices = [f"toy:{s}" for s in TOY_SPLITS] + [f"toy-{w}:{s}" for w in WORLDS if w != "v1" for s in TOY_SPLITS]
    if world_name not in WORLDS or (split not in FIXED_TOY_SPLITS and not UNSCORED_SPLIT.fullmatch(split)):
        raise ValueError(f"prompt source {path!r}: expected a file or one of {choices}")
    return world_name


def _toy_prompts(path: str, world_name: str) -> list[Prompt]:
    from fastpref.toy import world

    split = path.partition(":")[2]
    unscored = UNSCORED_SPLIT.fullmatch(split)
    if unscored:
        from fastpref.eval.minigeneval import select_prompts

        scored = {spec.caption for spec in select_prompts(int(unscored.group(1)), world_name)}
        specs = [spec for spec in world.eval_prompts(world_name) if spec.caption not in scored]
    else:
        specs = {"train": world.train_prompts, "eval": world.eval_prompts,
                 "train-balanced": lambda w: balanced_by_category(world.train_prompts(w))}[split](world_name)
    # v1's ids ("train-00000") predate worlds and seed images: they stay; other worlds' say which world
    id_prefix = split if world_name == "v1" else f"{world_name}-{split}"
    return [Prompt(f"{id_prefix}-{i:05d}", spec.caption) for i, spec in enumerate(specs)]


def read_prompts(source: PromptSource) -> list[Prompt]:
    """The prompt list, in file order; ids must be unique (a duplicate id is an error naming it)."""
    path = source.path
    toy_world = toy_prompt_world(path)
    if toy_world is not None:
        prompts = _toy_prompts(path, toy_world)
    else:
        file = Path(path)
        if not file.exists():
            raise FileNotFoundError(f"prompt file {path}: not found")
        suffix = file.suffix.lower()
        if suffix == ".txt":
            lines = [line.strip() for line in file.read_text().splitlines()]
            prompts = [Prompt(f"{i:08d}", text) for i, text in enumerate(lines) if text]
        elif suffix in (".jsonl", ".json"):
            rows = []
            for number, line in enumerate(file.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}: line {number}: invalid JSON ({err})") from None
            prompts = _rows_to_prompts(rows, source)
        elif suffix == ".parquet":
            parquet = require("pyarrow.parquet", "reading prompts from parquet")
            prompts = _rows_to_prompts(parquet.read_table(file).to_pylist(), source)
        else:
            raise ValueError(f"prompt file {path}: unknown extension {suffix!r} (use .txt, .jsonl or .parquet)")
    if source.deduplicate:
        seen: set[str] = set()
        prompts = [p for p in prompts if not (p.text in seen or seen.add(p.text))]
    if source.limit is not None:
        prompts = prompts[: source.limit]
    ids: set[str] = set()
    for prompt in prompts:
        if prompt.id in ids:
            raise ValueError(f"{path}: prompt id {prompt.id!r} appears twice; ids must be unique")
        ids.add(prompt.id)
    return prompts
