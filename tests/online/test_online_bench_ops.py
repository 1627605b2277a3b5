"""bench/ops.py --objective spo | grpo (issues 16 and 18: the online ops' benchmark rows): the variants it times
compute the same loss and gradient (the SPO / Flow-GRPO code's formulas, the float oracle, the fused op), and the
smoke run writes every mode of every variant."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench_ops():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_ops_under_test", ROOT / "bench" / "ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("objective", ["spo", "grpo"])
def test_the_timed_variants_compute_one_loss_and_gradient(bench_ops, objective):
    from fastpref.ops import library

    reference, paper, fused = bench_ops.OBJECTIVES[objective]
    generator = torch.Generator().manual_seed(0)
    # policy mean, taken sample, reference mean: the sample a step of std 0.5 away, the reference 0.2 away, so
    # SPO's ratios sit inside and outside its 1 +- 0.1 clamp and GRPO's inside and outside 1 +- 0.2 (checked below)
    pred = torch.randn(8, 4, 8, 8, generator=generator)
    target = pred + bench_ops.STEP_STD * torch.randn(8, 4, 8, 8, generator=generator)
    ref_pred = pred + 0.2 * torch.randn(8, 4, 8, 8, generator=generator)
    variants = {"reference": reference, "paper": paper, "fused-reference": fused("reference")}
    if "native" in library.available_backends("cpu"):
        variants["fused-native"] = fused("native")
    from fastpref import ops

    old_log_prob, advantages = bench_ops._grpo_inputs(pred)
    op = (ops.spo_loss(pred, ref_pred, target, bench_ops.STEP_STD) if objective == "spo" else
          ops.grpo_loss(pred, ref_pred, target, bench_ops.STEP_STD, old_log_prob, advantages, clip_range=0.2, kl_beta=0.04))
    assert 0 < float(op.metrics["clip_fraction"]) < 1  # both sides of the clamp are exercised
    results = {}
    for name, loss_fn in variants.items():
        leaf = pred.clone().requires_grad_(True)
        loss = loss_fn(leaf, target, ref_pred)
        loss.backward()
        results[name] = (loss.detach(), leaf.grad)
    expected_loss, expected_grad = results["paper"]
    assert expected_grad.abs().sum() > 0
    for name, (loss, grad) in results.items():
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-7, msg=f"{objective} {name} loss")
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-8, msg=f"{objective} {name} gradient")


@pytest.mark.parametrize("objective", ["spo", "grpo"])
def test_smoke_run_writes_every_mode_of_every_variant(tmp_path, objective):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "ops.py"), "--smoke", "--objective", objective,
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = tmp_path.glob(f"ops-{objective}-*-smoke-*.csv")
    rows = list(csv.DictReader(path.open()))
    assert {row["objective"] for row in rows} == {objective}
    cells = {(row["mode"], row["variant"]) for row in rows}
    assert {(mode, variant) for mode in ("forward", "backward", "step") for variant in ("reference", "paper")} <= cells
    assert all(float(row["median_ms"]) > 0 for row in rows)
