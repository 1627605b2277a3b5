"""Fused per-sample squared errors: one pass over pred, target (and ref_pred), fp32 accumulation.

Grid (sample, chunk of D = C*H*W): each program reduces one chunk into a partial-sum buffer
(N, chunks); a second tiny kernel sums the chunks, divides by D and applies the weight. The
chunking gives N * chunks programs, enough to fill the GPU at small batch (e.g. N=64 x 4x128x128).
The backward re-reads pred/target and writes grad_pred once; nothing of size N*D is kept.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements per loop iteration of one program. 2048 bf16 with 8 warps = 8 elements (16 bytes) per
# thread per load: full-width vectorized loads on NVIDIA GPUs.
MAX_BLOCK = 2048
# Programs wanted per SM so that the memory system stays busy (several CTAs resident per SM).
PROGRAMS_PER_SM = 4


def _accumulation_tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def launch_plan(num_samples: int, sample_size: int, device: torch.device, block: int | None = None,
                chunk: int | None = None) -> tuple[int, int, int, int]:
    """(block, chunk, num_chunks, num_warps) for N samples of D elements; block/chunk override for tests."""
    if block is None:
        block = min(MAX_BLOCK, max(16, triton.next_power_of_2(sample_size)))
    if chunk is None:
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            wanted_programs = PROGRAMS_PER_SM * sms
        else:
            # The interpreter pays per program instance: one program per sample.
            wanted_programs = 1
        chunks_per_sample = max(1, triton.cdiv(wanted_programs, max(num_samples, 1)))
        chunk = triton.cdiv(triton.cdiv(sample_size, chunks_per_sample), block) * block
    if chunk % block != 0:
        raise ValueError(f"chunk={chunk} must be a multiple of block={block}")
    num_chunks = max(1, triton.cdiv(sample_size, chunk))
    num_warps = 8 if block >= 2048 else 4
    return block, chunk, num_chunks, num_warps


@triton.jit
def _partial_sums_kernel(
    pred_ptr, target_ptr, ref_ptr, partial_pol_ptr, partial_ref_ptr,
    sample_size, num_chunks,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, HAS_REF: tl.constexpr, ACC: tl.constexpr,
    REF_TO_PRED: tl.constexpr = False,
):
    # REF_TO_PRED: the second sum is of (pred - ref)^2 instead of (ref - target)^2 (step_errors).
    sample = tl.program_id(0)
    chunk = tl.program_id(1)
    row = sample.to(tl.int64) * sample_size
    start = chunk * CHUNK
    sum_pol = tl.zeros([BLOCK], dtype=ACC)
    sum_ref = tl.zeros([BLOCK], dtype=ACC)
    for offset in tl.range(0, CHUNK, BLOCK):
        cols = start + offset + tl.arange(0, BLOCK)
        inside = cols < sample_size
        target = tl.load(target_ptr + row + cols, mask=inside, other=0.0).to(ACC)
        pred = tl.load(pred_ptr + row + cols, mask=inside, other=0.0).to(ACC)
        diff = pred - target
        sum_pol += diff * diff
        if HAS_REF:
            if REF_TO_PRED:
                diff_ref = pred - tl.load(ref_ptr + row + cols, mask=inside, other=0.0).to(ACC)
            else:
                diff_ref = tl.load(ref_ptr + row + cols, mask=inside, other=0.0).to(ACC) - target
            sum_ref += diff_ref * diff_ref
    slot = sample * num_chunks + chunk
    tl.store(partial_pol_ptr + slot, tl.sum(sum_pol, axis=0))
    if HAS_REF:
        tl.store(partial_ref_ptr + slot, tl.sum(sum_ref, axis=0))


@triton.jit
def _finalize_kernel(
    partial_pol_ptr, partial_ref_ptr, weight_ptr, e_pol_ptr, e_ref_ptr,
    num_samples, num_chunks, sample_size,
    ROWS: tl.constexpr, BLOCK_CHUNKS: tl.constexpr, HAS_REF: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    ACC: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    chunks = tl.arange(0, BLOCK_CHUNKS)
    row_ok = rows < num_samples
    inside = row_ok[:, None] & (chunks[None, :] < num_chunks)
    slots = rows[:, None] * num_chunks + chunks[None, :]
    scale = tl.full([ROWS], 1.0, ACC) / sample_size
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    e_pol = tl.sum(tl.load(partial_pol_ptr + slots, mask=inside, other=0.0), axis=1) * scale
    tl.store(e_pol_ptr + rows, e_pol, mask=row_ok)
    if HAS_REF:
        e_ref = tl.sum(tl.load(partial_ref_ptr + slots, mask=inside, other=0.0), axis=1) * scale
        tl.store(e_ref_ptr + rows, e_ref, mask=row_ok)


@triton.jit
def _backward_kernel(
    grad_e_ptr, pred_ptr, target_ptr, weight_ptr, grad_pred_ptr,
    sample_size,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr,
    HAS_DIV: tl.constexpr = False, grad_div_ptr=None, ref_ptr=None,
):
    # HAS_DIV (step_errors): + grad_div_i * 2/D * (pred - ref), the gradient of e_div.
    sample = tl.program_id(0)
    chunk = tl.program_id(1)
    row = sample.to(tl.int64) * sample_size
    scale = tl.load(grad_e_ptr + sample).to(ACC) * 2.0 / sample_size
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + sample).to(ACC)
    if HAS_DIV:
        scale_div = tl.load(grad_div_ptr + sample).to(ACC) * 2.0 / sample_size
    start = chunk * CHUNK
    for offset in tl.range(0, CHUNK, BLOCK):
        cols = start + offset + tl.arange(0, BLOCK)
        inside = cols < sample_size
        target = tl.load(target_ptr + row + cols, mask=inside, other=0.0).to(ACC)
        pred = tl.load(pred_ptr + row + cols, mask=inside, other=0.0).to(ACC)
        grad = scale * (pred - target)
        if HAS_DIV:
            grad += scale_div * (pred - tl.load(ref_ptr + row + cols, mask=inside, other=0.0).to(ACC))
        tl.store(grad_pred_ptr + row + cols, grad.to(grad_pred_ptr.dtype.element_ty), mask=inside)


def sample_errors_forward(pred, target, ref_pred=None, weight=None, *, block=None, chunk=None):
    """(e_pol, e_ref) like reference.sample_errors_reference; e_ref is empty when ref_pred is None."""
    return _errors_forward(pred, target, ref_pred, weight, False, block, chunk)


def _errors_forward(pred, target, ref_pred, weight, ref_to_pred, block, chunk):
    num_samples = pred.shape[0]
    sample_size = pred.numel() // max(num_samples, 1)
    acc_dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    e_pol = torch.empty(num_samples, dtype=acc_dtype, device=pred.device)
    e_ref = torch.empty(num_samples if ref_pred is not None else 0, dtype=acc_dtype, device=pred.device)
    if num_samples == 0:
        return e_pol, e_ref
    block, chunk, num_chunks, num_warps = launch_plan(num_samples, sample_size, pred.device, block, chunk)
    acc = _accumulation_tl_dtype(pred.dtype)
    partial_pol = torch.empty((num_samples, num_chunks), dtype=acc_dtype, device=pred.device)
    partial_ref = torch.empty_like(partial_pol) if ref_pred is not None else partial_pol
    _partial_sums_kernel[(num_samples, num_chunks)](
        pred, target, ref_pred if ref_pred is not None else pred, partial_pol, partial_ref,
        sample_size, num_chunks,
        CHUNK=chunk, BLOCK=block, HAS_REF=ref_pred is not None, ACC=acc, REF_TO_PRED=ref_to_pred,
        num_warps=num_warps,
    )
    rows = min(32, triton.next_power_of_2(num_samples))
    _finalize_kernel[(triton.cdiv(num_samples, rows),)](
        partial_pol, partial_ref, weight if weight is not None else partial_pol, e_pol,
        e_ref if ref_pred is not None else e_pol,
        num_samples, num_chunks, sample_size,
        ROWS=rows, BLOCK_CHUNKS=max(2, triton.next_power_of_2(num_chunks)),
        HAS_REF=ref_pred is not None, HAS_WEIGHT=weight is not None, ACC=acc,
    )
    return e_pol, e_ref


def sample_errors_backward(grad_e, pred, target, weight=None, *, block=None, chunk=None):
    """grad_pred = grad_e_i * w_i * 2/D * (pred_i - target_i), in pred's dtype, one pass."""
    grad_pred = torch.empty_like(pred)
    num_samples = pred.shape[0]
    if num_samples == 0:
        return grad_pred
    sample_size = pred.numel() // num_samples
    block, chunk, num_chunks, num_warps = launch_plan(num_samples, sample_size, pred.device, block, chunk)
    _backward_kernel[(num_samples, num_chunks)](
        grad_e, pred, target, weight if weight is not None else grad_e, grad_pred,
        sample_size,
        CHUNK=chunk, BLOCK=block, HAS_WEIGHT=weight is not None,
        ACC=_accumulation_tl_dtype(pred.dtype), num_warps=num_warps,
    )
    return grad_pred


def step_errors_forward(pred, target, ref_pred, *, block=None, chunk=None):
    """(e_pol, e_div) like reference.step_errors_reference: the sample_errors pass with its second sum taken
    against pred instead of target."""
    return _errors_forward(pred, target, ref_pred, None, True, block, chunk)


def step_errors_backward(grad_pol, grad_div, pred, target, ref_pred, *, block=None, chunk=None):
    """grad_pred = 2/D * (grad_pol_i * (pred_i - target_i) + grad_div_i * (pred_i - ref_i)), one pass."""
    grad_pred = torch.empty_like(pred)
    num_samples = pred.shape[0]
    if num_samples == 0:
        return grad_pred
    sample_size = pred.numel() // num_samples
    block, chunk, num_chunks, num_warps = launch_plan(num_samples, sample_size, pred.device, block, chunk)
    _backward_kernel[(num_samples, num_chunks)](
        grad_pol, pred, target, grad_pol, grad_pred,
        sample_size,
        CHUNK=chunk, BLOCK=block, HAS_WEIGHT=False, ACC=_accumulation_tl_dtype(pred.dtype),
        HAS_DIV=True, grad_div_ptr=grad_div, ref_ptr=ref_pred, num_warps=num_warps,
    )
    return grad_pred
