"""fastpref.ops: fused preference losses for diffusion models, usable from any training loop with
only torch (+ triton on GPU).

    from fastpref.ops import diffusion_dpo_loss
    out = diffusion_dpo_loss(model_pred, target, ref_pred, beta=2500.0)   # rows: w0, l0, w1, l1, ...
    out.loss.backward(); log(out.metrics)   # implicit_accuracy, margin, e_pol, e_ref

Objectives: diffusion_dpo_loss, rank_dpo_loss, cpo_loss, sft_loss, mapo_loss, kto_loss
(fastpref/ops/losses.py); the online methods' spo_loss and grpo_loss (fastpref/ops/online.py).
Primitives: sample_errors (fused per-sample errors of policy and reference predictions),
step_errors (its variant for Gaussian steps: errors to the sample and to the reference mean) and
ranked_pair_loss (per-group pair/rank loss), registered as torch.library custom ops under torch.ops.fastpref so torch.compile(fullgraph=True) traces through them.
Every function takes backend="auto" | "triton" | "native" | "reference"; the semantics are those
of fastpref/ops/reference.py.
"""

from fastpref.ops.library import available_backends, ranked_pair_loss, sample_errors, step_errors
from fastpref.ops.losses import (
    PreferenceLossOutput,
    cpo_loss,
    diffusion_dpo_loss,
    kto_loss,
    mapo_loss,
    rank_dpo_loss,
    sft_loss,
)
from fastpref.ops.online import PolicyLossOutput, grpo_loss, spo_loss

__all__ = [
    "PolicyLossOutput",
    "PreferenceLossOutput",
    "available_backends",
    "cpo_loss",
    "diffusion_dpo_loss",
    "grpo_loss",
    "kto_loss",
    "mapo_loss",
    "rank_dpo_loss",
    "ranked_pair_loss",
    "sample_errors",
    "sft_loss",
    "spo_loss",
    "step_errors",
]
