"""What a user sees of a training run: metrics.jsonl, TensorBoard, W&B, the progress bar and the final summary."""

import importlib.machinery
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from fastpref.train.loop import Trainer
from fastpref.train.metrics import format_summary, memory_usage, read_metrics

from helpers.train import make_config

TRAINING_KEYS = {"loss", "implicit_accuracy", "margin", "e_pol", "e_ref", "grad_norm"}
LOGGED_KEYS = TRAINING_KEYS | {"lr", "images_per_s", "nonfinite_total"}
MEMORY_KEYS = {"max_rss_gb"}  # + max_memory_gb on CUDA; TensorBoard / W&B only (they differ between identical runs)


def fake_wandb():
    """A stand-in `wandb` module that records init / log / finish calls."""
    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, data, step=None):
            calls["log"].append((step, dict(data)))

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"].append(kwargs)
        return Run()

    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # importlib.util.find_spec("wandb") works
    module.init, module.Image, module.calls = init, object, calls
    return module


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_a_run_reports_to_every_sink_and_ends_with_a_summary(cached_dataset, tmp_path, monkeypatch, capsys):
    """3 steps, the 2nd with a NaN loss (skipped): metrics.jsonl, TensorBoard, a fake W&B, the tqdm bar (stderr)
    and the printed summary + summary.json all see the same numbers."""
    pytest.importorskip("tensorboard")
    wandb = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    cfg = make_config(cached_dataset, tmp_path, max_steps=3, checkpoint_every=3, progress=True, tensorboard=True,
                      wandb_project="fastpref-test", lr_warmup_steps=3)
    trainer = Trainer(cfg)
    real_forward, calls = trainer.step_fn.forward, {"n": 0}

    def nan_at_step_2(batch, epoch):
        calls["n"] += 1
        out = real_forward(batch, epoch)
        if calls["n"] == 2:
            out.loss = out.loss * float("nan")
        return out

    trainer.step_fn.forward = nan_at_step_2
    capsys.readouterr()
    summary = trainer.train()
    captured = capsys.readouterr()

    # (a) metrics.jsonl: one row per step, the training metrics on the steps that updated
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in (rows[0], rows[2]):
        assert set(row) == {"step"} | LOGGED_KEYS, sorted(row)
        assert all(math.isfinite(row[k]) for k in LOGGED_KEYS) and row["images_per_s"] > 0 and row["grad_norm"] > 0
    assert set(rows[1]) == {"step", "loss", "skipped", "lr", "images_per_s", "nonfinite_total"}
    assert math.isnan(rows[1]["loss"]) and rows[1]["skipped"] == 1 and rows[1]["nonfinite_total"] == 1
    # warmup 3 from 0 (diffusers' constant_with_warmup): the skipped step counts
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])
    assert [r["nonfinite_total"] for r in rows] == [0, 1, 1]

    # (b) TensorBoard: every logged scalar (finite values only: the skipped step's NaN loss is left out) + memory
    scalars = read_scalars(tmp_path / "tensorboard")
    assert set(scalars) == LOGGED_KEYS | {"skipped"} | MEMORY_KEYS, sorted(scalars)
    assert scalars["loss"] == [(1, pytest.approx(rows[0]["loss"])), (3, pytest.approx(rows[2]["loss"]))]
    assert [s for s, _ in scalars["lr"]] == [1, 2, 3] and [s for s, _ in scalars["max_rss_gb"]] == [1, 2, 3]
    for key in LOGGED_KEYS - {"loss"}:
        assert [v for s, v in scalars[key] if s == 3] == [pytest.approx(rows[2][key], rel=1e-6)], key

    # (c) W&B: one run of the project with the config, every row logged at its step, finished
    assert len(wandb.calls["init"]) == 1
    init = wandb.calls["init"][0]
    assert init["project"] == "fastpref-test" and init["config"]["lr"] == 1e-3 and init["dir"] == str(tmp_path)
    assert [step for step, _ in wandb.calls["log"]] == [1, 2, 3]
    for (_, data), row in zip(wandb.calls["log"], rows):
        assert set(data) == set(row) - {"step"} | MEMORY_KEYS
        assert all(data[k] == row[k] for k in row if k != "step" and not (k == "loss" and math.isnan(row[k])))
        assert data["max_rss_gb"] > 0
    assert wandb.calls["finish"] == 1

    # (d) the progress bar (tqdm, on stderr) with the step count and the postfix
    bar = captured.err.replace("\r", "\n")
    assert "train: 100%" in bar and "3/3" in bar, captured.err[-2000:]
    assert all(f"{key}=" in bar for key in ("loss", "acc", "margin", "lr", "img/s", "mem")), captured.err[-2000:]

    # the final summary: printed, and summary.json next to metrics.jsonl
    assert summary["steps"] == 3 and summary["steps_this_run"] == 3 and summary["resumed_from"] is None
    assert summary["nonfinite_total"] == 1 and summary["skipped_this_run"] == 1
    assert summary["final_loss"] == rows[2]["loss"]
    assert summary["mean_loss"] == pytest.approx((rows[0]["loss"] + rows[2]["loss"]) / 2)
    assert summary["final_implicit_accuracy"] == rows[2]["implicit_accuracy"]
    assert summary["mean_implicit_accuracy"] == pytest.approx((rows[0]["implicit_accuracy"] +
                                                              rows[2]["implicit_accuracy"]) / 2)
    assert summary["wall_time_s"] >= summary["train_time_s"] > 0
    assert summary["images_per_s"] == pytest.approx(summary["images"] / summary["train_time_s"])
    assert summary["images"] == 2 * 3 * 2  # 2 groups x K=3 images (rankdpo) x the 2 steps that updated
    assert summary["max_rss_gb"] > 0
    # where it ran, for a rerun to match: float reductions differ across thread counts and CPUs
    assert summary["host"]["threads"] == torch.get_num_threads() >= 1
    assert summary["host"]["torch"] == torch.__version__ and summary["host"]["cpu"]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert not list(tmp_path.glob(".summary.json.*"))  # the atomic write left no temp file
    printed = captured.out
    assert format_summary(summary) in printed
    assert "[fastpref train] summary: 3 steps (3 in this run)" in printed
    assert f"loss: final {rows[2]['loss']:.4f}, mean {summary['mean_loss']:.4f}" in printed
    assert "implicit accuracy: final" in printed and "non-finite steps skipped: 1 in the run" in printed
    assert "peak RSS" in printed


def test_a_resumed_summary_counts_this_runs_steps(cached_dataset, tmp_path, capsys):
    Trainer(make_config(cached_dataset, tmp_path, max_steps=2, checkpoint_every=2)).train()
    summary = Trainer(make_config(cached_dataset, tmp_path, max_steps=3, checkpoint_every=3)).train(resume=True)
    assert (summary["steps"], summary["steps_this_run"], summary["resumed_from"]) == (3, 1, 2)
    assert summary["final_loss"] == read_metrics(tmp_path)[-1]["loss"]
    assert "3 steps (1 in this run, resumed from step 2)" in capsys.readouterr().out


def test_memory_is_the_peak_rss_on_cpu_and_the_peak_allocation_on_cuda(monkeypatch):
    usage = memory_usage(torch.device("cpu"))
    assert set(usage) == {"max_rss_gb"}
    status = Path("/proc/self/status")
    if status.exists():  # Linux: VmHWM is the same peak RSS, in kB
        peak_kib = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM"))
        assert usage["max_rss_gb"] == pytest.approx(peak_kib / 2**20, rel=0.05)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**29)
    usage = memory_usage(torch.device("cuda", 0))
    assert usage["max_memory_gb"] == 1.5 and usage["max_rss_gb"] > 0
