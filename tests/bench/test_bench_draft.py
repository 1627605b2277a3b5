"""bench/step.py --method draft: one DRaFT step by phase with its peak memory, on fastpref's DRaFTMethod."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

from helpers.bench import weights_after_one_step

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from step_archs import load_arch  # noqa: E402
from step_online import DRAFT_PHASES, OnlineSettings, build_trainer, measure_online, online_config  # noqa: E402

CPU = torch.device("cpu")
# 2 images, 3 sampling steps, the last 2 with gradient, DRaFT+'s KL on (so the reference phase runs)
TINY = OnlineSettings("draft", prompts=2, group_size=1, num_steps=3, k=2, kl_coeff=0.1)


@pytest.fixture(scope="module")
def draft_row():
    return measure_online(load_arch("toy-sd"), TINY, CPU, steps=1, warmup=1, phase_steps=1, peak_tflops=0.1)


def test_draft_row_has_every_phase(draft_row):
    row = draft_row
    assert row["status"] == "ok" and row["objective"] == "draft" and row["step_ms"] > 0
    assert (row["k"], row["checkpointing"], row["kl_coeff"]) == (2, True, 0.1)
    for phase in DRAFT_PHASES:
        if phase != "other":
            assert row[f"{phase}_ms"] > 0, phase
    phase_sum = sum(row[f"{p}_ms"] for p in DRAFT_PHASES)
    assert phase_sum == pytest.approx(row["phased_step_ms"], rel=0.02, abs=2.0)
    assert row["peak_gib"] > 0 and row["peak_kind"] == "RSS growth over the built trainer"
    assert 0 < row["MFU"] < 1


def test_draft_row_runs_the_prefix_without_gradient_and_k_steps_with(draft_row):
    """Executed denoiser rows (CFG: 2 per image): N - K batched prefix steps, K differentiable steps and as many
    reference calls; the decoder once per image."""
    images, n, k = 2, TINY.num_steps, TINY.k
    assert draft_row["sample_prefix_denoiser_rows"] == 2 * images * (n - k)
    assert draft_row["differentiable_denoiser_rows"] == 2 * images * k
    assert draft_row["reference_denoiser_rows"] == 2 * images * k
    assert draft_row["decoded_images"] == images


def test_instrumented_draft_step_equals_the_plain_one():
    """The same DRaFT step plain (the trainer's optimizer_step) and instrumented (timed, FLOP-counted): the same
    weights to the bit; and the prefix's denoiser calls ran under inference_mode, the last K with gradient."""
    arch = load_arch("toy-sd")
    weights = []
    for instrumented in (False, True):
        cfg = online_config(arch, TINY, CPU, "/tmp/unused-bench-draft")
        cfg.lr_warmup_steps = 0  # toy-draft's warm-up makes the first update run at lr 0: nothing to compare
        trainer = build_trainer(arch, cfg, CPU)
        modes = []
        hook = trainer.bundle.denoiser.register_forward_pre_hook(
            lambda module, args: modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled())))
        weights.append(weights_after_one_step(trainer, arch, instrumented))
        hook.remove()
        prefix = TINY.num_steps - TINY.k
        assert modes[:prefix] == [(True, False)] * prefix  # one batched call per prefix step (CFG inside)
        assert all(grad for _, grad in modes[prefix:prefix + 2 * TINY.k:2])  # policy calls (reference between)
    plain, timed = weights
    assert all(torch.equal(a, b) for a, b in zip(plain, timed))


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match=r"--k 4: DRaFT's K must be in \[1, --num-steps 3\]"):
        online_config(load_arch("toy-sd"), OnlineSettings("draft", num_steps=3, k=4), CPU, "/tmp/unused-bench-draft")
    import step

    with pytest.raises(SystemExit):
        step.parse_args(["--method", "draft", "--num-steps", "3", "--k", "1", "4"])


@pytest.mark.slow  # 4 fresh processes each building toy-sd and running a 6-step DRaFT step: ~1-4 min shared CPU
def test_peak_memory_grows_with_k_and_less_with_checkpointing(tmp_path):
    """bench/draft_memory.py (bench/step.py --method draft) --both: the CSV / Markdown land in --out, and the peak
    memory grows with K without checkpointing and less with it (committed: toy-sd K = 10, 0.14 vs 0.41 GiB)."""
    import draft_memory

    draft_memory.main(["--arch", "toy-sd", "--k", "1", "6", "--num-steps", "6", "--images", "4", "--both",
                       "--steps", "1", "--warmup", "1", "--phase-steps", "1", "--out", str(tmp_path), "--tag", "t"])
    csv_path, md_path = tmp_path / "step-online-t.csv", tmp_path / "step-online-t.md"
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 4 and all(r["objective"] == "draft" and r["env_torch"] for r in rows)
    peak = {(int(r["k"]), r["checkpointing"] == "True"): float(r["peak_gib"]) for r in rows}
    growth_plain = peak[6, False] - peak[1, False]
    growth_checkpointed = peak[6, True] - peak[1, True]
    assert growth_plain > 0.05, peak  # 5 more differentiable steps keep their activations
    assert growth_checkpointed < 0.6 * growth_plain, peak
    text = md_path.read_text()
    assert "| toy-sd 32px | 4 | 6 | 6 | False |" in text and "peak GiB" in text


def test_cpu_peak_memory_is_not_hidden_by_an_earlier_larger_peak():
    """What failed CI once: the build's transient peak (above the step's) made every row's peak 0. The high-water mark
    is reset when PeakMemory is made, so a 64 MiB block held after it shows even after a 256 MiB one freed before."""
    from step_online import PeakMemory

    earlier = torch.ones(64 * 2**20)  # 256 MiB, touched, then freed
    del earlier
    memory = PeakMemory(CPU)
    if memory.kind != "RSS growth over the built trainer" or not memory._reset:
        pytest.skip("this kernel refuses /proc/self/clear_refs: the CPU peak falls back to ru_maxrss (fresh processes)")
    later = torch.ones(16 * 2**20)  # 64 MiB
    grown = memory.peak() / 2**20
    del later
    assert 48 < grown < 160, grown
