"""Gradient accumulation: `grad_accumulation` micro-batches of `data.batch_groups` groups make one optimizer step.

4 groups per batch without accumulation and 2 groups per micro-batch with 2 accumulation steps see the same groups
in the same order (one seeded permutation per epoch, cut into batches), with the same (t, eps) per group (drawn from
(seed, epoch, group id)), so on fp32 CPU they must give the same loss trajectory and the same final weights: every
micro-batch loss is the mean over its 2 groups (no group of the cached dataset ties, so none is dropped) and is
backpropagated divided by 2, which sums to the mean over the 4 groups. What differs is float32 rounding only
(batched forwards of 6 vs 12 rows, a sum of two gradients vs one): tolerances below.

beta is 100, not the default 2500: beta multiplies differences of per-image errors of ~1, so at 2500 their float32
rounding (~1e-7) is ~2.5e-4 of beta * margin, and AdamW's first steps (~lr * sign(g)) amplify it; the two runs then
drift apart by ~1.4e-4 of the loss within 4 steps for reasons that have nothing to do with accumulation (7e-6 at
beta 100).

The step counter, the lr schedule (warmup) and the optimizer's own step count advance once per optimizer step,
not per micro-batch.

With ties the same holds: dpo drops the groups whose images all tie in psi (rankdpo means over the groups with an
ordered pair), so micro-batches keep different numbers of groups; each is weighed by its share of the step's kept
groups, not by 1 / grad_accumulation (which counted a kept group of a half-dropped micro-batch twice, and halved the
gradient of a step one of whose micro-batches kept none).
"""

from __future__ import annotations

import math

import pytest
import torch

from fastpref.train.checkpoint import CheckpointManager
from fastpref.train.loop import Trainer
from fastpref.train.metrics import read_metrics
from helpers.train import make_config

MAX_STEPS = 4  # 8 groups: 2 optimizer steps per epoch either way, so 4 steps cross an epoch boundary
WARMUP = 8  # longer than the run: the lr differs at every step, and counting micro-batches would show
BETA = 100.0  # see the module doc


def run(cached_dataset, out, batch_groups, accumulation, tied=(), **overrides):
    """A short run; the groups whose ids are in `tied` get all-equal scores psi in every batch."""
    cfg = make_config(cached_dataset, out, **{"data.batch_groups": batch_groups, "grad_accumulation": accumulation,
                                              "max_steps": MAX_STEPS, "checkpoint_every": MAX_STEPS,
                                              "lr_warmup_steps": WARMUP, **overrides})
    trainer = Trainer(cfg)
    initial = trainable_vector(trainer)
    if tied:
        batches = trainer.batches

        def tying():  # the trainer's own stream (position, epochs, resume state), psi edited on the way
            for epoch, batch in batches():
                psi = batch["psi"].clone()
                psi[torch.isin(batch["group_ids"], torch.tensor(tied))] = 0.5
                yield epoch, {**batch, "psi": psi}

        trainer.batches = tying
    forward, seen = trainer.step_fn.forward, []

    def recording(batch, epoch):
        seen.append((epoch, batch["group_ids"].tolist()))
        return forward(batch, epoch)

    trainer.step_fn.forward = recording
    optimizer_step, grads = trainer.parallel.step, []

    def recording_step():  # the accumulated gradient each optimizer step clips and applies
        grads.append(torch.cat([p.grad.flatten() for p in trainer.parallel.trainable_parameters()]).clone())
        return optimizer_step()

    trainer.parallel.step = recording_step
    summary = trainer.train()
    return trainer, summary, seen, read_metrics(out), grads, initial


def trainable_vector(trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.parallel.trainable_parameters()]).clone()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize(
    "objective, mode, reference, lr, weight_rtol",
    [
        # the default objective: cached e_ref, DCG weights over all K; measured 1.2e-5
        ("rankdpo", "lora", "auto", 1e-3, 1e-4),
        # full fine-tuning, live reference, best/worst pairs: millions of weights, many with gradients at rounding
        # level, where AdamW's ~lr * sign(g) first steps differ; measured 3.8e-3
        ("dpo", "full", "frozen_copy", 1e-4, 2e-2),
    ],
)
def test_accumulating_two_half_batches_equals_one_full_batch(cached_dataset, tmp_path, objective, mode, reference, lr,
                                                             weight_rtol):
    overrides = {"objective.name": objective, "objective.beta": BETA, "mode": mode, "reference": reference, "lr": lr}
    whole = run(cached_dataset, tmp_path / "whole", 4, 1, **overrides)
    split = run(cached_dataset, tmp_path / "split", 2, 2, **overrides)
    assert_same_training(whole, split, reference, lr, weight_rtol)


def assert_same_training(whole, split, reference, lr, weight_rtol):
    """`run` at 4 groups x 1 and at 2 groups x 2 micro-batches trained alike (see the module doc)."""
    t_whole, s_whole, seen_whole, m_whole, g_whole, w0_whole = whole
    t_split, s_split, seen_split, m_split, g_split, w0_split = split

    # the same groups, in the same order, at the same epochs; twice as many forwards
    assert len(seen_whole) == MAX_STEPS and len(seen_split) == 2 * MAX_STEPS
    assert all(len(ids) == 4 for _, ids in seen_whole) and all(len(ids) == 2 for _, ids in seen_split)
    flat = [[(e, g) for e, ids in seen for g in ids] for seen in (seen_whole, seen_split)]
    assert flat[0] == flat[1]
    assert [e for e, _ in flat[0]] == [0] * 8 + [1] * 8
    assert s_whole["reference"] == s_split["reference"] == {"auto": "cached"}.get(reference, reference)

    # the step counter, the lr schedule and the optimizer count optimizer steps, not micro-batches
    for trainer, summary, metrics, grads in ((t_whole, s_whole, m_whole, g_whole),
                                             (t_split, s_split, m_split, g_split)):
        assert trainer.step == summary["steps"] == MAX_STEPS
        assert len(grads) == MAX_STEPS
        assert [r["step"] for r in metrics] == list(range(1, MAX_STEPS + 1))
        assert all(r.get("skipped", 0) == 0 for r in metrics)
        assert CheckpointManager(trainer.out / "checkpoints").latest().name == f"step-{MAX_STEPS:06d}"
        assert trainer.scheduler.last_epoch == MAX_STEPS
        assert {float(state["step"]) for state in trainer.optimizer.state.values()} == {float(MAX_STEPS)}
        # LambdaLR(min(1, s / warmup)) after s optimizer steps (diffusers' constant_with_warmup, from 0)
        expected_lr = [lr * min(1.0, s / WARMUP) for s in range(1, MAX_STEPS + 1)]
        assert [r["lr"] for r in metrics] == pytest.approx(expected_lr, rel=1e-12)
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr[-1], rel=1e-12)

    # the same loss trajectory (each logged loss: the mean over the step's 4 groups) and gradient norms (a missing
    # division by grad_accumulation would double them; AdamW behind a norm clip would not show it in the weights)
    losses = [[r["loss"] for r in m] for m in (m_whole, m_split)]
    assert losses[1] == pytest.approx(losses[0], rel=2e-5, abs=0.0)  # measured <= 6.8e-6
    assert losses[0][0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
    assert max(abs(x - math.log(2)) for x in losses[0][1:]) > 1e-4  # then it trains: a trajectory, not a constant
    norms = [[r["grad_norm"] for r in m] for m in (m_whole, m_split)]
    assert norms[1] == pytest.approx(norms[0], rel=2e-5, abs=0.0)  # measured <= 7.2e-6
    # the gradient every optimizer step applies
    for step, (a, b) in enumerate(zip(g_whole, g_split), start=1):
        assert relative(a, b) < (2e-6 if step == 1 else 2e-5), step  # measured 2.8e-7, <= 4.6e-6

    # the same final weights, relative to how far they moved: AdamW's first steps are ~lr * sign(g), so coordinates
    # whose gradient is at float32 rounding level move by up to lr in either direction; measured as a whole they agree
    assert torch.equal(w0_whole, w0_split)  # the same start (LoRA init seeded by cfg.seed)
    update = {name: trainable_vector(t) - w0 for name, t, w0 in (("whole", t_whole, w0_whole),
                                                                   ("split", t_split, w0_split))}
    assert float(update["whole"].abs().max()) > 0.1 * lr
    assert relative(update["whole"], update["split"]) < weight_rtol


def epoch_order(cached_dataset, batch_groups: int) -> list[list[int]]:
    """The group ids of epoch 0's batches, as the trainer's stream (seed 0, one process) yields them."""
    from fastpref.data.dataset import CachedDataset

    stream = CachedDataset(cached_dataset["root"]).stream(batch_groups, seed=0, rank=0, world_size=1)
    return [batch["group_ids"].tolist() for batch in stream]


@pytest.mark.parametrize("objective", ["dpo", "rankdpo"])
def test_accumulation_equals_one_full_batch_when_groups_are_dropped(cached_dataset, tmp_path, objective):
    """3 of the 8 groups tie in psi: dpo drops them (rankdpo keeps them, without an ordered pair, out of its mean).
    Epoch 0 of the split run: step 1's first micro-batch keeps no group (the old 1 / grad_accumulation halved the
    step's gradient), step 2's first keeps 1 and its second 2 (the lone group weighed 1/2 instead of 1/3)."""
    order = epoch_order(cached_dataset, 2)
    assert len(order) == 4 and all(len(ids) == 2 for ids in order)
    tied = (*order[0], order[2][0])
    lr, weight_rtol = 1e-3, 1e-4  # as the LoRA case above
    overrides = {"objective.name": objective, "objective.beta": BETA, "mode": "lora", "reference": "auto", "lr": lr}
    whole = run(cached_dataset, tmp_path / "whole", 4, 1, tied=tied, **overrides)
    split = run(cached_dataset, tmp_path / "split", 2, 2, tied=tied, **overrides)

    # the ties are in the batches the step saw: the split run's first micro-batch is all tied
    seen_split = split[2]
    assert seen_split[0] == (0, order[0]) and seen_split[2] == (0, order[2])
    assert_same_training(whole, split, "auto", lr, weight_rtol)


def test_cached_reference_epochs_count_micro_batches(cached_dataset, tmp_path):
    """4 micro-batches of 2 groups per epoch; 5 optimizer steps x 2 micro-batches = 10 batches = 3 epochs of e_ref,
    one more than the cache holds, so the trainer runs the reference live (it would not at 1 micro-batch a step)."""
    common = {"data.batch_groups": 2, "max_steps": 5}
    assert Trainer(make_config(cached_dataset, tmp_path / "a", **common)).reference_mode == "cached"
    with pytest.warns(UserWarning, match="reference errors for 2 epochs and training needs 3"):
        trainer = Trainer(make_config(cached_dataset, tmp_path / "b", grad_accumulation=2, **common))
    assert trainer.reference_mode == "adapters_off"
