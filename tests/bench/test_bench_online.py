"""bench/step.py --method spo|grpo (bench/step_online.py): rows produced on the toy models, phases that add up to
the step, FLOP counts equal to a hand count of the executed rows, the VAE decoder's analytic count against torch's
FlopCounterMode, and an instrumented step that trains exactly as the plain trainer step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from helpers.bench import weights_after_one_step

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import flops  # noqa: E402
from step_archs import load_arch  # noqa: E402
from step_online import ONLINE_PHASES, OnlineSettings, build_trainer, measure_online, online_config  # noqa: E402

CPU = torch.device("cpu")
# tiny rows: SPO 1 prompt, k = 2, 4 steps, branching at step 1; GRPO 1 prompt, G = 2, 3 steps
SPO = OnlineSettings("spo", prompts=1, group_size=2, num_steps=4, divert_start_step=1, train_batch_size=4)
GRPO = OnlineSettings("grpo", prompts=1, group_size=2, num_steps=3, train_batch_size=4)


@pytest.fixture(scope="module")
def spo_row():
    return measure_online(load_arch("toy-sd"), SPO, CPU, steps=1, warmup=1, phase_steps=1, peak_tflops=0.1)


@pytest.fixture(scope="module")
def grpo_row():
    return measure_online(load_arch("toy-sd3"), GRPO, CPU, steps=1, warmup=1, phase_steps=1, peak_tflops=0.1)


def _check_phases(row):
    assert row["status"] == "ok" and row["step_ms"] > 0
    for phase in ("sampling", "decode", "reward", "policy", "optimizer"):
        assert row[f"{phase}_ms"] > 0, phase
    phase_sum = sum(row[f"{p}_ms"] for p in ONLINE_PHASES)
    # exclusive phases cover the instrumented step's wall time, and the named ones nearly all of it
    assert phase_sum == pytest.approx(row["phased_step_ms"], rel=0.02, abs=2.0)
    assert row["other_ms"] < 0.2 * phase_sum
    # the instrumented step costs about what the plain timed steps cost (a shared 2-core CPU: a loose band)
    assert 0.5 < phase_sum / row["step_ms"] < 2.0
    assert 0 < row["MFU"] < 1


def test_spo_row_phases(spo_row):
    _check_phases(spo_row)
    assert spo_row["objective"] == "spo" and spo_row["reference_ms"] > 0


def test_grpo_row_phases(grpo_row):
    _check_phases(grpo_row)
    assert grpo_row["objective"] == "grpo"


def test_spo_flops_match_a_hand_count(spo_row):
    arch = load_arch("toy-sd")
    b, k, s, d = SPO.prompts, SPO.group_size, SPO.num_steps, SPO.divert_start_step
    # one row per prompt up to and at the branching step, k from there on; CFG doubles every call
    sampling_rows = 2 * (d * b + b + (s - d - 1) * b * k)
    decoded = (s - d) * b * k  # a decision at every step after the branch (predicted x0) + the final images
    pairs = (s - d) * b  # threshold 0: one pair per transition from the branching step on
    train_rows = 2 * 2 * pairs  # (winner, loser) x CFG
    assert spo_row["sampling_denoiser_rows"] == sampling_rows
    assert spo_row["decoded_images"] == decoded and spo_row["scored_images"] == decoded
    assert spo_row["pairs_trained"] == pairs
    assert spo_row["policy_denoiser_rows"] == train_rows == spo_row["reference_denoiser_rows"]
    forward = lambda rows: arch.denoiser_forward_flops(rows).total  # noqa: E731
    assert spo_row["sampling_GFLOP"] == pytest.approx(forward(sampling_rows) / 1e9, rel=1e-5)
    assert spo_row["reference_GFLOP"] == pytest.approx(forward(train_rows) / 1e9, rel=1e-5)
    assert spo_row["policy_GFLOP"] == pytest.approx(3 * forward(train_rows) / 1e9, rel=1e-5)  # toy-spo: full FT
    decode = flops.vae_decoder_forward_flops(arch.spec["vae"]["config"], decoded, arch.latent_hw).total
    assert spo_row["decode_GFLOP"] == pytest.approx(decode / 1e9, rel=1e-5)
    assert spo_row["reward_GFLOP"] > 0


def test_grpo_flops_match_a_hand_count(grpo_row):
    arch = load_arch("toy-sd3")
    p, g, s = GRPO.prompts, GRPO.group_size, GRPO.num_steps
    trained = int(s * 0.99)  # toy-grpo's timestep_fraction
    assert grpo_row["sampling_denoiser_rows"] == 2 * p * g * s
    assert grpo_row["decoded_images"] == p * g
    train_rows = 2 * p * g * trained  # every sample (keep_all) at each trained step, CFG in training
    assert grpo_row["policy_denoiser_rows"] == train_rows == grpo_row["reference_denoiser_rows"]  # kl_beta 0.04
    forward = arch.denoiser_forward_flops(train_rows)
    lora = forward.total + flops.backward_flops(forward, "lora").total
    assert grpo_row["policy_GFLOP"] == pytest.approx(lora / 1e9, rel=1e-5)
    assert grpo_row["sampling_GFLOP"] == pytest.approx(arch.denoiser_forward_flops(2 * p * g * s).total / 1e9,
                                                       rel=1e-5)


def test_vae_decoder_flops_match_flop_counter():
    import diffusers
    from torch.utils.flop_counter import FlopCounterMode

    config = dict(block_out_channels=[8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 3,
                  up_block_types=["UpDecoderBlock2D"] * 3, latent_channels=4, norm_num_groups=4, layers_per_block=1)
    with torch.device("meta"):  # the math attention path (counted) rather than CPU's fused kernel (not counted)
        vae = diffusers.AutoencoderKL(**config)
        with FlopCounterMode(display=False) as mode:
            vae.decode(torch.randn(3, 4, 6, 5))
    assert mode.get_total_flops() == flops.vae_decoder_forward_flops(config, 3, (6, 5)).total


@pytest.mark.parametrize("method,arch", [("spo", "toy-sd"), ("grpo", "toy-sd3")])
def test_instrumentation_does_not_change_the_step(method, arch):
    """The same step, plain (the trainer's optimizer_step on its batches) and instrumented (timed, FLOP-counted):
    the same weights afterwards, to the bit."""
    arch = load_arch(arch)
    settings = SPO if method == "spo" else GRPO
    weights = []
    for instrumented in (False, True):
        cfg = online_config(arch, settings, CPU, "/tmp/unused-bench-online")
        weights.append(weights_after_one_step(build_trainer(arch, cfg, CPU), arch, instrumented))
    plain, timed = weights
    assert all(torch.equal(a, b) for a, b in zip(plain, timed))


def test_unknown_recipe_is_refused():
    with pytest.raises(ValueError, match="--method spo --arch sd3"):
        online_config(load_arch("sd3", 0.125, 128), SPO, CPU, "/tmp/unused-bench-online")


def test_step_cli_writes_online_results(tmp_path):
    """bench/step.py --method spo: the CLI path, one tiny row, CSV (with device and versions) + Markdown."""
    import csv

    import step

    args = step.parse_args(["--method", "spo", "--arch", "toy-sd", "--num-steps", "3", "--divert-start-step", "1",
                            "--steps", "1", "--warmup", "1", "--phase-steps", "1", "--out", str(tmp_path),
                            "--tag", "t"])
    paths = step.run(args)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 1 and rows[0]["objective"] == "spo" and rows[0]["env_torch"]
    assert float(rows[0]["sampling_ms"]) > 0 and int(rows[0]["sampling_denoiser_rows"]) == 2 * (1 + 1 + 1 * 2)
    text = paths["md"].read_text()
    assert "machine load" in text and "| toy-sd 32px | spo |" in text
