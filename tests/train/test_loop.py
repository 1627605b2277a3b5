import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fastpref.config import ConfigError, load_config, to_dict
from fastpref.train.checkpoint import CheckpointManager
from fastpref.train.config import TrainConfig
from fastpref.train.loop import Trainer, train
from fastpref.train.metrics import read_metrics

from helpers.train import make_config, train_command


@pytest.mark.parametrize(
    "objective, mode, reference",
    [
        ("rankdpo", "lora", "auto"),  # cached e_ref
        ("dpo", "lora", "adapters_off"),
        ("kto", "full", "frozen_copy"),
        ("cpo", "full", "auto"),
        ("mapo", "lora", "auto"),
        ("sft", "full", "auto"),
    ],
)
def test_every_objective_trains(cached_dataset, tmp_path, objective, mode, reference):
    """4 steps = one epoch of the fixture: the trainable weights move and the mean loss over the epoch's batches, at
    the epoch's own (t, eps), goes down."""
    cfg = make_config(cached_dataset, tmp_path, **{"objective.name": objective, "mode": mode, "reference": reference})
    trainer = Trainer(cfg)
    assert len(trainer.stream) == cfg.max_steps, "the training batches must be exactly one epoch"
    start = trainer.stream.state_dict()
    epoch_batches = [batch for _, (_, batch) in zip(range(len(trainer.stream)), trainer.batches())]
    trainer.stream.load_state_dict(start)

    def epoch_loss():
        with torch.no_grad():
            losses = [out.loss for b in epoch_batches if (out := trainer.step_fn.forward(b, 0)) is not None]
        assert losses, "no batch of the epoch carries a preference"
        return torch.stack(losses).mean().item()

    trainable = {n: p.detach().clone() for n, p in trainer.bundle.denoiser.named_parameters() if p.requires_grad}
    loss_before = epoch_loss()
    summary = trainer.train()
    unchanged = [n for n, p in trainer.bundle.denoiser.named_parameters() if n in trainable
                 and torch.equal(p.detach(), trainable[n])]
    assert trainable and not unchanged, f"{len(unchanged)}/{len(trainable)} trainable tensors kept: {unchanged[:5]}"
    loss_after = epoch_loss()
    assert loss_after < loss_before, (loss_before, loss_after)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    expected_reference = {"auto": {"rankdpo": "cached"}.get(objective, "none")}.get(reference, reference)
    assert summary["reference"] == expected_reference
    latest = CheckpointManager(tmp_path / "checkpoints").latest()
    assert latest.name == "step-000004"
    assert (latest / ("lora/pytorch_lora_weights.safetensors" if mode == "lora" else "denoiser/config.json")).exists()


def test_saved_lora_loads_in_diffusers_and_reproduces_the_policy(cached_dataset, tmp_path):
    from diffusers import StableDiffusionPipeline

    trainer = Trainer(make_config(cached_dataset, tmp_path, max_steps=3, checkpoint_every=3))
    trainer.train()
    generator = torch.Generator().manual_seed(0)
    unet = trainer.bundle.denoiser
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator)
    context = torch.randn(2, 7, unet.config.cross_attention_dim, generator=generator)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        trained = unet(x, t, encoder_hidden_states=context).sample
        pipe = StableDiffusionPipeline.from_pretrained(cached_dataset["model"], safety_checker=None)
        base = pipe.unet(x, t, encoder_hidden_states=context).sample
        pipe.load_lora_weights(str(tmp_path / "checkpoints/step-000003/lora"))
        loaded = pipe.unet(x, t, encoder_hidden_states=context).sample
    assert (trained - base).abs().max() > 1e-4  # training changed the network
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)


def test_cached_reference_errors_equal_the_live_reference(cached_dataset, tmp_path):
    """At the first step the LoRA policy equals the reference, so e_pol, cached e_ref and live e_ref agree."""
    losses = {}
    for reference in ("cached", "adapters_off"):
        trainer = Trainer(make_config(cached_dataset, tmp_path / reference, reference=reference))
        epoch, batch = next(trainer.batches())
        out = trainer.step_fn.forward(batch, epoch)
        losses[reference] = out
        assert torch.allclose(out.metrics["e_pol"], out.metrics["e_ref"], rtol=1e-3)
    assert torch.allclose(losses["cached"].loss, losses["adapters_off"].loss, atol=1e-3)


def run_in_subprocess(config_path, resume=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(train_command(config_path, resume), env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_sigkill_and_resume_is_exact(cached_dataset, tmp_path, mode):
    """A run SIGKILLed from outside once it has logged step 5 (last checkpoint: step 4 or 6) and resumed ends with
    exactly the weights and loss log of an uninterrupted run; the 8 steps cross an epoch boundary (4 batches per
    epoch). LoRA with dropout draws from the torch RNG at every step, so the resume must restore it exactly."""
    results = {}
    extra = {"lora.dropout": 0.25} if mode == "lora" else {}
    for name in ("straight", "killed"):
        cfg = make_config(cached_dataset, tmp_path / name, max_steps=8, checkpoint_every=2, mode=mode, **extra)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(to_dict(cfg)))
        if name == "killed":
            logged = kill_when_logged(path, tmp_path / name, step=5, log=tmp_path / "killed.log")
            assert logged < 8, "the run finished before it was killed"
            assert [r["step"] for r in read_metrics(tmp_path / name)] == list(range(1, logged + 1))
            proc = run_in_subprocess(path, resume=True)
            assert "resumed_from': 4" in proc.stdout or "resumed_from': 6" in proc.stdout, \
                proc.stdout + proc.stderr[-2000:]
        else:
            proc = run_in_subprocess(path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[name] = tmp_path / name
    from safetensors.torch import load_file

    final = {name: load_file(p / "checkpoints/step-000008/trainable.safetensors") for name, p in results.items()}
    assert final["straight"].keys() == final["killed"].keys()
    for key in final["straight"]:
        assert torch.equal(final["straight"][key], final["killed"][key]), key
    untimed = {name: [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_metrics(p)]
               for name, p in results.items()}
    assert untimed["straight"] == untimed["killed"]
    assert CheckpointManager(results["killed"] / "checkpoints").steps() == [6, 8]  # keep_last=2


def kill_when_logged(config_path, run_dir, step: int, log) -> int:
    """Start `fastpref train`, SIGKILL it (from outside, as a crash would) once metrics.jsonl holds `step`;
    returns the last step it had logged."""
    from helpers.train import start_and_kill_when

    metrics = Path(run_dir) / "metrics.jsonl"

    def logged_steps():
        try:
            return len(metrics.read_text().splitlines())
        except OSError:
            return 0

    returncode = start_and_kill_when(train_command(config_path), lambda: logged_steps() >= step, log)
    assert returncode == -9, Path(log).read_text()[-2000:]
    return logged_steps()


def test_nonfinite_steps_are_skipped_then_abort(cached_dataset, tmp_path):
    trainer = Trainer(make_config(cached_dataset, tmp_path, max_steps=6, max_nonfinite_in_a_row=3))
    real_forward = trainer.step_fn.forward
    calls = {"n": 0}

    def sometimes_nan(batch, epoch):
        calls["n"] += 1
        out = real_forward(batch, epoch)
        if calls["n"] in (2, 4, 5, 6):
            out.loss = out.loss * float("nan")
        return out

    trainer.step_fn.forward = sometimes_nan
    before = {k: v.clone() for k, v in trainer.bundle.denoiser.named_parameters() if v.requires_grad}
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        trainer.train()
    assert trainer.nonfinite_total == 4
    records = read_metrics(tmp_path)
    assert [r.get("skipped", 0) for r in records] == [0, 1, 0, 1, 1]
    after = dict(trainer.bundle.denoiser.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["objective.name=rankdp"], "objective.name: 'rankdp' is not one of"),
        (["mode=full", "reference=adapters_off"], "adapters_off' needs mode: lora"),
        (["max_steps=0"], "max_steps: must be >= 1"),
        (["speed.optimizer=sgd"], "speed.optimizer: 'sgd' is not one of"),
    ],
)
def test_config_errors_name_the_key(tmp_path, overrides, needle):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  root: /nowhere\n")
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config(TrainConfig, path, overrides)


def test_auto_reference_runs_live_when_training_precision_differs_from_the_cache(cached_dataset, tmp_path):
    """bf16 training against fp32-cached e_ref would start with biased margins (beta magnifies the gap)."""
    with pytest.warns(UserWarning, match="computed in float32, training runs in bfloat16"):
        trainer = Trainer(make_config(cached_dataset, tmp_path, **{"speed.mixed_precision": "bf16"}))
    assert trainer.reference_mode == "adapters_off"
    epoch, batch = next(trainer.batches())
    out = trainer.step_fn.forward(batch, epoch)
    assert abs(float(out.loss) - math.log(2)) < 1e-6  # policy == reference at step 0, in the same precision


def test_cached_reference_must_cover_the_whole_run(cached_dataset, tmp_path):
    """8 groups / 2 per batch = 4 batches per epoch; e_ref is cached for 2 epochs = 8 steps."""
    assert Trainer(make_config(cached_dataset, tmp_path / "a", max_steps=8)).reference_mode == "cached"
    with pytest.warns(UserWarning, match="reference errors for 2 epochs and training needs 3"):
        trainer = Trainer(make_config(cached_dataset, tmp_path / "b", max_steps=9))
    assert trainer.reference_mode == "adapters_off"
    with pytest.raises(ConfigError, match="needs 3"):
        Trainer(make_config(cached_dataset, tmp_path / "c", max_steps=9, reference="cached"))


@pytest.mark.parametrize("case", ["too_few_epochs", "no_cached_errors"])
def test_a_cached_reference_the_dataset_cannot_serve_fails_before_the_model_loads(cached_dataset, tmp_path,
                                                                                  monkeypatch, case):
    import fastpref.models
    from fastpref.data.dataset import CachedDataset

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the config error was raised")

    monkeypatch.setattr(fastpref.models, "load", no_loading)
    if case == "no_cached_errors":
        init = CachedDataset.__init__

        def without_e_ref(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.e_ref = None

        monkeypatch.setattr(CachedDataset, "__init__", without_e_ref)
    max_steps, needle = (9, "needs 3") if case == "too_few_epochs" else (4, "holds no reference errors")
    with pytest.raises(ConfigError, match=needle):
        Trainer(make_config(cached_dataset, tmp_path, max_steps=max_steps, reference="cached"))


def trainable_grad_norm(trainer) -> float:
    grads = [p.grad.detach().flatten() for p in trainer.parallel.trainable_parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(grads)))


def test_the_logged_grad_norm_is_that_steps_norm_before_clipping(cached_dataset, tmp_path):
    """Step 1's gradients computed by hand (a trainer built alike sees the same batch, noise and LoRA init) against
    the grad_norm a 1-step run logs; max_grad_norm 1e-3 clips hard, so a clipped norm would show."""
    probe = Trainer(make_config(cached_dataset, tmp_path / "probe", max_steps=1, max_grad_norm=1e-3))
    epoch, batch = next(probe.batches())
    probe.step_fn.forward(batch, epoch).loss.backward()
    expected = trainable_grad_norm(probe)
    assert expected > 1e-2
    train(make_config(cached_dataset, tmp_path / "run", max_steps=1, max_grad_norm=1e-3))
    assert read_metrics(tmp_path / "run")[0]["grad_norm"] == pytest.approx(expected, rel=1e-5)


ZERO_WORKER = '''
import json, math, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from helpers.train import make_config
from fastpref.train.loop import Trainer


class NaNGradient(torch.autograd.Function):
    """The loss as it is, a NaN gradient behind it: the case a finite-loss check cannot see."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


dataset, out = json.loads(sys.argv[2]), sys.argv[3]
result = {}
plain = Trainer(make_config(dataset, out + "/none", parallel="none"))
result["none_grad_norm"] = plain.optimizer_step(plain.batches())[0]["grad_norm"]
zero = Trainer(make_config(dataset, out + "/zero", parallel="zero2", lr_warmup_steps=4, max_nonfinite_in_a_row=2))
batches = zero.batches()
result["step1"] = zero.optimizer_step(batches)[0]
real_forward = zero.step_fn.forward


def nan_gradient(batch, epoch):
    step = real_forward(batch, epoch)
    step.loss = NaNGradient.apply(step.loss)
    return step


zero.step_fn.forward = nan_gradient
before = {k: v.detach().clone() for k, v in zero.bundle.denoiser.named_parameters() if v.requires_grad}
result["step2"] = zero.optimizer_step(batches)[0]
after = dict(zero.bundle.denoiser.named_parameters())
result["unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
result["schedule"] = [zero.scheduler.last_epoch, zero.scheduler.get_last_lr()[0]]
result["counts"] = [zero.nonfinite_total, zero.nonfinite_in_a_row]
try:
    zero.optimizer_step(batches)
    result["aborted"] = None
except FloatingPointError as err:
    result["aborted"] = str(err)
print("RESULT " + json.dumps(result))
'''


@pytest.mark.slow
def test_zero_logs_this_steps_grad_norm_and_skips_a_nan_gradient_behind_a_finite_loss(cached_dataset, tmp_path):
    """1-process ZeRO-2 (fp32): DeepSpeed computes the norm inside engine.step, so the loop reads it after the step
    (it used to log the previous step's: NaN at step 1). A NaN gradient behind a finite loss: DeepSpeed skips the
    update (its overflow check), and the loop counts it like any non-finite step: the schedule advances, it counts
    towards max_nonfinite_in_a_row and aborts there."""
    from helpers.train import run_deepspeed_worker

    pytest.importorskip("deepspeed", reason="the 'distributed' extra (deepspeed) is not installed")
    result = run_deepspeed_worker(ZERO_WORKER, cached_dataset, tmp_path)
    assert math.isfinite(result["step1"]["grad_norm"]) and not result["step1"].get("skipped")
    assert result["step1"]["grad_norm"] == pytest.approx(result["none_grad_norm"], rel=1e-4)
    assert result["step2"]["skipped"] == 1 and math.isnan(result["step2"]["loss"])
    assert result["unchanged"]
    assert result["schedule"] == [2, pytest.approx(0.5e-3)]  # warmup 4 from 0: 2 / 4 after 2 steps, one skipped
    assert result["counts"] == [1, 1]
    assert result["aborted"] is not None and "2 steps in a row" in result["aborted"]


def test_an_update_deepspeed_applied_with_a_non_finite_norm_stops_the_run():
    """A DeepSpeed without the overflow check (bf16.check_grad_overflow: false, or an older release) would apply a
    NaN gradient: the strategy, reading the step's norm after engine.step, stops the run instead of training on.
    Stubbed: a ZeRO strategy whose engine reports an inf norm for an applied step."""
    from types import SimpleNamespace

    from fastpref.train.parallel import DeepSpeedZero

    parallel = DeepSpeedZero.__new__(DeepSpeedZero)  # no engine to build: only what step() reads
    parallel.fp16 = False
    parallel.scheduler = SimpleNamespace(last_epoch=0)
    parallel.engine = SimpleNamespace(step=lambda: None, was_step_applied=lambda: True,
                                      get_global_grad_norm=lambda: torch.tensor(float("inf")))
    with pytest.raises(FloatingPointError, match=r"DeepSpeed applied an update with a non-finite gradient norm \(inf\)"):
        parallel.step()


def test_a_resume_with_other_settings_is_refused_naming_them(cached_dataset, tmp_path):
    """Rerunning into a finished training's folder with another lr would keep the old training and label it with the
    new settings (config.yaml is rewritten): refused, naming the key; what a resume may change (how long, how often it
    checkpoints or logs) is allowed."""
    cfg = make_config(cached_dataset, tmp_path, max_steps=2, checkpoint_every=2)
    train(cfg)
    changed = make_config(cached_dataset, tmp_path, max_steps=2, checkpoint_every=2, lr=cfg.lr * 3)
    with pytest.raises(ConfigError, match=rf"holds a training made with other settings \(lr: {cfg.lr!r} -> "
                                          rf"{cfg.lr * 3!r}; its config.yaml\)"):
        train(changed, resume=True)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["lr"] == cfg.lr  # nothing rewritten
    longer = make_config(cached_dataset, tmp_path, max_steps=3, checkpoint_every=1, log_every=2)
    assert train(longer, resume=True)["steps"] == 3


def test_a_resume_reads_keys_added_since_as_their_defaults(cached_dataset, tmp_path):
    """A training saved before a key existed (its config.yaml lacks lr_scheduler) had that key's default behaviour:
    it resumes; a saved key that no longer exists is still named."""
    cfg = make_config(cached_dataset, tmp_path, max_steps=2, checkpoint_every=2)
    train(cfg)
    saved = tmp_path / "config.yaml"
    older = yaml.safe_load(saved.read_text())
    assert older.pop("lr_scheduler") == "constant"
    saved.write_text(yaml.safe_dump(older))
    assert train(make_config(cached_dataset, tmp_path, max_steps=3, checkpoint_every=1), resume=True)["steps"] == 3
    changed = make_config(cached_dataset, tmp_path, max_steps=4, checkpoint_every=1, lr_scheduler="cosine")
    with pytest.raises(ConfigError, match=r"other settings \(lr_scheduler: 'constant' -> 'cosine'"):
        train(changed, resume=True)
    saved.write_text(yaml.safe_dump({**yaml.safe_load(saved.read_text()), "warmup_epochs": 2}))
    with pytest.raises(ConfigError, match=r"other settings \(warmup_epochs: 2 -> None"):
        train(make_config(cached_dataset, tmp_path, max_steps=4, checkpoint_every=1), resume=True)
