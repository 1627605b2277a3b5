"""Pair/rank loss of each prompt group: one program per group over its K <= 64 scalars.

Returns the kernel contract shared with the native C++ op and the closed-form reference
(reference.ranked_pair_loss_with_grad_reference): loss per group (B,), grad_s = d(sum_g loss_g)/ds
(N,) and the statistics (B, 4) in reference.STAT_COLUMNS order. The K x K pair matrix lives in
registers; ragged groups are read through `offsets`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_GROUP_SIZE = 64


@triton.jit
def _ranked_pair_loss_kernel(
    s_ptr, scores_ptr, offsets_ptr, loss_ptr, grad_s_ptr, stats_ptr,
    beta,
    LOSS_TYPE: tl.constexpr, WEIGHTING: tl.constexpr, BLOCK_K: tl.constexpr,
):
    group = tl.program_id(0)
    start = tl.load(offsets_ptr + group)
    size = tl.load(offsets_ptr + group + 1) - start
    slot = tl.arange(0, BLOCK_K)
    member = slot < size
    s = tl.load(s_ptr + start + slot, mask=member, other=0.0)
    psi = tl.load(scores_ptr + start + slot, mask=member, other=0.0).to(s.dtype)
    s_i = s[:, None]
    s_j = s[None, :]
    ordered = member[:, None] & member[None, :] & (psi[:, None] > psi[None, :])
    margin = s_j - s_i
    x = beta * margin
    zero = tl.zeros_like(margin)

    if WEIGHTING == 1:
        # tau_i: 1-based rank by ascending s, ties by row index; no gradient flows through it.
        before = ((s_j < s_i) | ((s_j == s_i) & (slot[None, :] < slot[:, None]))) & member[None, :]
        tau = 1.0 + tl.sum(before.to(s.dtype), axis=1)
        discount = 1.0 / tl.log2(1.0 + tau)
        gain = tl.exp2(psi) - 1.0
        pair_weight = tl.abs(gain[:, None] - gain[None, :]) * tl.abs(discount[:, None] - discount[None, :])
    else:
        pair_weight = zero + 1.0
    pair_weight = tl.where(ordered, pair_weight, zero)

    if LOSS_TYPE == 0:
        # softplus(-x) and its slope -beta*sigmoid(-x), both without overflow for |x| ~ 1e4.
        decay = tl.exp(-tl.abs(x))
        pair = tl.maximum(-x, zero) + tl.log(1.0 + decay)
        slope = -beta * tl.where(x >= 0, decay / (1.0 + decay), 1.0 / (1.0 + decay))
    elif LOSS_TYPE == 1:
        pair = tl.maximum(1.0 - x, zero)
        slope = tl.where(1.0 - x > 0, zero - beta, zero)
    else:
        centered = margin - 0.5 / beta
        pair = centered * centered
        slope = 2.0 * centered

    weight_sum = tl.sum(tl.sum(pair_weight, axis=1), axis=0)
    inv_weight_sum = tl.where(weight_sum > 0, 1.0 / tl.where(weight_sum > 0, weight_sum, 1.0), 0.0)
    group_loss = tl.sum(tl.sum(tl.where(ordered, pair_weight * pair, zero), axis=1), axis=0) * inv_weight_sum
    weighted_slope = tl.where(ordered, pair_weight * slope, zero) * inv_weight_sum
    # m_ij = s_j - s_i: s_k gains +slope from column k and -slope from row k.
    grad = tl.sum(weighted_slope, axis=0) - tl.sum(weighted_slope, axis=1)

    correct = tl.where(x > 0, zero + 1.0, tl.where(x == 0, zero + 0.5, zero))
    num_pairs = tl.sum(tl.sum(tl.where(ordered, zero + 1.0, zero), axis=1), axis=0)
    num_correct = tl.sum(tl.sum(tl.where(ordered, correct, zero), axis=1), axis=0)
    margin_sum = tl.sum(tl.sum(tl.where(ordered, x, zero), axis=1), axis=0)

    if size > BLOCK_K:
        # Only reachable when the group sizes were not checked on the host (offsets on the GPU):
        # poison the result instead of silently dropping rows.
        group_loss = group_loss + float("nan")
    tl.store(loss_ptr + group, group_loss)
    tl.store(grad_s_ptr + start + slot, grad, mask=member)
    tl.store(stats_ptr + group * 4 + 0, weight_sum)
    tl.store(stats_ptr + group * 4 + 1, num_pairs)
    tl.store(stats_ptr + group * 4 + 2, num_correct)
    tl.store(stats_ptr + group * 4 + 3, margin_sum)


def ranked_pair_loss_forward(s, scores, offsets, beta: float, loss_type: int, weighting: int,
                             max_group_size: int):
    """(loss per group, grad_s, stats); max_group_size bounds K (<= 64) and sets the block."""
    if not 1 <= max_group_size <= MAX_GROUP_SIZE:
        raise ValueError(
            f"max_group_size={max_group_size}: the Triton group kernel handles groups of 1..{MAX_GROUP_SIZE}"
        )
    acc_dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
    s = s.to(acc_dtype)
    num_groups = offsets.shape[0] - 1
    loss = torch.empty(num_groups, dtype=acc_dtype, device=s.device)
    grad_s = torch.zeros_like(s)
    stats = torch.empty((num_groups, 4), dtype=acc_dtype, device=s.device)
    if num_groups > 0:
        _ranked_pair_loss_kernel[(num_groups,)](
            s, scores, offsets, loss, grad_s, stats, float(beta),
            LOSS_TYPE=loss_type, WEIGHTING=weighting,
            BLOCK_K=max(2, triton.next_power_of_2(max_group_size)),
            # K=64 at 4 warps spills (bench/results/triton-aot.md): 8 warps hold its 64x64 pair matrices.
            num_warps=8 if max_group_size > 32 else 4 if max_group_size > 16 else 1,
        )
    return loss, grad_s, stats
