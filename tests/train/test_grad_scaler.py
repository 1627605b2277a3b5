"""fp16 with dynamic loss scaling (fastpref.train.parallel + speed): the loss is scaled in backward, unscaled before
clipping, an overflowing step is skipped (and reported as skipped by the loop) with the scale halved, the scale is
checkpointed and resumed, and bf16 / fp32 runs have no scaler at all.

torch 2.13's CPU autocast supports float16 and torch.amp.GradScaler("cpu") works, so everything here runs the real
fp16 autocast path on CPU (plus fp16 weights for the model.dtype: float16 path).
"""

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fastpref.train import speed
from fastpref.train.loop import TrainConfig, Trainer, train
from fastpref.train.metrics import read_metrics
from fastpref.train.parallel import DEEPSPEED_FP16, build_parallel
from fastpref.train.speed import GradScaler, UnsupportedSpeedOption

from helpers.train import make_config

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- a model with a known overflow


class Probe(nn.Module):
    """loss = K * sum(W x), run in fp16. d loss / d (W x) = K for every output, so the fp16 gradient that flows back
    is K * scale: with K = 1.5 it overflows at the initial scale 65536 (98304 > 65504) and not at 32768 (49152).
    The weight gradient K * x does not depend on W, so a step's update is known exactly."""

    K = 1.5

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.linear = nn.Linear(4, 4, bias=False, dtype=dtype)
        with torch.no_grad():
            self.linear.weight.fill_(0.125)

    def loss(self, autocast: bool):
        x = torch.full((1, 4), 0.5, dtype=self.linear.weight.dtype)
        with torch.autocast("cpu", dtype=torch.float16) if autocast else contextlib.nullcontext():
            y = self.linear(x)
        assert y.dtype == torch.float16
        return y.float().sum() * self.K


class ProbeStep:
    """What the loop calls as step_fn: forward(batch, epoch) -> loss, metrics, num_images, and preference_groups
    (0: the loss is weighed 0)."""

    def __init__(self, model, autocast=True):
        self.model, self.autocast, self.outputs = model, autocast, []

    def preference_groups(self, batch):
        return 0 if batch == "no-preference" else 1

    def forward(self, batch, epoch):
        loss = self.model.loss(self.autocast)
        if batch == "inf-loss":
            loss = loss * math.inf
        return SimpleNamespace(loss=loss, metrics={}, num_images=1)


def loop_over(model, mixed_precision="fp16", autocast=True, lr=0.1, **cfg):
    """The trainer's real optimizer_step (loop.py) around a Probe model, without a dataset."""
    parallel = build_parallel("none", CPU, 1.0, mixed_precision)
    parallel.wrap(model, lambda params: torch.optim.AdamW(params, lr=lr),
                  lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    trainer = Trainer.__new__(Trainer)  # no dataset or model bundle: only what optimizer_step reads
    trainer.cfg = TrainConfig(**cfg)
    trainer.parallel, trainer.optimizer, trainer.scheduler = parallel, parallel.optimizer, parallel.scheduler
    trainer.attention = contextlib.nullcontext()
    trainer.step_fn = ProbeStep(model, autocast)
    trainer.nonfinite_total = trainer.nonfinite_in_a_row = 0
    return trainer


def one_step(trainer, batch="batch"):
    return trainer.optimizer_step(iter([(0, batch)]))


def adamw_first_update(weight, grad, lr=0.1, max_norm=1.0):
    """The fp32 reference: one clipped AdamW step from `weight` with gradient `grad`."""
    param = nn.Parameter(weight.detach().float().clone())
    param.grad = grad.clone()
    torch.nn.utils.clip_grad_norm_([param], max_norm)
    torch.optim.AdamW([param], lr=lr).step()
    return param.detach()


# --------------------------------------------------------------------------- overflow: skip, halve, then train


def test_overflow_at_the_initial_scale_skips_the_step_halves_the_scale_then_trains():
    model = Probe()
    trainer = loop_over(model)
    parallel = trainer.parallel
    assert isinstance(parallel.scaler, GradScaler) and parallel.loss_scale == 2.0**16
    start = model.linear.weight.detach().clone()

    metrics, _ = one_step(trainer)  # K * 65536 overflows fp16
    assert metrics["skipped"] == 1.0 and math.isnan(metrics["loss"])  # what the loop logs for a skipped step
    assert trainer.nonfinite_total == 1
    assert parallel.last_step_skipped and parallel.scaler_backed_off
    assert parallel.loss_scale == 2.0**15
    assert torch.equal(model.linear.weight, start)  # no update, no momentum
    assert parallel.optimizer.state == {}
    assert parallel.scheduler.last_epoch == 1  # a skipped step still advances the schedule

    metrics, _ = one_step(trainer)  # K * 32768 = 49152 fits
    assert "skipped" not in metrics and math.isfinite(metrics["loss"])
    assert metrics["loss"] == pytest.approx(Probe.K * 4 * 4 * 0.5 * 0.125, rel=1e-3)
    # the reported norm is the unscaled one: |K * x| over 16 entries = 1.5 * 0.5 * 4
    assert metrics["grad_norm"] == pytest.approx(3.0, rel=1e-6)
    assert trainer.nonfinite_in_a_row == 0 and not parallel.last_step_skipped
    assert parallel.loss_scale == 2.0**15 and parallel.scaler.state_dict()["_growth_tracker"] == 1
    # fp16 gradient K * x * scale is exact: the update is the fp32 update to the last bit
    expected = adamw_first_update(start, torch.full((4, 4), Probe.K * 0.5))
    assert torch.equal(model.linear.weight.detach(), expected)


def test_the_scale_grows_after_growth_interval_clean_steps_and_backs_off_again():
    model = Probe()
    trainer = loop_over(model, lr=1e-3)
    trainer.parallel.scaler.load_state_dict({**trainer.parallel.scaler.state_dict(), "scale": 2.0**14,
                                             "growth_interval": 2})
    scales, skipped = [], []
    for _ in range(5):
        metrics, _ = one_step(trainer)
        scales.append(trainer.parallel.loss_scale)
        skipped.append("skipped" in metrics)
    # 2**14 clean, 2**14 clean -> x2; 2**15 clean, clean -> x2 = 2**16, which overflows -> back to 2**15
    assert scales == [2.0**14, 2.0**15, 2.0**15, 2.0**16, 2.0**15]
    assert skipped == [False, False, False, False, True]


def test_skips_that_are_not_overflows_leave_the_scale_alone():
    model = Probe()
    trainer = loop_over(model)
    parallel = trainer.parallel
    parallel.scaler.load_state_dict({**parallel.scaler.state_dict(), "scale": 2.0**10})
    one_step(trainer)
    state = parallel.scaler.state_dict()
    assert state["_growth_tracker"] == 1

    metrics, _ = one_step(trainer, "no-preference")  # backward of a zero loss, unscaled, finite: skipped
    assert metrics["skipped"] == 1.0 and trainer.nonfinite_total == 0
    assert parallel.last_step_skipped and not parallel.scaler_backed_off
    assert parallel.scaler.state_dict() == state

    metrics, _ = one_step(trainer, "inf-loss")  # refused before any backward: nothing was unscaled
    assert metrics["skipped"] == 1.0 and trainer.nonfinite_total == 1
    assert not parallel.scaler_backed_off and parallel.scaler.state_dict() == state

    metrics, _ = one_step(trainer)  # and the scaler is ready for the next step
    assert math.isfinite(metrics["loss"]) and parallel.scaler.state_dict()["_growth_tracker"] == 2


def test_fp16_weights_get_a_loss_scaler_too():
    """model.dtype: float16 without autocast: the gradients themselves are fp16 (torch's GradScaler refuses to
    unscale those; fastpref's unscales them in place)."""
    model = Probe(dtype=torch.float16)
    trainer = loop_over(model, mixed_precision="no", autocast=False)
    assert isinstance(trainer.parallel.scaler, GradScaler)
    metrics, _ = one_step(trainer)
    assert metrics["skipped"] == 1.0 and trainer.parallel.loss_scale == 2.0**15
    start = model.linear.weight.detach().clone()
    metrics, _ = one_step(trainer)
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] == pytest.approx(3.0, rel=1e-3)
    assert model.linear.weight.dtype == torch.float16 and not torch.equal(model.linear.weight, start)


# --------------------------------------------------------------------------- bf16 / fp32: no scaler


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_bf16_and_fp32_have_no_scaler_and_an_unscaled_backward(mixed_precision):
    model = Probe()
    parallel = build_parallel("none", CPU, 1.0, mixed_precision)
    parallel.wrap(model, lambda params: torch.optim.AdamW(params, lr=0.1),
                  lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    assert parallel.scaler is None and parallel.loss_scale is None
    parallel.backward(model.loss(autocast=True))
    torch.testing.assert_close(model.linear.weight.grad, torch.full((4, 4), Probe.K * 0.5), rtol=0, atol=0)
    result = parallel.step()
    assert result.applied and result.grad_norm == pytest.approx(3.0) and not result.overflow
    assert not parallel.last_step_skipped


def test_bf16_trainer_has_no_scaler_and_writes_no_scaler_state(cached_dataset, tmp_path):
    cfg = make_config(cached_dataset, tmp_path, max_steps=1, checkpoint_every=1,
                      **{"mode": "full", "objective.name": "sft", "speed.mixed_precision": "bf16"})
    trainer = Trainer(cfg)
    assert trainer.parallel.scaler is None
    trainer.train()
    state = torch.load(tmp_path / "checkpoints/step-000001/trainer_state.pt", weights_only=True)
    assert "grad_scaler" not in state


# --------------------------------------------------------------------------- the real trainer in fp16


def test_fp16_loss_trajectory_follows_fp32(cached_dataset, tmp_path):
    """sft, full fine-tune, 6 steps: fp16 autocast + loss scaling vs fp32. Measured: 1.9e-4 relative at most (the
    tiny net's gradients never overflow at 65536 here, so no step is skipped)."""
    losses = {}
    for mixed_precision in ("no", "fp16"):
        cfg = make_config(cached_dataset, tmp_path / mixed_precision, max_steps=6, checkpoint_every=6, **{
            "mode": "full", "objective.name": "sft", "speed.mixed_precision": mixed_precision})
        trainer = Trainer(cfg)
        assert (trainer.parallel.scaler is not None) == (mixed_precision == "fp16")
        trainer.train()
        records = read_metrics(tmp_path / mixed_precision)
        assert [r["step"] for r in records] == list(range(1, 7)) and not any("skipped" in r for r in records)
        losses[mixed_precision] = torch.tensor([r["loss"] for r in records], dtype=torch.float64)
    assert trainer.parallel.loss_scale == 2.0**16
    torch.testing.assert_close(losses["fp16"], losses["no"], rtol=2e-3, atol=0)


def test_fp16_dpo_overflows_at_first_then_finds_its_scale_and_trains(cached_dataset, tmp_path):
    """DPO (beta 2500) on the toy LoRA: the fp16 backward overflows at 65536; each overflow skips its step and halves
    the scale until it fits, then the run trains with finite losses at that scale."""
    cfg = make_config(cached_dataset, tmp_path, max_steps=8, checkpoint_every=8, max_nonfinite_in_a_row=12, **{
        "objective.name": "dpo", "reference": "adapters_off", "speed.mixed_precision": "fp16"})
    trainer = Trainer(cfg)
    scales, records = [], []
    batches = trainer.batches()
    for _ in range(cfg.max_steps):
        scale = trainer.parallel.loss_scale
        metrics, _ = trainer.optimizer_step(batches)
        scales.append((scale, trainer.parallel.loss_scale))
        records.append(metrics)
    first_fit = next(i for i, m in enumerate(records) if "skipped" not in m)
    assert first_fit >= 1  # the initial scale overflowed
    for before, after in scales[:first_fit]:
        assert after == before / 2
    assert all(math.isnan(m["loss"]) for m in records[:first_fit])
    assert math.isfinite(records[first_fit]["loss"]) and records[first_fit]["grad_norm"] > 0
    assert scales[first_fit][1] == scales[first_fit][0]
    trained = [m for m in records[first_fit:] if "skipped" not in m]
    assert len(trained) >= len(records[first_fit:]) - 2 and all(math.isfinite(m["loss"]) for m in trained)
    assert trainer.nonfinite_total == sum("skipped" in m for m in records)


def test_loss_scale_survives_checkpoint_and_resume_exactly(cached_dataset, tmp_path):
    """A scale that moved during the run (growth interval 1: x2 per clean step, until it overflows and halves)
    is restored with its growth tracker, and a resumed run ends with the weights and losses of an uninterrupted one."""
    overrides = {"mode": "full", "objective.name": "sft", "speed.mixed_precision": "fp16"}

    def fast_growing(trainer):
        scaler = trainer.parallel.scaler
        scaler.load_state_dict({**scaler.state_dict(), "scale": 2.0**20, "growth_interval": 1})
        return trainer

    whole = fast_growing(Trainer(make_config(cached_dataset, tmp_path / "whole", max_steps=4, checkpoint_every=2,
                                             **overrides)))
    whole.train()
    first = fast_growing(Trainer(make_config(cached_dataset, tmp_path / "resumed", max_steps=2, checkpoint_every=2,
                                             **overrides)))
    first.train()
    saved = first.parallel.scaler.state_dict()
    assert saved["scale"] != 2.0**16 and saved["growth_interval"] == 1

    resumed = Trainer(make_config(cached_dataset, tmp_path / "resumed", max_steps=4, checkpoint_every=2, **overrides))
    assert resumed.parallel.scaler.state_dict()["growth_interval"] == 2000  # fresh, before the resume
    resumed.load_checkpoint(tmp_path / "resumed/checkpoints/step-000002")
    assert resumed.parallel.scaler.state_dict() == saved
    assert resumed.parallel.loss_scale == saved["scale"]

    resumed = Trainer(make_config(cached_dataset, tmp_path / "resumed", max_steps=4, checkpoint_every=2, **overrides))
    assert resumed.train(resume=True)["resumed_from"] == 2
    assert resumed.parallel.scaler.state_dict() == whole.parallel.scaler.state_dict()
    losses = {run: torch.tensor([r["loss"] for r in read_metrics(tmp_path / run)]) for run in ("whole", "resumed")}
    assert len(losses["whole"]) == 4
    torch.testing.assert_close(losses["resumed"], losses["whole"], rtol=0, atol=0, equal_nan=True)
    for (name, a), b in zip(whole.bundle.denoiser.named_parameters(), resumed.bundle.denoiser.parameters()):
        assert torch.equal(a, b), name


def test_resuming_an_fp32_checkpoint_in_fp16_starts_the_scale_fresh(cached_dataset, tmp_path):
    overrides = {"mode": "full", "objective.name": "sft"}
    train(make_config(cached_dataset, tmp_path, max_steps=1, checkpoint_every=1, **overrides))
    trainer = Trainer(make_config(cached_dataset, tmp_path, max_steps=2, checkpoint_every=1,
                                  **{**overrides, "speed.mixed_precision": "fp16"}))
    with pytest.warns(UserWarning, match="no loss-scaler state .* restarts at 65536"):
        trainer.load_checkpoint(tmp_path / "checkpoints/step-000001")


# --------------------------------------------------------------------------- refusals


def test_fp16_is_refused_where_torch_cannot_run_it(monkeypatch, tmp_path):
    monkeypatch.setattr(speed, "_fp16_amp_on_cpu", lambda: False)
    needle = r"speed.mixed_precision=fp16: torch .* has no fp16 autocast or GradScaler on CPU; allowed values here: " \
             r"no, bf16"
    with pytest.raises(UnsupportedSpeedOption, match=needle):
        speed.autocast(CPU, "fp16")
    with pytest.raises(UnsupportedSpeedOption, match=needle):  # before any model is loaded
        Trainer(make_config({"root": str(tmp_path / "never-read"), "model": "unused"}, tmp_path,
                            **{"speed.mixed_precision": "fp16", "device": "cpu"}))
    with pytest.raises(UnsupportedSpeedOption, match="model.dtype=float16"):
        speed.make_grad_scaler(CPU)
    speed.autocast(CPU, "bf16")  # bf16 is unaffected


def test_fp16_is_refused_on_a_device_type_without_it():
    with pytest.raises(UnsupportedSpeedOption, match="speed.mixed_precision=fp16: .* device type meta; allowed "
                                                     "values here: no, bf16"):
        speed.check_speed_support(speed.SpeedConfig(mixed_precision="fp16"), torch.device("meta"))


# --------------------------------------------------------------------------- DeepSpeed: its own fp16 block


@pytest.fixture
def deepspeed_cpu(monkeypatch):
    pytest.importorskip("deepspeed", reason="the 'distributed' extra (deepspeed) is not installed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def test_deepspeed_fp16_uses_its_own_dynamic_loss_scale_not_a_torch_scaler(deepspeed_cpu):
    if not deepspeed_cpu.is_fp16_supported():
        pytest.skip("DeepSpeed's CPU accelerator has no fp16 here")
    parallel = build_parallel("zero2", CPU, 1.0, "fp16")
    parallel._setup_loss_scaling(Probe())  # what wrap does before deepspeed.initialize
    assert parallel.scaler is None and parallel.fp16
    assert parallel.config["fp16"] == DEEPSPEED_FP16 and not parallel.config["bf16"]["enabled"]
    assert DEEPSPEED_FP16["loss_scale"] == 0 and 2 ** DEEPSPEED_FP16["initial_scale_power"] == 2.0**16


def test_deepspeed_bf16_config_is_unchanged(deepspeed_cpu):
    parallel = build_parallel("zero2", CPU, 1.0, "bf16")
    parallel._setup_loss_scaling(Probe())
    assert parallel.scaler is None and not parallel.fp16
    assert "fp16" not in parallel.config and parallel.config["bf16"] == {"enabled": True, "check_grad_overflow": True}


def test_deepspeed_fp16_is_refused_where_its_accelerator_has_no_fp16(deepspeed_cpu, monkeypatch):
    monkeypatch.setattr(type(deepspeed_cpu), "is_fp16_supported", lambda self: False)
    with pytest.raises(UnsupportedSpeedOption, match=r"speed.mixed_precision=fp16: DeepSpeed's cpu accelerator has "
                                                     r"no fp16 .* parallel=zero3 .* allowed values here: no, bf16"):
        build_parallel("zero3", CPU, 1.0, "fp16")
