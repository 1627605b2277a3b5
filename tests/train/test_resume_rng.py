"""Resume restores the RNG: with LoRA dropout every step draws from the global RNG, so a resumed run only matches
an uninterrupted one if the checkpoint's RNG state is loaded. In-process, with the RNG scrambled between the two
halves as a fresh process would have it (the SIGKILL tests do the same across real processes)."""

import pytest
import torch

from fastpref.train.loop import Trainer
from fastpref.train.metrics import read_metrics

try:  # the shared test helpers (tests/helpers/), else their earlier home
    from helpers.train import make_config
except ImportError:
    from test_loop import make_config


@pytest.mark.slow  # three short runs: ~50 s on the shared 2-core CPU
def test_resume_with_lora_dropout_continues_the_random_stream(cached_dataset, tmp_path):
    overrides = {"lora.dropout": 0.5, "checkpoint_every": 2}
    Trainer(make_config(cached_dataset, tmp_path / "straight", max_steps=4, **overrides)).train()

    Trainer(make_config(cached_dataset, tmp_path / "resumed", max_steps=2, **overrides)).train()
    torch.manual_seed(12345)  # whatever the new process's RNG holds, the checkpoint's state must replace it
    Trainer(make_config(cached_dataset, tmp_path / "resumed", max_steps=4, **overrides)).train(resume=True)

    straight = [r["loss"] for r in read_metrics(tmp_path / "straight")]
    resumed = [r["loss"] for r in read_metrics(tmp_path / "resumed")]
    assert len(straight) == len(resumed) == 4
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(straight), rtol=1e-6, atol=0)
