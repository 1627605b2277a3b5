"""bench/gpu_suite.sh: the dry run checks the plan on CPU; parts run within the budget or are skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_suite  # noqa: E402


def test_dry_run_prints_and_checks_the_plan():
    done = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for part in gpu_suite.PARTS:
        assert f" {part.name} " in done.stdout and part.why in done.stdout
    assert "dry run: plan checked" in done.stdout
    assert sum(p.budget_s for p in gpu_suite.PARTS) > gpu_suite.DEFAULT_BUDGET_S  # the budget really decides


def test_plan_check_names_a_missing_option_and_script():
    bad = gpu_suite.Part("bad", "python3 bench/loader.py --no-such-option", 10, "")
    with pytest.raises(SystemExit, match="bench/loader.py has no option --no-such-option"):
        gpu_suite.check_plan([bad])
    with pytest.raises(SystemExit, match="bench/nothing.py does not exist"):
        gpu_suite.check_plan([gpu_suite.Part("gone", "python3 bench/nothing.py", 10, "")])


def test_parts_that_do_not_fit_are_skipped_and_timeouts_recorded(tmp_path):
    now = [0.0]
    parts = [gpu_suite.Part("a", "echo a", 100, ""), gpu_suite.Part("b", "echo b", 100, ""),
             gpu_suite.Part("c", "echo c", 150, ""), gpu_suite.Part("d", "echo d", 30, "")]
    took = {"a": 90.0, "b": 100.0, "d": 5.0}
    ran = []

    def runner(part, command, limit, log, env):
        ran.append((part.name, command, limit))
        now[0] += took[part.name]
        return 124 if part.name == "b" else 0

    outcomes = gpu_suite.run_parts(parts, tmp_path, "t", 250.0, {}, clock=lambda: now[0], runner=runner)
    assert [o.name for o in outcomes] == ["a", "b", "c", "d"]
    assert [o.status for o in outcomes] == ["ok", "timed out", "skipped (needs 150 s, 60 s left)", "ok"]
    assert [r[0] for r in ran] == ["a", "b", "d"]


def test_a_real_part_writes_the_summary(tmp_path):
    env = {k: v for k, v in os.environ.items()}
    done = subprocess.run(["bash", "bench/gpu_suite.sh", str(tmp_path), "--only", "device"], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (summary,) = tmp_path.glob("gpu-suite-*.json")
    data = json.loads(summary.read_text())
    assert data["parts"][0]["name"] == "device" and data["parts"][0]["status"] == "ok"
    assert data["env"]["torch"] and data["env"]["device"]
    log = (tmp_path / data["parts"][0]["log"]).read_text()
    assert "torch" in log and "device" in log
    assert (tmp_path / summary.name.replace(".json", ".md")).read_text().startswith("# GPU suite")
