"""Loading a checkpoint or cache someone else made must not run code: fastpref's own state files hold tensors and
plain data only and are read with torch.load(weights_only=True); a planted pickle payload is refused, never run."""

import pickle
from pathlib import Path

import pytest
import torch

from fastpref.train.checkpoint import CheckpointError, load_state, rng_state, set_rng_state
from fastpref.train.loop import train

from helpers.train import make_config


class Payload:
    """Unpickling this writes `marker`: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "the payload ran"))


def plant(path: Path, marker: Path, inside: dict | None = None) -> None:
    """A file torch.load would accept, holding the payload beside ordinary entries."""
    torch.save({**(inside or {}), "payload": Payload(marker)}, path)


def test_rng_state_round_trips_through_weights_only():
    import random

    import numpy as np

    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    state = rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]


def test_a_planted_trainer_state_is_refused_and_never_runs(cached_dataset, tmp_path):
    cfg = make_config(cached_dataset, tmp_path / "run", max_steps=2, checkpoint_every=2)
    train(cfg)
    state_file = tmp_path / "run/checkpoints/step-000002/trainer_state.pt"
    honest = torch.load(state_file, weights_only=True)  # what fastpref writes loads with weights_only
    assert {"optimizer", "scheduler", "rng", "stream", "step"} <= set(honest)
    marker = tmp_path / "pwned"
    plant(state_file, marker, honest)
    with pytest.raises(CheckpointError, match=r"trainer_state.pt: refused to load"):
        train(make_config(cached_dataset, tmp_path / "run", max_steps=3, checkpoint_every=2), resume=True)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_state(state_file)
    assert not marker.exists()
    # the control: the same file unpickled as before (weights_only=False) runs the payload
    torch.load(state_file, weights_only=False)
    assert marker.read_text() == "the payload ran"


def test_toy_pretraining_checkpoints_and_caches_refuse_a_planted_payload(tmp_path):
    import numpy as np
    from diffusers.training_utils import EMAModel

    from fastpref.toy import pretrain

    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    ema = EMAModel(list(module.parameters()), decay=0.9)
    generator = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(5)
    args = pretrain.PretrainArgs(family="toy-sd", out=tmp_path / "out", work_dir=tmp_path / "work", resume=True)
    pretrain._save_checkpoint(args, {"m": module}, optimizer, rng, 7, 9, ema, generator)
    fresh = np.random.default_rng(0)
    state = pretrain._maybe_resume(args, {"m": torch.nn.Linear(3, 2)}, torch.optim.AdamW(module.parameters()),
                                   fresh, EMAModel(list(module.parameters()), decay=0.9), torch.Generator())
    assert state["step"] == 7 and fresh.bit_generator.state == rng.bit_generator.state

    marker = tmp_path / "pwned"
    plant(args.work_dir / "checkpoint.pt", marker, {"step": 7})
    with pytest.raises(CheckpointError, match="refused to load"):
        pretrain._maybe_resume(args, {"m": module}, optimizer, rng)
    cache = tmp_path / "cache"
    cache.mkdir()
    plant(cache / "latents-random-4-0.pt", marker)
    with pytest.raises(CheckpointError, match="refused to load"):
        pretrain.latent_pool(None, tmp_path / "no-vae", 0, 4, cache)
    assert not marker.exists()
