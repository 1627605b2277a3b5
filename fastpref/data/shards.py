"""Sharded stage outputs: atomic shard writes, a manifest per stage, validation on open.

A stage (synth, label, cache) writes into `<root>/<stage>/`:

    plan.json              what the stage is computing: config + its hash, the upstream fingerprint, the shard count
    shard-00000/           one committed shard: its files and shard.json (per file: bytes, sha256, shape, dtype)
    .shard-00003.*.tmp     a shard being written (renamed into place when complete, never read)
    manifest.json          written once every shard is committed: per shard its group count, field shapes and the
                           sha256 of its shard.json; the stage's fingerprint is the sha256 of this file

Workers take shards without a coordinator: each shard is written to a private temp dir and renamed into place,
so a killed worker leaves no partial shard and a rerun skips committed ones. Every output is a pure function of
the config and the shard index (no timestamps, hosts or timings), so any split of the work over processes, or a
killed-and-restarted run, yields byte-identical files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fastpref.config import to_dict
from fastpref.utils.atomic import atomic_dir, atomic_file

FORMAT_VERSION = 1
PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.json"
SHARD_INFO_FILE = "shard.json"
Verify = Literal["none", "size", "checksum"]


class ShardError(RuntimeError):
    """A stage directory that cannot be trusted; the message names the file and what is wrong."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def config_hash(config: Any) -> str:
    """sha256 of a config's canonical JSON (dataclasses are converted with fastpref.config.to_dict)."""
    data = to_dict(config) if dataclasses.is_dataclass(config) else config
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path, "w") as handle:
        handle.write(text)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def assigned_shards(num_shards: int, worker_index: int, num_workers: int) -> list[int]:
    """The shards one worker of `num_workers` owns: a fixed round-robin, so workers never overlap."""
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"worker index {worker_index} is outside [0, num_workers={num_workers})")
    return list(range(worker_index, num_shards, num_workers))


def worker_from_env(shard_index: int | None, num_workers: int | None) -> tuple[int, int]:
    """(worker index, worker count): explicit arguments (job arrays) win, then torchrun's RANK / WORLD_SIZE,
    else (0, 1)."""
    if shard_index is not None or num_workers is not None:
        if shard_index is None or num_workers is None:
            raise ValueError("shard_index and num_workers must be given together")
        return shard_index, num_workers
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardWriter:
    """Collects the files of one shard inside its temp dir; `StageDir.write_shard` commits them."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files: dict[str, dict[str, Any]] = {}

    def _record(self, relpath: str, extra: dict[str, Any]) -> None:
        path = self.directory / relpath
        self.files[relpath] = {"bytes": path.stat().st_size, "sha256": sha256_file(path), **extra}

    def save_array(self, relpath: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        if array.dtype == object:
            raise TypeError(f"{relpath}: object arrays cannot be stored (pickled .npy is not allowed)")
        path = self.directory / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, array, allow_pickle=False)
        self._record(relpath, {"shape": list(array.shape), "dtype": array.dtype.str})

    def save_json(self, relpath: str, obj: Any) -> None:
        path = self.directory / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(canonical_json(obj))
        self._record(relpath, {})


@dataclasses.dataclass
class Manifest:
    """A validated, complete stage: what downstream stages and the streams read."""

    path: Path
    data: dict[str, Any]
    fingerprint: str

    @property
    def config(self) -> dict[str, Any]:
        return self.data["config"]

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.data["shards"]

    def shard_dir(self, index: int) -> Path:
        return self.path / self.shards[index]["name"]

    def shard_info(self, index: int) -> dict[str, Any]:
        return json.loads((self.shard_dir(index) / SHARD_INFO_FILE).read_text())

    def load(self, index: int, relpath: str, mmap: bool = False) -> np.ndarray:
        path = self.shard_dir(index) / relpath
        try:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ShardError(f"{path}: cannot read array ({err})") from None

    def load_json(self, index: int, relpath: str) -> Any:
        return json.loads((self.shard_dir(index) / relpath).read_text())


class StageDir:
    """One stage's output directory: plan, shard commits, manifest."""

    def __init__(self, root: str | Path, stage: str):
        self.root = Path(root)
        self.stage = stage
        self.path = self.root / stage

    # -- writing ---------------------------------------------------------------------------------------------
    def prepare(self, config: Any, num_shards: int, input_fingerprint: str | None, overwrite: bool = False) -> dict:
        """Write plan.json, or check that an existing one describes the same work (then finished shards are kept)."""
        config_dict = to_dict(config) if dataclasses.is_dataclass(config) else config
        plan = {
            "format": FORMAT_VERSION,
            "stage": self.stage,
            "config": config_dict,
            "config_hash": config_hash(config_dict),
            "input_fingerprint": input_fingerprint,
            "num_shards": num_shards,
        }
        plan_path = self.path / PLAN_FILE
        if overwrite and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        if plan_path.exists():
            old = self._read_json(plan_path)
            for key in ("config_hash", "input_fingerprint", "num_shards"):
                if old.get(key) != plan[key]:
                    raise ShardError(
                        f"{plan_path}: this {self.stage} output was produced with a different {key} "
                        f"({old.get(key)!r} != {plan[key]!r}); write to a new directory or pass overwrite=True"
                    )
            return old
        atomic_write_text(plan_path, canonical_json(plan))
        return plan

    def shard_dir(self, index: int) -> Path:
        return self.path / shard_name(index)

    def is_done(self, index: int) -> bool:
        return (self.shard_dir(index) / SHARD_INFO_FILE).exists()

    @contextlib.contextmanager
    def write_shard(self, index: int, num_groups: int) -> Iterator[ShardWriter]:
        """Yield a writer into a fresh temp dir; on a clean exit write shard.json and rename into place."""
        name = shard_name(index)
        for stale in self.path.glob(f".{name}.*.tmp"):  # left by a killed worker that owned this shard
            shutil.rmtree(stale, ignore_errors=True)
        with atomic_dir(self.shard_dir(index)) as tmp:
            writer = ShardWriter(tmp)
            yield writer
            info = {"name": name, "num_groups": num_groups, "files": dict(sorted(writer.files.items()))}
            (tmp / SHARD_INFO_FILE).write_text(canonical_json(info))

    def finalize(self) -> Manifest | None:
        """Write manifest.json once every shard is committed (any worker may; the content is the same); else None."""
        plan = self._read_json(self.path / PLAN_FILE)
        if not all(self.is_done(i) for i in range(plan["num_shards"])):
            return None
        shards, fields = [], {}
        for i in range(plan["num_shards"]):
            info_path = self.shard_dir(i) / SHARD_INFO_FILE
            info = self._read_json(info_path)
            info_sha256 = sha256_file(info_path)
            shards.append({"name": info["name"], "num_groups": info["num_groups"], "info_sha256": info_sha256})
            for relpath, entry in info["files"].items():
                if "shape" in entry:
                    # per-group files (field/gNNN.npy) share one item shape; per-shard arrays vary in length
                    shape = entry["shape"] if "/" in relpath else [None, *entry["shape"][1:]]
                    spec = {"shape": shape, "dtype": entry["dtype"], "per_group_file": "/" in relpath}
                    known = fields.setdefault(_field_of(relpath), spec)
                    if known != spec:
                        raise ShardError(
                            f"{self.shard_dir(i) / relpath}: shape {entry['shape']} / dtype {entry['dtype']} does not "
                            f"match the rest of the stage ({known['shape']} / {known['dtype']})"
                        )
        manifest = {**plan, "num_groups": sum(s["num_groups"] for s in shards), "fields": fields, "shards": shards}
        atomic_write_text(self.path / MANIFEST_FILE, canonical_json(manifest))
        return self.open(verify="none")

    # -- reading ---------------------------------------------------------------------------------------------
    def _read_json(self, path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise ShardError(f"{path}: missing") from None
        except json.JSONDecodeError as err:
            raise ShardError(f"{path}: truncated or corrupt JSON ({err})") from None

    def open(self, verify: Verify = "size") -> Manifest:
        """The complete stage, checked: every shard present and, per `verify`, every file's size or sha256."""
        manifest_path = self.path / MANIFEST_FILE
        if not manifest_path.exists():
            plan_path = self.path / PLAN_FILE
            if not plan_path.exists():
                raise ShardError(f"{self.path}: no {self.stage} output here (no {PLAN_FILE} or {MANIFEST_FILE})")
            plan = self._read_json(plan_path)
            missing = [shard_name(i) for i in range(plan["num_shards"]) if not self.is_done(i)]
            if missing:
                shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                raise ShardError(
                    f"{self.path}: {self.stage} is incomplete, {len(missing)} of {plan['num_shards']} shards missing "
                    f"({shown}); rerun the {self.stage} stage to finish it"
                )
            self.finalize()
        data = self._read_json(manifest_path)
        if data.get("format") != FORMAT_VERSION or data.get("stage") != self.stage:
            raise ShardError(f"{manifest_path}: not a format-{FORMAT_VERSION} {self.stage} manifest")
        for shard in data["shards"]:
            self._validate_shard(self.path / shard["name"], shard, verify)
        return Manifest(self.path, data, sha256_file(manifest_path))

    def _validate_shard(self, directory: Path, entry: dict, verify: Verify) -> None:
        info_path = directory / SHARD_INFO_FILE
        if not info_path.exists():
            raise ShardError(f"{directory}: shard listed in {MANIFEST_FILE} is missing")
        if sha256_file(info_path) != entry["info_sha256"]:
            raise ShardError(f"{info_path}: does not match {MANIFEST_FILE} (shard rewritten or corrupt)")
        if verify == "none":
            return
        for relpath, expected in self._read_json(info_path)["files"].items():
            path = directory / relpath
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise ShardError(f"{path}: missing (listed in {info_path})") from None
            if size != expected["bytes"]:
                raise ShardError(f"{path}: truncated or altered: {size} bytes, expected {expected['bytes']}")
            if verify == "checksum" and sha256_file(path) != expected["sha256"]:
                raise ShardError(f"{path}: sha256 checksum mismatch (corrupt file)")


def _field_of(relpath: str) -> str:
    """'latents/g00000012.npy' -> 'latents'; 'psi.npy' -> 'psi'."""
    return relpath.split("/", 1)[0] if "/" in relpath else relpath.rsplit(".", 1)[0]


def run_stage(
    stage: StageDir,
    shard_ids: list[int],
    groups_in_shard,
    write_shard,
    progress: bool = True,
) -> Manifest | None:
    """Compute this worker's unfinished shards (`write_shard(index, writer)`), then finalize if all are done.

    Returns the stage's Manifest when every shard (this worker's and the others') is committed, else None.
    """
    from tqdm.auto import tqdm

    todo = [i for i in shard_ids if not stage.is_done(i)]
    total = sum(groups_in_shard(i) for i in shard_ids)
    done = total - sum(groups_in_shard(i) for i in todo)
    bar = tqdm(total=total, initial=done, desc=stage.stage, unit="group", disable=not progress, dynamic_ncols=True)
    with bar:
        for index in todo:
            with stage.write_shard(index, groups_in_shard(index)) as writer:
                write_shard(index, writer)
            bar.update(groups_in_shard(index))
    return stage.finalize()


def run_worker_stage(
    stage: StageDir,
    config: Any,
    plan_config: dict[str, Any],
    input_fingerprint: str | None,
    shard_groups: list[int],
    load: Callable[[], Any],
    write_shard: Callable[[int, ShardWriter, Any], None],
) -> Manifest | None:
    """A stage's whole run for this worker: plan, take the worker's shards, compute the unfinished ones.

    `config` is the stage config; its overwrite, shard_index, num_workers and progress fields are read.
    `plan_config` goes to plan.json (a resumed run must match it), `shard_groups[i]` is shard i's group count.
    `load()` builds the stage's models once, before the first shard this worker writes (a worker with
    nothing left to do loads none); each shard is written by `write_shard(index, writer, loaded)`.
    Returns the stage's Manifest once every worker's shards are committed, else None (see run_stage).
    """
    stage.prepare(plan_config, len(shard_groups), input_fingerprint, overwrite=config.overwrite)
    worker, num_workers = worker_from_env(config.shard_index, config.num_workers)
    loaded: list[Any] = []  # [load()] once loaded

    def write(index: int, writer: ShardWriter) -> None:
        if not loaded:
            loaded.append(load())
        write_shard(index, writer, loaded[0])

    shard_ids = assigned_shards(len(shard_groups), worker, num_workers)
    return run_stage(stage, shard_ids, shard_groups.__getitem__, write, progress=config.progress)


def stage_config(config: Any, runtime_fields: tuple[str, ...]) -> dict[str, Any]:
    """A config as a dict without the fields that do not change the output (paths, devices, worker split...)."""
    data = to_dict(config)
    return {k: v for k, v in data.items() if k not in runtime_fields}
