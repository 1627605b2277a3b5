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
    return train_config(data, **overrides)


def train_config(data: dict, **overrides) -> TrainConfig:
    """TrainConfig of a nested dict after dotted-key overrides (`"objective.name": "dpo"` sets data["objective"]["name"])."""
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


def write_train_config(cfg: TrainConfig, path: Path) -> Path:
    """`cfg` as the YAML file a user would pass to `fastpref train --config`."""
    import yaml

    from fastpref.config import to_dict

    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


def launch_train(config_path: str | Path, nproc: int = 1, resume: bool = False,
                 timeout: float = 900) -> subprocess.CompletedProcess:
    """`fastpref train` in a subprocess; nproc > 1: that many processes under torch.distributed.run (gloo on CPU)."""
    command = train_command(config_path, resume)
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   *command[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def sigkill_once_logged_then_resume(config_path: str | Path, out_dir: str | Path, step: int, log: str | Path) -> None:
    """`fastpref train` on `config_path`, SIGKILLed from outside as soon as its metrics.jsonl logs `step`, then run
    again with --resume to the end; asserts that the kill happened and that the resumed run succeeded."""
    import json

    metrics = Path(out_dir) / "metrics.jsonl"

    def logged() -> bool:
        return metrics.exists() and any(json.loads(line)["step"] == step for line in metrics.read_text().splitlines()
                                        if line.strip())

    status = start_and_kill_when(train_command(config_path), logged, log)
    assert status == -9, Path(log).read_text()[-3000:]
    resumed = launch_train(config_path, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-4000:]


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


def run_deepspeed_worker(source: str, cached_dataset: dict, tmp_path) -> dict:
    """Run `source` as a 1-process DeepSpeed (CPU) worker on a free port: argv = tests dir, the cached dataset as
    JSON, tmp_path; returns the JSON it prints after "RESULT "."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(tmp_path) / "worker.py"
    script.write_text(source)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    proc = subprocess.run([sys.executable, str(script), str(Path(__file__).resolve().parents[1]),
                           json.dumps(cached_dataset), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
