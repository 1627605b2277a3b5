"""What every benchmark shares: the device, synchronized timing, and results files that say where they came from.

    device = resolve_device(args.device)            # "auto" | "cpu" | "cuda"
    times_ms = time_it(fn, device, warmup, iters)   # CUDA events on GPU, perf_counter on CPU
    with PhaseTimer(device)("policy"): ...          # exclusive wall time per phase, synced at the edges
    write_csv(path, rows)                           # + env_* columns: device, versions, native ops

A result without its device and versions cannot be compared with another, so write_csv adds them to
every row (fastpref.env_report.environment, the same facts `fastpref env` prints).
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS_DIR = ROOT / "bench" / "results"

from fastpref import _quiet  # noqa: E402

_quiet.install(model_libraries=False)  # a benchmark's log shows its numbers, not optional libraries' import notices


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is visible")
    return device


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of `iters` calls after `warmup` untimed ones (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return times


def summarize(times: list[float]) -> dict[str, float]:
    """median / quartiles / min of a list of timings (same unit)."""
    median = statistics.median(times)
    quartiles = statistics.quantiles(times, n=4) if len(times) >= 2 else [median] * 3
    return {"median": median, "p25": quartiles[0], "p75": quartiles[2], "min": min(times)}


class PhaseTimer:
    """Exclusive wall time per phase (a phase nested in another is subtracted from it); syncs CUDA at the edges."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = {}
        self._stack: list[list] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        synchronize(self.device)
        start = time.perf_counter()
        self._stack.append([name, 0.0])
        try:
            yield
        finally:
            synchronize(self.device)
            _, inner = self._stack.pop()
            elapsed = time.perf_counter() - start
            self.totals[name] = self.totals.get(name, 0.0) + elapsed - inner
            if self._stack:
                self._stack[-1][1] += elapsed


def environment() -> dict[str, str]:
    from fastpref.env_report import environment as env

    return env()


def env_columns(env: dict[str, str] | None = None, prefix: str = "env_") -> dict[str, str]:
    """{"env_device": ..., "env_torch": ..., ...}: the columns every results row carries."""
    env = environment() if env is None else env
    return {f"{prefix}{key}": value for key, value in env.items()}


def stamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def write_csv(path: Path, rows: list[dict], env: dict[str, str] | None = None, append: bool = False,
              prefix: str = "env_") -> Path:
    """Rows plus the environment's columns (named prefix + key); `append` adds to an existing file whose
    header holds every column (else it refuses, naming the missing ones)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = env_columns(env, prefix)
    full = [{**row, **extra} for row in rows]
    fields = list(dict.fromkeys(key for row in full for key in row)) or ["empty"]
    if append and path.exists():
        with path.open(newline="") as handle:
            existing = next(csv.reader(handle), [])
        if existing:
            if set(fields) - set(existing):
                raise ValueError(f"{path}: cannot append rows with columns {sorted(set(fields) - set(existing))} "
                                 f"that its header lacks; write a new file")
            fields = existing
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, restval="")
            if not existing:
                writer.writeheader()
            writer.writerows(full)
        return path
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(full)
    return path
