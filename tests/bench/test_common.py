"""bench/common.py: timing, phase split and results CSVs shared by bench/ops.py, loader.py and step.py."""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import common  # noqa: E402

CPU = torch.device("cpu")


def test_time_it_runs_warmup_then_times_each_call():
    calls = []
    times = common.time_it(lambda: (calls.append(1), time.sleep(0.01)), CPU, warmup=2, iters=3)
    assert len(calls) == 5 and len(times) == 3
    assert all(9.0 <= t < 500 for t in times)  # milliseconds
    stats = common.summarize([3.0, 1.0, 2.0, 10.0])
    assert stats["median"] == 2.5 and stats["min"] == 1.0 and stats["p25"] <= stats["median"] <= stats["p75"]


def test_phase_timer_subtracts_nested_phases():
    timer = common.PhaseTimer(CPU)
    with timer("outer"):
        time.sleep(0.03)
        with timer("inner"):
            time.sleep(0.05)
    assert timer.totals["inner"] >= 0.05
    assert 0.03 <= timer.totals["outer"] < 0.05  # the inner 50 ms are not counted twice


def test_write_csv_adds_the_environment_and_appends_only_compatible_rows(tmp_path):
    env = {"device": "cpu (test)", "torch": "9.9"}
    path = common.write_csv(tmp_path / "r.csv", [{"a": 1}, {"a": 2, "b": 3}], env)
    rows = list(csv.DictReader(path.open()))
    assert rows == [{"a": "1", "b": "", "env_device": "cpu (test)", "env_torch": "9.9"},
                    {"a": "2", "b": "3", "env_device": "cpu (test)", "env_torch": "9.9"}]
    common.write_csv(path, [{"a": 4}], env, append=True)
    assert [r["a"] for r in csv.DictReader(path.open())] == ["1", "2", "4"]
    with pytest.raises(ValueError, match=r"r.csv: cannot append rows with columns \['c'\]"):
        common.write_csv(path, [{"c": 5}], env, append=True)
    plain = common.write_csv(tmp_path / "p.csv", [{"a": 1}], env, prefix="")
    assert next(csv.DictReader(plain.open()))["device"] == "cpu (test)"
    assert common.env_columns()["env_torch"] == torch.__version__
