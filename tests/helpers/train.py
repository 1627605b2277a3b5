"""Trainer configs and runs for the tests under tests/train (and any other that trains on the tiny cached
dataset of tests/train/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fastpref.config import from_dict
from fastpref.train.config import TrainConfig


def make_config(ds: dict[str, str], out, **overrides) -> TrainConfig:
    """A 4-step LoRA run on the tiny dataset `ds` (the cached_dataset fixture); dotted keys override."""
    data = {
        "model": {"path": ds["model"]},
        "data": {"root": ds["root"], "batch_groups": 2},
        "output_dir": str(out),
        "max_steps": 4,
        "checkpoint_every": 2,
        "progress": False,
        "tensorboard": False,
        "lr": 1e-3,
        "loss_backend": "reference",
    }
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return from_dict(TrainConfig, data)


def train_command(config_path: str | Path, resume: bool = False) -> list[str]:
    """`fastpref train` on a config file, as a user runs it."""
    return [sys.executable, "-m", "fastpref.cli", "train", "--config", str(config_path)] + (["--resume"] if resume else [])


def run_train_cli(config_path: str | Path, resume: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(train_command(config_path, resume), env=env, capture_output=True, text=True, timeout=timeout)


def start_and_kill_when(command: list[str], condition, log: str | Path, timeout: float = 600,
                        env: dict[str, str] | None = None) -> int:
    """Run `command` (in its own process group, output to `log`) and SIGKILL the whole group from outside as soon as
    `condition()` holds, as a crash or an OOM kill would; returns its exit status (-9 when killed)."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if condition():
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{command}: no kill condition within {timeout} s")
                time.sleep(0.02)
            return proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
