"""SPO through the trainer (objective.name: spo on the online engine): tiny random SD1.5 and SDXL, LoRA and full,
metrics, the loss against a float64 recomputation, refusals before any model loads, exact SIGKILL-style resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fastpref.config import ConfigError  # noqa: E402
from fastpref.train.config import TrainConfig  # noqa: E402
from helpers.train import launch_train as launch, train_config  # noqa: E402
from helpers.train import write_train_config as write_config  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random SD1.5 / SD1.5-v / SDXL pipelines and a step-aware preference model (the toy SPM at init with
    randomised time conditioning, so scores depend on t)."""
    from fastpref.models import sd, sdxl
    from fastpref.rewards.spm import StepAwareModel
    from fastpref.toy.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("spo-models")
    tokenizer = build_tokenizer()
    sd.build_random(sd.tiny_config("tiny"), tokenizer, seed=0).save_pretrained(root / "sd")
    sdxl.build_random(sdxl.tiny_config("tiny"), tokenizer, seed=0).save_pretrained(root / "sdxl")
    spm = StepAwareModel.from_base("shapeclip")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in spm.named_parameters():
            if not name.startswith("base."):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    spm.save_pretrained(root / "spm")
    return {name: str(root / name) for name in ("sd", "sdxl", "spm")}


def spo_config(models, out, family="sd", **overrides) -> TrainConfig:
    data = {
        "model": {"path": models[family]},
        "objective": {"name": "spo"},
        "mode": "lora",
        "output_dir": str(out),
        "max_steps": 2,
        "checkpoint_every": 1,
        "progress": False,
        "tensorboard": False,
        "lr": 1e-3,
        "loss_backend": "reference",
        "device": "cpu",
        "online": {
            "prompts": "toy:train", "prompt_limit": 16, "prompts_per_rollout": 2, "num_steps": 4,
            "guidance_scale": 5.0, "eta": 1.0, "reward": {"spm": 1.0}, "reward_paths": {"spm": models["spm"]},
            "spo": {"divert_start_step": 1, "num_candidates": 2, "threshold": 0.0, "train_batch_size": 4},
        },
    }
    return train_config(data, **overrides)


def metrics_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def lora_state(out, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / f"step-{step:06d}" / "lora" / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("family,mode", [("sd", "lora"), ("sdxl", "full")])
def test_spo_trains_end_to_end(models, tmp_path, family, mode):
    from fastpref.train.loop import train

    overrides = {"mode": mode}
    if family == "sdxl":  # SPO's SDXL recipe shape: k = 2, inner steps before scoring
        overrides.update({"online.num_steps": 5, "online.spo.num_inner_step": 1})
    summary = train(spo_config(models, tmp_path, family, **overrides))
    rows = [r for r in metrics_of(tmp_path) if "spo_pairs" in r]
    assert len(rows) == 2
    for row in rows:
        assert row["spo_candidates"] > 0 and 0 <= row["spo_kept_rate"] <= 1
        assert math.isfinite(row["spm_score_final"])
        assert row["spo_pairs"] > 0 and math.isfinite(row["loss"])
        assert {"log_ratio", "clip_fraction"} <= set(row)
        assert any(key.startswith("spo_kept_rate_step") for key in row)
    assert summary is not None


def test_spo_loss_through_the_trainer_equals_a_float64_recomputation(models, tmp_path):
    """The method's forward on a rollout's micro-batch = SPO's formula (train_spo.py) on the same pairs in float64:
    log p from DDIM(eta=1) Gaussians of the policy's and the reference's guided predictions."""
    from fastpref.online.rollout import expand_rows
    from fastpref.online.sampler import ddim_step, guided_prediction
    from fastpref.train.online import OnlineTrainer

    trainer = OnlineTrainer(spo_config(models, tmp_path))
    # perturb LoRA so that policy != reference
    with torch.no_grad():
        for name, p in trainer.bundle.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    method = trainer.method
    with trainer.sampling_mode():
        parts = method.rollout(trainer.stream.prompts.next())
    batch = next(b for b in parts[0] if b["count"] > 0)
    out = method.forward(batch, 0)
    rows = batch["rows"]
    x = rows["latents"].flatten(0, 1)
    taken = rows["next_latents"].flatten(0, 1)
    t = rows["timesteps"].repeat_interleave(2)
    cond = {k[5:]: v.repeat_interleave(2, 0) for k, v in rows.items() if k.startswith("cond.")}
    uncond = expand_rows(trainer.uncond, x.shape[0])
    with torch.no_grad():
        policy = guided_prediction(trainer.bundle, x, t, cond, uncond, 5.0).double()
        with trainer.bundle.denoiser.disable_adapter() if hasattr(trainer.bundle.denoiser, "disable_adapter") else \
                _adapters_off(trainer.bundle.denoiser):
            reference = guided_prediction(trainer.bundle, x, t, cond, uncond, 5.0).double()
    scheduler = method.schedule.scheduler

    def log_prob(prediction):
        step = ddim_step(scheduler, prediction.float(), t, x, eta=1.0, prev_sample=taken)
        mean, std = step.mean.double(), step.std.double()
        return (-((taken.double() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).mean(
            dim=(1, 2, 3))

    log_ratio = log_prob(policy) - log_prob(reference)
    assert log_ratio.abs().max() > 1e-4  # the perturbed adapters make policy and reference differ
    ratio = torch.clamp(torch.exp(log_ratio), 0.9, 1.1)
    expected = -torch.log(torch.sigmoid(10 * torch.log(ratio[0::2]) - 10 * torch.log(ratio[1::2]))).mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-4, atol=1e-6)
    assert out.num_images == x.shape[0]


class _adapters_off:
    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.module.disable_adapters()

    def __exit__(self, *args):
        self.module.enable_adapters()


def test_bad_spo_configs_are_refused_before_any_model_loads(models, tmp_path, monkeypatch):
    from fastpref.models import toy_model_path
    from fastpref.train.loop import train

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was refused")

    monkeypatch.setattr("fastpref.models.load", refuse)
    for overrides, match in (({"online.spo.pairs_per_step": 0}, "online.spo.pairs_per_step"),
                             ({"online.spo.pairs_per_step": 4, "online.spo.steps_per_rollout": 2},
                              "online.spo.steps_per_rollout"),
                             ({"online.spo.threshold": 1.2}, "online.spo.threshold: must be in \\[0, 1\\]"),
                             ({"online.spo.num_candidates": 1}, "online.spo.num_candidates: must be >= 2"),
                             ({"online.spo.divert_start_step": 4}, "online.spo.divert_start_step"),
                             ({"online.eta": 0.0}, "online.eta"),
                             ({"online.reward": {"verifier": 1.0}, "online.reward_paths": {}}, "online.reward")):
        with pytest.raises(ConfigError, match=match):
            train(spo_config(models, tmp_path, **overrides))
    with pytest.raises(ConfigError, match="model.path: .*flow-matching"):
        train(spo_config(models, tmp_path, **{"model.path": str(toy_model_path("toy-sd3"))}))


def test_pairs_per_step_must_split_over_the_processes():
    from fastpref.config import from_dict
    from fastpref.online.config import OnlineConfig

    online = from_dict(OnlineConfig, {"reward": {"spm": 1.0}, "prompts_per_rollout": 4, "eta": 1.0,
                                      "spo": {"pairs_per_step": 6}})
    online.check_method("spo", world_size=2)
    with pytest.raises(ConfigError, match="online.spo.pairs_per_step: 6 pairs cannot be split evenly over 4"):
        online.check_method("spo", world_size=4)


def test_pairs_per_step_sets_each_rollouts_steps_from_its_kept_pairs(models, tmp_path):
    """online.spo.pairs_per_step (SPO's rule): ceil(kept / pairs_per_step) optimizer steps per rollout (at least 1),
    the kept pairs spread evenly over them; with threshold 0.02 the tiny SPM keeps a varying number of pairs."""
    from fastpref.train.online import OnlineTrainer

    trainer = OnlineTrainer(spo_config(models, tmp_path, **{"online.spo.pairs_per_step": 4,
                                                              "online.spo.threshold": 0.02,
                                                              "online.prompts_per_rollout": 4}))
    method, steps_seen = trainer.method, set()
    assert method.micro_batches_per_step == 1  # 4 pairs per step in micro-batches of 4
    for _ in range(4):
        with trainer.sampling_mode():
            parts = method.rollout(trainer.stream.prompts.next())
        metrics = method.rollout_metrics
        kept, steps = int(metrics["spo_pairs"]), len(parts)
        assert steps == metrics["spo_steps"] == method.steps_per_rollout == max(1, math.ceil(kept / 4))
        counts = [sum(batch["count"] for batch in part) for part in parts]
        assert counts == [kept // steps] * steps and metrics["spo_pairs_trained"] == sum(counts)
        steps_seen.add(steps)
    assert len(steps_seen) > 1, steps_seen


def test_pairs_per_step_resumes_exactly_from_a_checkpoint_inside_a_rollout(models, tmp_path):
    """6 pairs per rollout, 2 per step: 3 steps per rollout, so the step-2 checkpoint falls inside the first rollout
    and holds its last micro-batch. Stopped there and resumed to step 4: the metrics and LoRA of the straight run."""
    from fastpref.train.loop import train

    overrides = {"checkpoint_every": 1, "online.spo.pairs_per_step": 2, "online.spo.train_batch_size": 2}
    train(spo_config(models, tmp_path / "straight", max_steps=4, **overrides))
    train(spo_config(models, tmp_path / "stopped", max_steps=2, **overrides))
    state = torch.load(tmp_path / "stopped" / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=True)
    assert len(state["stream"]["pending"][0]) == 1  # step 3's micro-batch, sampled before steps 1-2 updated
    train(spo_config(models, tmp_path / "stopped", max_steps=4, **overrides), resume=True)
    expected = {r["step"]: r for r in read_metrics(tmp_path / "straight")}
    got = {r["step"]: r for r in read_metrics(tmp_path / "stopped")}
    assert [expected[s]["spo_steps"] for s in (1, 2, 3, 4)] == [3, 3, 3, 3]
    for step in (3, 4):
        for key in ("loss", "spo_pairs", "spo_steps", "spm_score_final", "log_ratio", "grad_norm"):
            assert got[step][key] == expected[step][key], (step, key)
    a, b = lora_state(tmp_path / "straight", 4), lora_state(tmp_path / "stopped", 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- processes, resume


def read_metrics(out) -> list[dict]:
    return [r for r in metrics_of(out) if "spo_pairs" in r]


def resume_config(models, out, **overrides) -> TrainConfig:
    # 2 prompts x 3 trainable transitions each, all kept (threshold 0): an even pair count, so the 2-process split
    # drops none and 1 and 2 processes train on the same pairs
    return spo_config(models, out, max_steps=4, checkpoint_every=2, **{"online.num_steps": 4, **overrides})


@pytest.mark.slow
def test_sigkill_and_resume_is_exact(models, tmp_path):
    """Killed (SIGKILL) once step 3 is logged, resumed from the step-2 checkpoint: the same metrics and final LoRA
    weights as the uninterrupted run, bit for bit (the rollout is keyed by seed / epoch / prompt id / step, the
    prompt position is checkpointed)."""
    from helpers.train import sigkill_once_logged_then_resume

    straight = write_config(resume_config(models, tmp_path / "straight"), tmp_path / "s.yaml")
    done = launch(straight)
    assert done.returncode == 0, done.stderr[-4000:]
    killed = write_config(resume_config(models, tmp_path / "killed"), tmp_path / "k.yaml")
    sigkill_once_logged_then_resume(killed, tmp_path / "killed", 3, tmp_path / "killed.log")
    expected = {r["step"]: r for r in read_metrics(tmp_path / "straight")}
    got = {r["step"]: r for r in read_metrics(tmp_path / "killed")}
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "spo_pairs", "spm_score_final", "log_ratio", "grad_norm"):
            assert got[step][key] == expected[step][key], (step, key)
    a, b = lora_state(tmp_path / "straight", 4), lora_state(tmp_path / "killed", 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "zero2", "zero3"])
def test_two_processes_equal_one(models, tmp_path, strategy):
    """2 gloo processes (each resamples half the prompts; the kept pairs all-gathered, permuted and split evenly)
    train as 1 process does at the same global batch."""
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed", reason="the 'distributed' extra (deepspeed) is not installed")
    one = write_config(resume_config(models, tmp_path / "one"), tmp_path / "one.yaml")
    proc = launch(one)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = write_config(resume_config(models, tmp_path / "two", parallel=strategy), tmp_path / "two.yaml")
    proc = launch(two, nproc=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("spo_pairs", "spo_candidates", "spo_kept_rate"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    for key in ("spm_score_final", "loss", "log_ratio", "grad_norm"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=2e-3, abs=1e-6), key
    wa, wb = lora_state(tmp_path / "one", 4), lora_state(tmp_path / "two", 4)
    # Adam turns a float-rounding difference of a near-zero gradient element into up to lr (1e-3) per step: the
    # weights agree to a small fraction of one step
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=2e-3, atol=1e-4)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_pairs_per_step_two_processes_resume_inside_a_rollout_exactly(models, tmp_path):
    """pairs_per_step with 2 gloo processes (DDP), stopped at step 2 (inside the first rollout: each process keeps
    its share of the rollout's last step) and resumed to step 4: bit for bit the uninterrupted 2-process run, which
    trains on the 1-process run's pairs. The checkpoint holds both processes' pending micro-batches, so 1 process
    may not resume it."""
    import shutil

    from helpers.train import launch_train

    overrides = {"checkpoint_every": 1, "online.num_steps": 4, "online.spo.pairs_per_step": 2,
                 "online.spo.train_batch_size": 1}

    def run(name, nproc, resume=False, **more):
        cfg = spo_config(models, tmp_path / name, **{"max_steps": 4, **overrides, **more})
        proc = launch_train(write_config(cfg, tmp_path / f"{name}-{more.get('max_steps', 4)}.yaml"), nproc=nproc,
                            resume=resume)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]

    run("one", 1)
    run("two", 2, parallel="ddp")
    run("stopped", 2, parallel="ddp", max_steps=2)
    shutil.copytree(tmp_path / "stopped", tmp_path / "stopped-on-one")
    run("stopped", 2, resume=True, parallel="ddp")
    one, two, stopped = (read_metrics(tmp_path / name) for name in ("one", "two", "stopped"))
    assert [r["step"] for r in stopped] == [1, 2, 3, 4] and [r["spo_steps"] for r in one] == [3, 3, 3, 3]
    for key in ("loss", "spo_pairs", "spo_steps", "spo_pairs_trained", "spm_score_final", "log_ratio", "grad_norm"):
        assert [r[key] for r in stopped] == [r[key] for r in two], key
    for key in ("spo_pairs", "spo_steps", "spo_pairs_trained"):
        assert [r[key] for r in one] == [r[key] for r in two], key
    for key in ("loss", "log_ratio", "grad_norm"):
        assert [r[key] for r in one] == pytest.approx([r[key] for r in two], rel=2e-3, abs=1e-6), key
    a, b = lora_state(tmp_path / "two", 4), lora_state(tmp_path / "stopped", 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = spo_config(models, tmp_path / "stopped-on-one", **{"max_steps": 4, **overrides})
    proc = launch_train(write_config(cfg, tmp_path / "alone.yaml"), resume=True)
    assert proc.returncode == 2 and "resume it with as many" in proc.stderr, proc.stderr[-3000:]
