"""Shared by the bench tests that check an instrumented online step against the plain one (tests/bench/)."""

from __future__ import annotations

import torch


def weights_after_one_step(trainer, arch, instrumented: bool) -> list[torch.Tensor]:
    """The trainable weights after one step, taken plain (the trainer's optimizer_step on its batches) or
    instrumented (bench/step_online.OnlineStep: timed, FLOP-counted); refuses a step that changed nothing, which
    would make any comparison vacuous. Needs bench/ on sys.path."""
    from common import PhaseTimer
    from step_online import OnlineStep

    trainable = [p for p in trainer.bundle.denoiser.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    if instrumented:
        OnlineStep(trainer, arch)(PhaseTimer(torch.device("cpu")), count=True)
    else:
        trainer.optimizer_step(trainer.batches())
    assert any(not torch.equal(a, p) for a, p in zip(before, trainable)), \
        "the step left the weights unchanged: the comparison would prove nothing"
    return [p.detach().clone() for p in trainable]
