"""Checkpoint durability: a crash while a checkpoint is being written leaves the previous one intact and usable.

The trainer writes checkpoint N into <run>/checkpoints/.step-N.tmp and renames it to step-N only when complete
(fastpref/train/checkpoint.py, fastpref/utils/atomic.py). The crash is simulated by making one writer raise at
step 4 after part of its output is on disk; Trainer.save_checkpoint cleans nothing up, so the files left behind are
those a SIGKILL at the same point would leave (the subprocess test below checks it with a real SIGKILL).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastpref.train.checkpoint as checkpoint_module
import fastpref.train.loop as loop
from fastpref.train.checkpoint import CheckpointManager
from fastpref.train.loop import TrainConfig, Trainer
from fastpref.train.metrics import read_metrics
from helpers.train import make_config as train_config


class SimulatedCrash(RuntimeError):
    pass


def make_config(ds, out, mode, **overrides):
    return train_config(ds, out, mode=mode, **overrides)


@pytest.fixture(scope="module")
def straight_runs(cached_dataset, tmp_path_factory):
    """mode -> the output_dir of an uninterrupted 4-step run."""
    runs = {}

    def get(mode: str) -> Path:
        if mode not in runs:
            out = tmp_path_factory.mktemp(f"straight-{mode}")
            Trainer(make_config(cached_dataset, out, mode)).train()
            runs[mode] = out
        return runs[mode]

    return get


def untimed(records):
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]


def install_crash(monkeypatch, trainer, where: str, mode: str) -> None:
    """Make the step-4 checkpoint fail at `where`, after part of it is written."""

    def at_step_4() -> bool:
        return trainer.step == 4

    if where == "trainable":  # half of trainable.safetensors on disk
        real = loop.save_trainable

        def truncated(module, path):
            real(module, path)
            if at_step_4():
                data = Path(path).read_bytes()
                Path(path).write_bytes(data[: len(data) // 2])
                raise SimulatedCrash("while writing trainable.safetensors")

        monkeypatch.setattr(loop, "save_trainable", truncated)
    elif where == "export" and mode == "lora":  # the diffusers LoRA file written, then the crash
        real_lora = loop.save_lora

        def lora_then_crash(bundle, out_dir):
            real_lora(bundle, out_dir)
            if at_step_4():
                raise SimulatedCrash("after lora/")

        monkeypatch.setattr(loop, "save_lora", lora_then_crash)
    elif where == "export":  # full: half of the denoiser's save_pretrained folder
        denoiser = trainer.bundle.denoiser
        real_save = denoiser.save_pretrained

        def denoiser_then_crash(path, *args, **kwargs):
            real_save(path, *args, **kwargs)
            if at_step_4():
                for weights in Path(path).glob("*.safetensors"):
                    weights.write_bytes(weights.read_bytes()[:100])
                raise SimulatedCrash("while writing denoiser/")

        monkeypatch.setattr(denoiser, "save_pretrained", denoiser_then_crash)
    elif where == "state":  # trainer_state.pt half written
        real_state = trainer.parallel.save_state

        def state_then_crash(directory, extra):
            real_state(directory, extra)
            if at_step_4():
                state = Path(directory) / "trainer_state.pt"
                state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
                raise SimulatedCrash("while writing trainer_state.pt")

        monkeypatch.setattr(trainer.parallel, "save_state", state_then_crash)
    elif where == "commit":  # everything written, meta.json too, the crash before the rename
        real_commit = checkpoint_module.commit_dir

        def commit_then_crash(tmp, path):
            if at_step_4():
                raise SimulatedCrash("before the rename")
            real_commit(tmp, path)

        monkeypatch.setattr(checkpoint_module, "commit_dir", commit_then_crash)
    else:
        raise ValueError(where)


def assert_complete_checkpoint(path: Path, mode: str) -> None:
    assert (path / "meta.json").is_file() and CheckpointManager.read_meta(path)["step"] == int(path.name[5:])
    assert (path / "trainer_state.pt").is_file()
    assert (path / "trainable.safetensors").is_file()
    assert (path / ("lora/pytorch_lora_weights.safetensors" if mode == "lora" else "denoiser/config.json")).is_file()


@pytest.mark.parametrize("where", ["trainable", "export", "state", "commit"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_crash_during_a_save_keeps_the_previous_checkpoint_and_resume_is_exact(
        cached_dataset, straight_runs, tmp_path, monkeypatch, mode, where):
    straight = straight_runs(mode)
    cfg = make_config(cached_dataset, tmp_path, mode)
    trainer = Trainer(cfg)
    install_crash(monkeypatch, trainer, where, mode)
    with pytest.raises(SimulatedCrash):
        trainer.train()
    monkeypatch.undo()

    manager = CheckpointManager(tmp_path / "checkpoints")
    leftover = tmp_path / "checkpoints/.step-000004.tmp"
    assert leftover.is_dir()  # the half-written checkpoint is there ...
    assert manager.steps() == [2]  # ... and ignored
    assert manager.latest() == tmp_path / "checkpoints/step-000002"
    assert_complete_checkpoint(manager.latest(), mode)
    # the previous checkpoint is the straight run's step 2, bit for bit
    saved = load_file(str(manager.latest() / "trainable.safetensors"))
    expected = load_file(str(straight / "checkpoints/step-000002/trainable.safetensors"))
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)

    summary = Trainer(cfg).train(resume=True)
    assert summary["resumed_from"] == 2 and summary["steps"] == 4
    assert not leftover.exists()  # the resumed run's step-4 save cleared it
    assert manager.steps() == [2, 4]
    assert_complete_checkpoint(manager.latest(), mode)
    final = load_file(str(manager.latest() / "trainable.safetensors"))
    expected = load_file(str(straight / "checkpoints/step-000004/trainable.safetensors"))
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
    assert untimed(read_metrics(tmp_path)) == untimed(read_metrics(straight))


def test_checkpoint_manager_save_removes_its_temp_dir_when_the_writer_fails(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(1, lambda d: (d / "weights.bin").write_bytes(b"one"))

    def half_then_crash(directory):
        (directory / "weights.bin").write_bytes(b"tw")
        raise SimulatedCrash("midway")

    with pytest.raises(SimulatedCrash):
        manager.save(2, half_then_crash)
    assert manager.steps() == [1]
    assert (manager.latest() / "weights.bin").read_bytes() == b"one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]  # no temp dir left


def test_leftover_temp_dirs_never_pass_for_checkpoints(tmp_path):
    """Whatever a crash leaves (a temp dir of a later step, of the same step, commit_dir's .old of a step that is in
    place) is not listed; a .old with no step in its place is a complete checkpoint moved aside (see below)."""
    manager = CheckpointManager(tmp_path)
    manager.save(2, lambda d: (d / "x").write_text("2"))
    for name in (".step-000004.tmp", ".step-000002.tmp", ".step-000002.old", "step-000008.tmp", "step-8"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text("partial")
    assert manager.steps() == [2]
    assert manager.latest() == tmp_path / "step-000002"
    # a save of the same step starts from an empty temp dir (a leftover's files are not carried over)
    manager.save(4, lambda d: (d / "y").write_text("4"))
    assert sorted(p.name for p in manager.latest().iterdir()) == ["meta.json", "y"]


def test_sigkill_in_the_middle_of_a_save_keeps_the_previous_checkpoint(cached_dataset, tmp_path):
    """A real SIGKILL (no Python cleanup at all) after the LoRA file of step 4 is written, then `fastpref train
    --resume` in a fresh process."""
    import yaml

    from fastpref.config import to_dict

    cfg = make_config(cached_dataset, tmp_path / "run", "lora")
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(to_dict(cfg)))
    script = textwrap.dedent(f"""
        import os, signal
        import fastpref.train.loop as loop
        from fastpref.config import load_config
        cfg = load_config(loop.TrainConfig, {str(config_path)!r}, [])
        trainer = loop.Trainer(cfg)
        real = loop.save_lora
        def save_lora_then_die(bundle, out_dir):
            real(bundle, out_dir)
            if trainer.step == 4:
                os.kill(os.getpid(), signal.SIGKILL)
        loop.save_lora = save_lora_then_die
        trainer.train()
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    manager = CheckpointManager(tmp_path / "run/checkpoints")
    assert manager.steps() == [2]
    assert (tmp_path / "run/checkpoints/.step-000004.tmp/lora/pytorch_lora_weights.safetensors").is_file()
    assert_complete_checkpoint(manager.latest(), "lora")
    proc = subprocess.run([sys.executable, "-m", "fastpref.cli", "train", "--config", str(config_path), "--resume"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed_from': 2" in proc.stdout
    assert manager.steps() == [2, 4]
    assert not (tmp_path / "run/checkpoints/.step-000004.tmp").exists()


# ------------------------------------------------------------------------------------------- leftovers


def test_stale_temp_dirs_of_other_steps_are_cleaned(tmp_path):
    manager = CheckpointManager(tmp_path)
    (tmp_path / ".step-000006.tmp").mkdir()  # a run killed while saving step 6, resumed with checkpoint_every=4
    manager.save(4, lambda d: (d / "x").write_text("4"))
    manager.save(8, lambda d: (d / "x").write_text("8"))
    assert not (tmp_path / ".step-000006.tmp").exists()


def test_crash_while_replacing_an_existing_step_keeps_it_visible(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    manager.save(2, lambda d: (d / "x").write_text("old 2"))
    manager.save(4, lambda d: (d / "x").write_text("old 4"))
    real_replace = os.replace
    calls = {"n": 0}

    def crash_on_second_rename(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise SimulatedCrash("between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second_rename)
    with pytest.raises(SimulatedCrash):
        manager.save(4, lambda d: (d / "x").write_text("new 4"))
    monkeypatch.undo()
    assert manager.latest() == tmp_path / "step-000004"


def test_a_fresh_run_over_an_earlier_runs_checkpoints_is_refused_before_the_model_loads(cached_dataset, tmp_path,
                                                                                      monkeypatch):
    """keep_last prunes by step number: a fresh run among an older run's later checkpoints would lose its own at
    once, and a later --resume would continue the older run. Such a start is refused; --resume continues."""
    import fastpref.models
    from fastpref.config import ConfigError
    from fastpref.train.loop import train

    cfg = make_config(cached_dataset, tmp_path / "run", "lora", max_steps=2)
    train(cfg)
    before = (tmp_path / "run/checkpoints/step-000002/trainable.safetensors").read_bytes()

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load before the refusal")

    with monkeypatch.context() as patch:
        patch.setattr(fastpref.models, "load", no_model)
        with pytest.raises(ConfigError, match=r"output_dir: .* already holds checkpoints of a run \(latest "
                                              r"step-000002\); pass --resume"):
            train(cfg)
    assert (tmp_path / "run/checkpoints/step-000002/trainable.safetensors").read_bytes() == before
    assert train(cfg, resume=True)["resumed_from"] == 2
