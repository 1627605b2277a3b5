"""Every cached epoch's reference errors reach the step of that epoch.

With a LoRA policy at its initialisation (policy == reference) and e_ref served from the cache, the errors of the
policy equal the cached reference errors at the same (t, eps), so every margin is 0 and RankDPO's loss is exactly
ln 2 — in every epoch the cache covers. A stream that serves another epoch's e_ref, or a step that draws another
epoch's (t, eps), breaks this from epoch 1 on (measured: loss 98.9 at epoch 1 when epoch 0's e_ref is served).
"""

import itertools
import math

import numpy as np
import pytest
import torch

from fastpref.data.shards import StageDir
from fastpref.train.loop import Trainer

try:  # the shared test helpers (tests/helpers/), else their earlier home
    from helpers.train import make_config
except ImportError:
    from test_loop import make_config


def cached_e_ref_by_group(root) -> dict[int, np.ndarray]:
    """{group id: (epochs, K) e_ref} read straight from the cache's shards, not through the stream."""
    manifest = StageDir(root, "cache").open("size")
    rows = {}
    for index in range(len(manifest.shards)):
        ids = manifest.load(index, "group_ids.npy")
        e_ref = manifest.load(index, "e_ref.npy")
        rows.update({int(g): e_ref[i] for i, g in enumerate(ids)})
    return rows


def test_every_cached_epoch_serves_its_own_reference_errors(cached_dataset, tmp_path):
    trainer = Trainer(make_config(cached_dataset, tmp_path, reference="cached", mode="lora"))
    epochs = trainer.dataset.reference_epochs
    assert epochs >= 2, "the fixture must cache e_ref for more than one epoch for this test to mean anything"
    cached = cached_e_ref_by_group(cached_dataset["root"])
    per_epoch = len(trainer.dataset) // trainer.cfg.data.batch_groups
    first_batch_of = {}
    for epoch, batch in itertools.islice(trainer.batches(), epochs * per_epoch):
        expected = np.stack([cached[int(g)][epoch] for g in batch["group_ids"]])
        np.testing.assert_array_equal(batch["e_ref"].numpy(), expected, err_msg=f"epoch {epoch}")
        first_batch_of.setdefault(epoch, batch)
    assert sorted(first_batch_of) == list(range(epochs))
    with torch.no_grad():
        for epoch, batch in first_batch_of.items():
            out = trainer.step_fn.forward(batch, epoch)
            # beta 2500 turns the float noise of two forwards (cache vs step, ~1e-7 relative) into ~1e-3 of margin
            assert abs(out.loss.item() - math.log(2)) < 1e-2, (epoch, out.loss.item())
            torch.testing.assert_close(out.metrics["e_pol"], out.metrics["e_ref"], rtol=1e-3, atol=0)
