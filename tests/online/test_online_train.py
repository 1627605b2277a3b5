"""The online trainer with GRPO end to end: tiny random SD3 (flow SDE) and SD (DDIM eta), LoRA and full, the
rollout/training consistency (ratio 1 at the first update), exact SIGKILL resume, 2 gloo processes == 1, and the
online recipes through `fastpref run`."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from fastpref.config import ConfigError, load_config  # noqa: E402
from fastpref.train.metrics import read_metrics  # noqa: E402
from helpers.train import launch_train as launch, train_config  # noqa: E402
from helpers.train import write_train_config as write_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared test helpers (tests/helpers)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from fastpref.models import sd, sd3, sdxl
    from fastpref.toy.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("online-models")
    sd3.build_random(sd3.tiny_config("tiny"), build_tokenizer(), seed=0).save_pretrained(root / "sd3")
    sd.build_random(sd.tiny_config("tiny"), build_tokenizer(), seed=0).save_pretrained(root / "sd")
    sd.build_random(sd.tiny_config("tiny", prediction_type="v_prediction"), build_tokenizer(),
                    seed=0).save_pretrained(root / "sd-v")
    sdxl.build_random(sdxl.tiny_config("tiny"), build_tokenizer(), seed=0).save_pretrained(root / "sdxl")
    return {name: str(root / name) for name in ("sd3", "sd", "sd-v", "sdxl")}


def grpo_config(model, out, **overrides):
    data = {
        "model": {"path": model},
        "objective": {"name": "grpo"},
        "output_dir": str(out),
        "max_steps": 2,
        "checkpoint_every": 2,
        "progress": False,
        "tensorboard": False,
        "lr": 3e-3,
        "loss_backend": "reference",
        "online": {"prompts": "toy:train", "prompts_per_rollout": 2, "group_size": 4, "num_steps": 3,
                   "guidance_scale": 3.0, "reward": {"quality": 1.0},
                   "grpo": {"kl_beta": 0.04, "train_batch_size": 4, "timestep_fraction": 1.0, "clip_range": 0.2}},
    }
    return train_config(data, **overrides)


def trainable(out, step):
    from safetensors.torch import load_file

    return load_file(Path(out) / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors")


@pytest.mark.parametrize("family, mode", [("sd3", "lora"), ("sd", "full"), ("sd-v", "lora"), ("sdxl", "lora")])
def test_grpo_trains_end_to_end(tiny_models, tmp_path, family, mode):
    from fastpref.train.loop import train

    cfg = grpo_config(tiny_models[family], tmp_path / "run", mode=mode, **{"validation.every": 2,
                      "validation.num_prompts": 2, "validation.seeds": [0], "validation.num_inference_steps": 4})
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["reference"] == ("adapters_off" if mode == "lora" else "frozen_copy")
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        for key in ("reward_mean", "reward_std", "reward_quality", "advantage_abs_mean", "zero_std_ratio",
                    "reward_std_mean", "reward_std_max", "reward_group_mean_std", "advantage_std",
                    "advantage_abs_max", "advantage_clip_fraction",
                    "clip_fraction", "kl", "approx_kl", "policy_loss", "ratio", "grad_norm", "loss"):
            assert key in record and record[key] == record[key], (key, record)  # present and not NaN
        # advantages of a group are centred and scaled by a std: some move, none beyond the clamp (5)
        assert 0 < record["advantage_abs_mean"] <= record["advantage_abs_max"] <= 5.0
        assert 0 <= record["advantage_clip_fraction"] <= 1 and record["advantage_std"] > 0
    # the first update is taken on the rollout of the very same policy: ratio 1, no KL yet
    assert records[0]["approx_kl"] < 1e-8 and records[0]["kl"] < 1e-8
    assert abs(records[0]["ratio"] - 1) < 1e-5
    assert records[1]["kl"] > 0  # the policy moved away from the reference
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    assert (checkpoint / ("lora" if mode == "lora" else "denoiser")).is_dir()
    assert sorted(p.name for p in (tmp_path / "run" / "validation").glob("*.png")) == ["step-000000.png",
                                                                                    "step-000002.png"]
    if mode == "lora":  # peft's gaussian init has lora_B = 0: an update made them nonzero
        weights = trainable(tmp_path / "run", 2)
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())


def test_first_update_sees_the_rollouts_own_log_probs(tiny_models, tmp_path):
    """Rollout and training evaluate the same Gaussian (timesteps, conditioning, guidance, sigmas): the training
    forward of the unchanged policy reproduces every stored old log-prob."""
    from fastpref.train.online import OnlineTrainer

    for family in ("sd3", "sd", "sdxl"):
        cfg = grpo_config(tiny_models[family], tmp_path / family, max_steps=1, checkpoint_every=1)
        trainer = OnlineTrainer(cfg)
        epoch, batch = next(trainer.batches())
        rows, j = batch["rows"], batch["step"]
        from fastpref.online.rollout import expand_rows, take_step
        from fastpref.online.sampler import guided_prediction

        method = trainer.method
        x = rows["latents"][:, j]
        cond = {key[5:]: value for key, value in rows.items() if key.startswith("cond.")}
        with torch.no_grad():
            prediction = guided_prediction(trainer.policy, x, method.schedule.timesteps[j].expand(len(x)), cond,
                                           expand_rows(trainer.uncond, len(x)), cfg.online.guidance_scale)
            step = take_step(method.schedule, j, prediction, x, eta=cfg.online.eta,
                             noise_level=cfg.online.noise_level, prev_sample=rows["latents"][:, j + 1])
        torch.testing.assert_close(step.log_prob, rows["log_probs"][:, j], rtol=0, atol=1e-4)
        out = method.forward(batch, epoch)
        assert float(out.metrics["approx_kl"]) < 1e-8


@pytest.mark.parametrize("family", ["sd3", "sd"])
def test_one_update_moves_log_probs_toward_the_better_images(tiny_models, tmp_path, family):
    """The policy-gradient direction, end to end: after one GRPO update, the log-probs of the rollout's taken steps
    rise with the reward of the image each trajectory ended in: sum_i (r_i - mean r) * (logp_after - logp_before) > 0,
    r recomputed here from each row's final latent (the prompt-blind quality reward, advantages over the whole
    rollout), both log-probs recomputed the same way. Catches a flipped sign or advantages attached to the wrong
    samples, which the formula tests cannot see."""
    from fastpref.online.rollout import decode_images, expand_rows, take_step
    from fastpref.online.sampler import guided_prediction
    from fastpref.train.online import OnlineTrainer

    cfg = grpo_config(tiny_models[family], tmp_path / family, max_steps=1, checkpoint_every=1, lr=1e-3,
                      lr_warmup_steps=0, **{"online.grpo.kl_beta": 0.0, "online.grpo.clip_range": 1.0,
                                            "online.grpo.stat_tracking": False})
    trainer = OnlineTrainer(cfg)
    method = trainer.method

    @torch.no_grad()
    def log_probs(batch):
        rows, j = batch["rows"], batch["step"]
        x = rows["latents"][:, j]
        cond = {key[5:]: value for key, value in rows.items() if key.startswith("cond.")}
        prediction = guided_prediction(trainer.policy, x, method.schedule.timesteps[j].expand(len(x)), cond,
                                       expand_rows(trainer.uncond, len(x)), cfg.online.guidance_scale)
        return take_step(method.schedule, j, prediction, x, eta=cfg.online.eta, noise_level=cfg.online.noise_level,
                         prev_sample=rows["latents"][:, j + 1]).log_prob.double()

    batches, before = [], []
    rollout = method.rollout

    def rollout_and_score(prompts):  # the rollout's micro-batches and their log-probs under the policy that sampled
        parts = rollout(prompts)
        batches.extend(parts[0])
        before.extend(log_probs(batch) for batch in parts[0])
        return parts

    method.rollout = rollout_and_score
    trainer.optimizer_step(trainer.batches())
    chunks = {id(batch["rows"]): batch["rows"] for batch in batches}  # each micro-batch's rows, at every step
    with torch.no_grad():  # x_0 of each row (timestep_fraction 1: every step is trained) -> its reward
        rewards = {key: trainer.reward(decode_images(trainer.bundle, rows["latents"][:, -1]),
                                       [""] * len(rows["latents"])).double() for key, rows in chunks.items()}
    mean = torch.cat(list(rewards.values())).mean()
    aligned = sum(float(((rewards[id(batch["rows"])] - mean) * (log_probs(batch) - old)).sum())
                  for batch, old in zip(batches, before))
    assert aligned > 0, aligned


def test_inner_epochs_pass_over_each_rollout_again_off_policy(tiny_models, tmp_path):
    """online.grpo.inner_epochs 2 (Flow-GRPO's num_inner_epochs): one rollout feeds 2 optimizer steps, each over
    all of its kept samples, the second in a new order and off-policy (the ratio moves from 1 there)."""
    from fastpref.train.online import OnlineTrainer

    cfg = grpo_config(tiny_models["sd3"], tmp_path / "run", max_steps=2, checkpoint_every=2,
                      **{"online.grpo.inner_epochs": 2, "online.grpo.kl_beta": 0.0})
    trainer = OnlineTrainer(cfg)
    method, rollout, parts_seen = trainer.method, trainer.method.rollout, []
    assert method.steps_per_rollout == 2 and type(method).configured_steps_per_rollout(cfg) == 2

    def recorded(prompts):
        parts = rollout(prompts)
        parts_seen.append(parts)
        return parts

    method.rollout = recorded
    batches = trainer.batches()
    records = [trainer.optimizer_step(batches)[0] for _ in range(2)]
    assert len(parts_seen) == 1 and len(parts_seen[0]) == 2  # one rollout, two passes

    def rows_of(part):  # each sample once per pass: its final latent's bytes, in the pass's order
        chunks = {id(batch["rows"]): batch["rows"] for batch in part if batch["count"]}
        return [bytes(row.numpy().tobytes()) for rows in chunks.values() for row in rows["latents"][:, -1]]

    first, second = rows_of(parts_seen[0][0]), rows_of(parts_seen[0][1])
    assert sorted(first) == sorted(second) and len(set(first)) == len(first) > 1
    assert first != second  # reshuffled
    assert abs(records[0]["ratio"] - 1) < 1e-5 and records[0]["approx_kl"] < 1e-8
    assert records[1]["approx_kl"] > 1e-8  # the second pass scores the samples under the updated policy
    with pytest.raises(ConfigError, match="checkpoint_every"):
        OnlineTrainer(grpo_config(tiny_models["sd3"], tmp_path / "bad", checkpoint_every=1, max_steps=2,
                                  **{"online.grpo.inner_epochs": 2}))


def test_advantage_statistics_report_the_clamp(tiny_models, tmp_path):
    """adv_clip_max 0.5 clamps some of the tiny model's advantages (|A| ~ 1 under the global std): the logged
    maximum is the clamp and the clipped fraction counts them; without a clamp that bites, none is clipped."""
    from fastpref.train.online import OnlineTrainer

    stats = {}
    for clamp in (0.5, 1e6):
        cfg = grpo_config(tiny_models["sd3"], tmp_path / str(clamp), max_steps=1, checkpoint_every=1,
                          **{"online.grpo.adv_clip_max": clamp})
        trainer = OnlineTrainer(cfg)
        next(trainer.batches())
        stats[clamp] = trainer.method.rollout_metrics
    assert stats[0.5]["advantage_abs_max"] == pytest.approx(0.5)
    assert 0 < stats[0.5]["advantage_clip_fraction"] < 1
    assert stats[1e6]["advantage_clip_fraction"] == 0 and stats[1e6]["advantage_abs_max"] > 0.5
    assert stats[1e6]["advantage_std"] > stats[0.5]["advantage_std"]


def test_grpo_refuses_bad_online_settings_before_loading(tiny_models, tmp_path):
    from fastpref.train.online import OnlineTrainer

    with pytest.raises(ConfigError, match="checkpoint_every"):
        OnlineTrainer(grpo_config(tiny_models["sd3"], tmp_path / "a", checkpoint_every=3, max_steps=4,
                                  **{"online.grpo.steps_per_rollout": 2}))
    with pytest.raises(ConfigError, match="grad_accumulation"):
        OnlineTrainer(grpo_config(tiny_models["sd3"], tmp_path / "b", grad_accumulation=2))
    with pytest.raises(ConfigError, match="online.group_size"):
        OnlineTrainer(grpo_config(tiny_models["sd3"], tmp_path / "c", **{"online.group_size": 1}))


@pytest.mark.parametrize("overrides, key", [
    ({"online.grpo.clip_range": 0.0}, "online.grpo.clip_range"),
    ({"online.grpo.clip_range": -0.2}, "online.grpo.clip_range"),
    ({"online.grpo.timestep_fraction": 0.0}, "online.grpo.timestep_fraction"),
    ({"online.grpo.timestep_fraction": 1.5}, "online.grpo.timestep_fraction"),
    ({"online.grpo.adv_clip_max": 0.0}, "online.grpo.adv_clip_max"),
    ({"online.grpo.kl_beta": -0.04}, "online.grpo.kl_beta"),
    ({"online.grpo.ema_decay": 1.0}, "online.grpo.ema_decay"),
    ({"online.group_size": 1}, "online.group_size"),
    ({"online.eta": 0.0}, "online.eta"),
    ({"online.grpo.steps_per_rollout": 3}, "online.grpo.steps_per_rollout"),
    ({"online.grpo.inner_epochs": 0}, "online.grpo.inner_epochs"),
])
def test_bad_grpo_configs_are_refused_before_any_model_loads(tmp_path, monkeypatch, overrides, key):
    """Through `train` (as `fastpref train` runs it) on a model path that does not exist: the error names the key,
    and no model or reward was loaded."""
    import fastpref.models
    import fastpref.rewards
    from fastpref.train.loop import train

    monkeypatch.setattr(fastpref.models, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(fastpref.rewards, "build_reward", lambda *a, **k: pytest.fail("a reward was loaded"))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train(grpo_config(str(tmp_path / "no-model"), tmp_path / "run", **overrides))


def resume_config(tiny_models, out, **overrides):
    return grpo_config(tiny_models["sd3"], out, max_steps=4, checkpoint_every=2,
                       **{"online.prompts_per_rollout": 2, "online.grpo.steps_per_rollout": 2, **overrides})


@pytest.mark.slow
def test_sigkill_and_resume_is_exact(tiny_models, tmp_path):
    """Killed (SIGKILL, from outside) once step 3 is logged, resumed from the step-2 checkpoint: the same metrics
    and final weights as the uninterrupted run, bit for bit (rollouts keyed by seed/epoch/prompt, EMA restored)."""
    from helpers.train import sigkill_once_logged_then_resume

    overrides = {"online.grpo.ema": True, "online.grpo.ema_every": 1}
    straight = write_config(resume_config(tiny_models, tmp_path / "straight", **overrides), tmp_path / "s.yaml")
    done = launch(straight)
    assert done.returncode == 0, done.stderr[-4000:]
    killed_cfg = write_config(resume_config(tiny_models, tmp_path / "killed", **overrides), tmp_path / "k.yaml")
    sigkill_once_logged_then_resume(killed_cfg, tmp_path / "killed", 3, tmp_path / "killed.log")
    expected = {r["step"]: r for r in read_metrics(tmp_path / "straight")}
    got = {r["step"]: r for r in read_metrics(tmp_path / "killed")}
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "reward_mean", "kl", "approx_kl", "grad_norm"):
            assert got[step][key] == expected[step][key], (step, key)
    a, b = trainable(tmp_path / "straight", 4), trainable(tmp_path / "killed", 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema = Path("checkpoints") / "step-000004" / "ema" / "lora" / "pytorch_lora_weights.safetensors"
    from safetensors.torch import load_file

    ea, eb = load_file(tmp_path / "straight" / ema), load_file(tmp_path / "killed" / ema)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy, extra", [
    ("ddp", {}), ("fsdp2", {}), ("zero2", {}), ("zero3", {}),
    # 2 passes over each rollout instead of 2 optimizer steps of half of it: the same steps per rollout
    ("ddp", {"online.grpo.steps_per_rollout": 1, "online.grpo.inner_epochs": 2}),
], ids=["ddp", "fsdp2", "zero2", "zero3", "ddp-inner-epochs"])
def test_two_processes_equal_one(tiny_models, tmp_path, strategy, extra):
    """2 gloo processes (each samples half the prompts; rewards gathered for the advantages; kept samples spread by
    one global permutation per pass) train as 1 process does on the same global rollout."""
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed", reason="the 'distributed' extra (deepspeed) is not installed")
    one = write_config(resume_config(tiny_models, tmp_path / "one", **extra), tmp_path / "one.yaml")
    proc = launch(one)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = write_config(resume_config(tiny_models, tmp_path / "two", parallel=strategy, **extra), tmp_path / "two.yaml")
    proc = launch(two, nproc=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("reward_mean", "advantage_abs_mean", "kept_fraction"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-5, abs=1e-7), key
    for key in ("loss", "kl", "grad_norm"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=2e-3, abs=1e-6), key
    wa, wb = trainable(tmp_path / "one", 4), trainable(tmp_path / "two", 4)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=2e-3, atol=1e-5)


ACCUMULATION_WORKER = """
import json, sys
from pathlib import Path
sys.path[:0] = [sys.argv[1], str(Path(sys.argv[1]).parent)]  # tests/online, tests (helpers)
import torch
from test_online_train import grpo_config
from fastpref.train.online import OnlineTrainer

model, out, strategy = sys.argv[2:5]
trainer = OnlineTrainer(grpo_config(model, out, parallel=strategy, max_steps=4, checkpoint_every=4,
                                    **{"online.num_steps": 3}))
forward, calls = trainer.method.forward, []


def nan_in_the_second_micro_batch(batch, epoch):
    out = forward(batch, epoch)
    calls.append(1)
    if len(calls) == 2:
        out.loss = out.loss * float("nan")
    return out


trainer.method.forward = nan_in_the_second_micro_batch
batches, steps = trainer.batches(), []
for _ in range(3):
    metrics, _ = trainer.optimizer_step(batches)
    trainer.step += 1
    steps.append([metrics.get("skipped", 0.0), metrics.get("grad_norm"), trainer.scheduler.last_epoch])
weights = {k: v.detach().clone() for k, v in trainer.bundle.denoiser.named_parameters() if v.requires_grad}
torch.save(weights, out + "/weights.pt")
print("RESULT " + json.dumps(steps))
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_zero_accumulates_the_micro_batches_of_a_step_and_discards_a_skipped_one(tiny_models, tmp_path, strategy):
    """A GRPO step is 3 micro-batches (one per trained timestep); the first step's second one has a NaN loss. DeepSpeed
    counts 1 micro-batch per step in fastpref's config: each backward used to be a reduction boundary, so ZeRO-1/2 kept
    only the last micro-batch's gradient (grad norm 0.0023 instead of 0.0042), and after the skipped step ZeRO-2/3
    carried its first micro-batch into the next step (0.00494 instead of 0.00517). 1-process ZeRO == parallel none."""
    import subprocess

    pytest.importorskip("deepspeed", reason="the 'distributed' extra (deepspeed) is not installed")
    script = tmp_path / "worker.py"
    script.write_text(ACCUMULATION_WORKER)
    results = {}
    for name in ("none", strategy):
        out = tmp_path / name
        out.mkdir()
        command = [sys.executable, str(script), str(Path(__file__).parent), tiny_models["sd3"], str(out), name]
        if name != "none":
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *command[1:]]
        proc = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
        results[name] = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    plain, zero = results["none"], results[strategy]
    assert [s[0] for s in plain] == [s[0] for s in zero] == [1.0, 0.0, 0.0]
    assert [s[2] for s in plain] == [s[2] for s in zero] == [1, 2, 3]  # the skipped step advanced the schedule once
    assert [s[1] for s in zero[1:]] == pytest.approx([s[1] for s in plain[1:]], rel=1e-5)
    wa, wb = torch.load(tmp_path / "none" / "weights.pt"), torch.load(tmp_path / strategy / "weights.pt")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_online_recipes_run_end_to_end_on_tiny_models(tiny_models, tmp_path):
    """configs/sd3-grpo-*.yaml through `fastpref run` on a tiny random SD3 (tiny random CLIP for the reward)."""
    pytest.importorskip("transformers")
    from fastpref.pipeline import RunConfig, run
    from helpers.rewards import save_tiny_clip

    clip = save_tiny_clip(tmp_path / "tiny-clip")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    for name, reward in (("sd3-grpo-geneval", "clipscore"), ("sd3-grpo-pickscore", "pickscore")):
        cfg = load_config(RunConfig, CONFIGS / f"{name}.yaml", [
            f"output_dir={tmp_path / name}", "progress=false", f"train.model.path={tiny_models['sd3']}",
            "train.parallel=none", "train.speed.mixed_precision=\"no\"", "train.max_steps=2",
            "train.checkpoint_every=2",
            "train.tensorboard=false", "train.validation.every=2", "train.validation.num_inference_steps=2",
            f"train.online.prompts={prompts}", "train.online.prompts_per_rollout=2", "train.online.group_size=2",
            "train.online.num_steps=2", "train.online.resolution=32", "train.online.sample_batch_size=4",
            "train.online.grpo.train_batch_size=2", f"train.online.reward_paths.{reward}={clip}",
            "train.online.grpo.ema_every=1"])
        report = run(cfg)
        assert set(report["train"]) == {"main"} and report["train"]["main"]["steps"] == 2
        assert (tmp_path / name / "train" / "main" / "checkpoints" / "step-000002" / "ema" / "lora").is_dir()
        assert "synth" not in report["seconds"] and "cache" not in report["seconds"]
