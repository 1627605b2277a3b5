"""The primitive ops as torch.library custom ops (namespace "fastpref"), with autograd, fake
(meta) implementations and backend dispatch.

    torch.ops.fastpref.sample_errors(pred, target, ref_pred?, weight?, backend) -> (e_pol, e_ref)
    torch.ops.fastpref.sample_errors_backward(grad_e, pred, target, weight?, backend) -> grad_pred
    torch.ops.fastpref.ranked_pair_loss(s, scores, offsets, beta, loss_type, weighting,
                                        max_group_size, backend) -> (loss_per_group, grad_s, stats)
    torch.ops.fastpref.step_errors(pred, target, ref_pred, backend) -> (e_pol, e_div)
    torch.ops.fastpref.step_errors_backward(grad_pol, grad_div, pred, target, ref_pred, backend) -> grad_pred

Registering them as custom ops (not autograd.Functions) is what lets torch.compile(fullgraph=True)
trace a training step through them: the compiler sees an opaque op with a fake implementation
and never looks inside the Triton launch or the C++ call.

Backends, one semantics (fastpref/ops/reference.py):
    "triton"    Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
    "native"    C++ CPU ops from fastpref._C (fastpref/ops/native.py), when built
    "reference" pure PyTorch (closed-form gradients, so it also runs inside the custom op)
    "auto"      triton on CUDA when importable, native on CPU when built, else reference
"""

from __future__ import annotations

import sys

import torch

from fastpref.ops import reference
from fastpref.ops.reference import LOSS_TYPES, PAIR_WEIGHTINGS

BACKENDS = ("auto", "triton", "native", "reference")
_SLOW_PATH_SAID: set[str] = set()
MAX_TRITON_GROUP_SIZE = 64
LOSS_TYPE_NAMES = {code: name for name, code in LOSS_TYPES.items()}
PAIR_WEIGHTING_NAMES = {code: name for name, code in PAIR_WEIGHTINGS.items()}


# ---------------------------------------------------------------------------------------------
# Backend availability and resolution
# ---------------------------------------------------------------------------------------------


# Memo of the availability probes. A plain dict rather than functools.lru_cache: once filled by
# the first eager call, torch.compile reads it as a constant instead of tracing the imports.
_UNAVAILABLE_REASON: dict[str, str] = {}


def triton_unavailable_reason() -> str:
    """'' when the Triton kernels can be imported, else why not."""
    if "triton" not in _UNAVAILABLE_REASON:
        _UNAVAILABLE_REASON["triton"] = _probe_triton()
    return _UNAVAILABLE_REASON["triton"]


def _probe_triton() -> str:
    try:
        import fastpref.ops.triton.group_loss  # noqa: F401
        import fastpref.ops.triton.sample_errors  # noqa: F401
    except Exception as err:  # triton missing, or a broken install: both mean "not this backend"
        return f"triton kernels could not be imported: {type(err).__name__}: {err}"
    return ""


def triton_interpreter_enabled() -> bool:
    from fastpref.ops.triton import interpreter_enabled

    return interpreter_enabled()


def native_unavailable_reason() -> str:
    """'' when the C++ ops (fastpref/ops/native.py, fastpref._C) are loaded, else why not."""
    if "native" not in _UNAVAILABLE_REASON:
        _UNAVAILABLE_REASON["native"] = _probe_native()
    return _UNAVAILABLE_REASON["native"]


def _probe_native() -> str:
    try:
        from fastpref.ops import native
    except Exception as err:
        return f"fastpref.ops.native could not be imported: {type(err).__name__}: {err}"
    if native.available():
        return ""
    return native.unavailable_reason() or "fastpref.ops.native reports the C++ ops are not available"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Concrete backends that can run on tensors of `device` in this process."""
    device = torch.device(device)
    found = ["reference"]
    if not native_unavailable_reason() and device.type == "cpu":
        found.append("native")
    if not triton_unavailable_reason() and (device.type == "cuda" or triton_interpreter_enabled()):
        found.append("triton")
    return found


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to a concrete backend for `device`; check that an explicit choice can run there."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and not triton_unavailable_reason():
            return "triton"
        if device.type == "cuda" and "cuda" not in _SLOW_PATH_SAID:
            # Once per process: CUDA losses fall back to the unfused PyTorch reference (the CPU case is said
            # by fastpref.ops.native when it finds the C++ ops off).
            _SLOW_PATH_SAID.add("cuda")
            print(f"fastpref: CUDA losses use the PyTorch reference: {triton_unavailable_reason()}", file=sys.stderr)
        if device.type == "cpu" and not native_unavailable_reason():
            return "native"
        return "reference"
    if backend == "triton":
        if triton_unavailable_reason():
            raise RuntimeError(f"backend='triton' was requested but {triton_unavailable_reason()}")
        if device.type != "cuda" and not triton_interpreter_enabled():
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got {device.type}); on CPU set TRITON_INTERPRET=1 "
                "before importing fastpref.ops (slow: for tests only)"
            )
    if backend == "native":
        if native_unavailable_reason():
            raise RuntimeError(f"backend='native' was requested but {native_unavailable_reason()}")
        if device.type != "cpu":
            raise RuntimeError(f"backend='native' runs on CPU tensors only, got {device.type} tensors")
    return backend


def _native_ops():
    return torch.ops.fastpref


# ---------------------------------------------------------------------------------------------
# sample_errors: (e_pol, e_ref) with grad into pred only
# ---------------------------------------------------------------------------------------------


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return reference.accumulation_dtype(dtype)


@torch.library.custom_op("fastpref::sample_errors", mutates_args=())
def _sample_errors_op(
    pred: torch.Tensor,
    target: torch.Tensor,
    ref_pred: torch.Tensor | None,
    weight: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    # Kernels index rows densely; a no-op for the contiguous tensors the public wrapper passes.
    pred, target = pred.contiguous(), target.contiguous()
    ref_pred = ref_pred.contiguous() if ref_pred is not None else None
    weight = weight.contiguous() if weight is not None else None
    if backend == "triton":
        from fastpref.ops.triton.sample_errors import sample_errors_forward

        return sample_errors_forward(pred, target, ref_pred, weight)
    if backend == "native":
        return _native_ops().sample_errors_native(pred, target, ref_pred, weight)
    e_pol, e_ref = reference.sample_errors_reference(pred, target, ref_pred, weight)
    if e_ref is None:
        e_ref = e_pol.new_empty(0)
    return e_pol, e_ref


@_sample_errors_op.register_fake
def _(pred, target, ref_pred, weight, backend):
    acc = _accumulation_dtype(pred.dtype)
    num_ref = pred.shape[0] if ref_pred is not None else 0
    return pred.new_empty(pred.shape[0], dtype=acc), pred.new_empty(num_ref, dtype=acc)


@torch.library.custom_op("fastpref::sample_errors_backward", mutates_args=())
def _sample_errors_backward_op(
    grad_e: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    # Autograd hands in expanded (stride-0) gradients, e.g. from e_pol.mean(); kernels index densely.
    grad_e = grad_e.to(_accumulation_dtype(pred.dtype)).contiguous()
    pred, target = pred.contiguous(), target.contiguous()
    weight = weight.contiguous() if weight is not None else None
    if backend == "triton":
        from fastpref.ops.triton.sample_errors import sample_errors_backward

        return sample_errors_backward(grad_e, pred, target, weight)
    if backend == "native":
        return _native_ops().sample_errors_backward_native(grad_e, pred, target, weight)
    return reference.sample_errors_backward_reference(grad_e, pred, target, weight)


@_sample_errors_backward_op.register_fake
def _(grad_e, pred, target, weight, backend):
    return pred.new_empty(pred.shape)  # contiguous, like every backend's output


def _sample_errors_setup_context(ctx, inputs, output):
    pred, target, _ref_pred, weight, backend = inputs
    ctx.save_for_backward(pred, target, weight)
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])


def _sample_errors_backward(ctx, grad_e_pol, _grad_e_ref):
    pred, target, weight = ctx.saved_tensors
    grad_pred = None
    if ctx.needs_input_grad[0] and grad_e_pol is not None:
        grad_pred = _sample_errors_backward_op(grad_e_pol, pred, target, weight, ctx.backend)
    return grad_pred, None, None, None, None


_sample_errors_op.register_autograd(_sample_errors_backward, setup_context=_sample_errors_setup_context)


def _check_sample_inputs(pred, target, ref_pred, weight):
    if pred.dim() < 1:
        raise ValueError(f"pred must have a leading sample dimension N, got a {pred.dim()}-d tensor")
    if target.shape != pred.shape:
        raise ValueError(f"target shape {tuple(target.shape)} must equal pred shape {tuple(pred.shape)}")
    if ref_pred is not None and ref_pred.shape != pred.shape:
        raise ValueError(f"ref_pred shape {tuple(ref_pred.shape)} must equal pred shape {tuple(pred.shape)}")
    if weight is not None and tuple(weight.shape) != (pred.shape[0],):
        raise ValueError(f"weight must have shape (N,) = ({pred.shape[0]},), got {tuple(weight.shape)}")
    for name, tensor in (("target", target), ("ref_pred", ref_pred), ("weight", weight)):
        if tensor is not None and tensor.device != pred.device:
            raise ValueError(f"{name} is on {tensor.device} but pred is on {pred.device}")
    if not pred.is_floating_point():
        raise TypeError(f"pred must be a floating-point tensor, got {pred.dtype}")
    # The kernels differentiate pred only; a silent None gradient would be a wrong answer.
    for name, tensor in (("target", target), ("weight", weight)):
        if tensor is not None and tensor.requires_grad:
            raise ValueError(
                f"{name} requires grad, but the fused ops differentiate pred only; pass {name}.detach()"
            )


def sample_errors(
    pred: torch.Tensor,
    target: torch.Tensor,
    ref_pred: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample errors e_i = w_i * mean over all non-batch dims of (pred_i - target_i)^2.

    Args:
        pred: (N, ...) model prediction (fp32/bf16/fp16/fp64); the only input that gets a gradient.
        target: same shape, the regression target (noise, velocity, ...); no gradient.
        ref_pred: optional reference-model prediction, same shape; read in the same pass.
        weight: optional (N,) per-sample weight (e.g. min-SNR); no gradient.
        backend: "auto" | "triton" | "native" | "reference".

    Returns:
        (e_pol, e_ref): (N,) float32 (float64 for float64 inputs); e_ref is None without ref_pred.
    """
    _check_sample_inputs(pred, target, ref_pred, weight)
    concrete = resolve_backend(backend, pred.device)
    if concrete == "native":
        # The C++ contract takes one dtype for all three; promote instead of failing.
        common = pred.dtype
        for tensor in (target, ref_pred):
            if tensor is not None:
                common = torch.promote_types(common, tensor.dtype)
        pred, target = pred.to(common), target.to(common)
        ref_pred = ref_pred.to(common) if ref_pred is not None else None
    ref_pred = ref_pred.detach() if ref_pred is not None else None
    e_pol, e_ref = _sample_errors_op(pred, target, ref_pred, weight, concrete)
    return e_pol, (e_ref if ref_pred is not None else None)


# ---------------------------------------------------------------------------------------------
# ranked_pair_loss: per-group pair/rank loss, gradient w.r.t. s, statistics
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastpref::ranked_pair_loss", mutates_args=())
def _ranked_pair_loss_op(
    s: torch.Tensor,
    scores: torch.Tensor,
    offsets: torch.Tensor,
    beta: float,
    loss_type: int,
    weighting: int,
    max_group_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s, scores, offsets = s.contiguous(), scores.contiguous(), offsets.contiguous()
    if backend == "triton":
        from fastpref.ops.triton.group_loss import ranked_pair_loss_forward

        return ranked_pair_loss_forward(s, scores, offsets, beta, loss_type, weighting, max_group_size)
    if backend == "native":
        return _native_ops().ranked_pair_loss_native(s, scores, offsets, beta, loss_type, weighting)
    return reference.ranked_pair_loss_with_grad_reference(
        s, scores, offsets, beta, LOSS_TYPE_NAMES[loss_type], PAIR_WEIGHTING_NAMES[weighting]
    )


@_ranked_pair_loss_op.register_fake
def _(s, scores, offsets, beta, loss_type, weighting, max_group_size, backend):
    acc = _accumulation_dtype(s.dtype)
    num_groups = offsets.shape[0] - 1
    return (
        s.new_empty(num_groups, dtype=acc),
        s.new_empty(s.shape[0], dtype=acc),
        s.new_empty((num_groups, len(reference.STAT_COLUMNS)), dtype=acc),
    )


def _ranked_pair_loss_setup_context(ctx, inputs, output):
    _s, _scores, offsets, *_ = inputs
    _loss, grad_s, stats = output
    ctx.save_for_backward(grad_s, offsets)
    ctx.mark_non_differentiable(grad_s, stats)


def _ranked_pair_loss_backward(ctx, grad_loss, _grad_grad_s, _grad_stats):
    grad_s, offsets = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0] and grad_loss is not None:
        rows = torch.arange(grad_s.shape[0], device=grad_s.device, dtype=offsets.dtype)
        group_of_row = torch.searchsorted(offsets, rows, right=True) - 1
        grad = grad_s * grad_loss.to(grad_s.dtype)[group_of_row]
    return grad, None, None, None, None, None, None, None


_ranked_pair_loss_op.register_autograd(_ranked_pair_loss_backward, setup_context=_ranked_pair_loss_setup_context)


def _check_offsets(offsets: torch.Tensor, num_samples: int) -> int | None:
    """Validate offsets where that costs no device sync; return the largest group size if known."""
    if offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(f"offsets must be a 1-d tensor of B+1 row indices, got shape {tuple(offsets.shape)}")
    if offsets.dtype != torch.int64:
        raise TypeError(f"offsets must be int64, got {offsets.dtype}")
    if offsets.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    lengths = offsets[1:] - offsets[:-1]
    if int(offsets[0]) != 0 or int(offsets[-1]) != num_samples:
        raise ValueError(
            f"offsets must start at 0 and end at N={num_samples}, got {int(offsets[0])}..{int(offsets[-1])}"
        )
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError("offsets must be non-decreasing")
    return int(lengths.max()) if lengths.numel() else 1


def ranked_pair_loss(
    s: torch.Tensor,
    scores: torch.Tensor,
    offsets: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    weighting: str = "dcg",
    *,
    max_group_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group loss over ordered pairs, see reference.ranked_pair_loss_reference for the semantics.

    Args:
        s: (N,) s_i = e_pol_i - e_ref_i (or any per-sample "lower is preferred" score); gets a gradient.
        scores: (N,) preference scores; i beats j in its group when scores_i > scores_j.
        offsets: (B+1,) int64, group g = rows offsets[g]:offsets[g+1].
        max_group_size: bound on K used to size the Triton block. Read from offsets when they are
            on the CPU; with GPU offsets and no bound, 64 is assumed and a larger group gives NaN.

    Returns:
        (loss per group (B,), stats (B, 4) in reference.STAT_COLUMNS order, no gradient).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {sorted(LOSS_TYPES)}, got {loss_type!r}")
    if weighting not in PAIR_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {sorted(PAIR_WEIGHTINGS)}, got {weighting!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if s.dim() != 1 or tuple(scores.shape) != tuple(s.shape):
        raise ValueError(f"s and scores must both be (N,), got {tuple(s.shape)} and {tuple(scores.shape)}")
    known_max = _check_offsets(offsets, s.shape[0])
    if max_group_size is None:
        max_group_size = known_max if known_max is not None else MAX_TRITON_GROUP_SIZE
    concrete = resolve_backend(backend, s.device)
    if concrete == "triton" and max_group_size > MAX_TRITON_GROUP_SIZE:
        raise ValueError(
            f"groups of {max_group_size} > {MAX_TRITON_GROUP_SIZE} samples exceed the Triton group kernel; "
            "use backend='reference'"
        )
    acc = _accumulation_dtype(s.dtype)
    loss, _grad_s, stats = _ranked_pair_loss_op(
        s.to(acc),
        scores.to(acc),
        offsets,
        float(beta),
        LOSS_TYPES[loss_type],
        PAIR_WEIGHTINGS[weighting],
        max(int(max_group_size), 1),
        concrete,
    )
    return loss, stats


# ---------------------------------------------------------------------------------------------
# step_errors: the fused pass of a per-step Gaussian policy (GRPO): (e_pol, e_div), grad into pred
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastpref::step_errors", mutates_args=())
def _step_errors_op(
    pred: torch.Tensor, target: torch.Tensor, ref_pred: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target, ref_pred = pred.contiguous(), target.contiguous(), ref_pred.contiguous()
    if backend == "triton":
        from fastpref.ops.triton.sample_errors import step_errors_forward

        return step_errors_forward(pred, target, ref_pred)
    if backend == "native":
        return _native_ops().step_errors_native(pred, target, ref_pred)
    return reference.step_errors_reference(pred, target, ref_pred)


@_step_errors_op.register_fake
def _(pred, target, ref_pred, backend):
    acc = _accumulation_dtype(pred.dtype)
    return pred.new_empty(pred.shape[0], dtype=acc), pred.new_empty(pred.shape[0], dtype=acc)


@torch.library.custom_op("fastpref::step_errors_backward", mutates_args=())
def _step_errors_backward_op(
    grad_pol: torch.Tensor,
    grad_div: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    ref_pred: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    acc = _accumulation_dtype(pred.dtype)
    grad_pol, grad_div = grad_pol.to(acc).contiguous(), grad_div.to(acc).contiguous()
    pred, target, ref_pred = pred.contiguous(), target.contiguous(), ref_pred.contiguous()
    if backend == "triton":
        from fastpref.ops.triton.sample_errors import step_errors_backward

        return step_errors_backward(grad_pol, grad_div, pred, target, ref_pred)
    if backend == "native":
        return _native_ops().step_errors_backward_native(grad_pol, grad_div, pred, target, ref_pred)
    return reference.step_errors_backward_reference(grad_pol, grad_div, pred, target, ref_pred)


@_step_errors_backward_op.register_fake
def _(grad_pol, grad_div, pred, target, ref_pred, backend):
    return pred.new_empty(pred.shape)


def _step_errors_setup_context(ctx, inputs, output):
    pred, target, ref_pred, backend = inputs
    ctx.save_for_backward(pred, target, ref_pred)
    ctx.backend = backend


def _step_errors_backward(ctx, grad_pol, grad_div):
    pred, target, ref_pred = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or (grad_pol is None and grad_div is None):
        return None, None, None, None
    acc = _accumulation_dtype(pred.dtype)
    zeros = torch.zeros(pred.shape[0], dtype=acc, device=pred.device)
    grad_pred = _step_errors_backward_op(
        grad_pol if grad_pol is not None else zeros,
        grad_div if grad_div is not None else zeros,
        pred, target, ref_pred, ctx.backend,
    )
    return grad_pred, None, None, None


_step_errors_op.register_autograd(_step_errors_backward, setup_context=_step_errors_setup_context)


def step_errors(
    pred: torch.Tensor, target: torch.Tensor, ref_pred: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(e_pol, e_div): per-sample means of (pred - target)^2 and (pred - ref_pred)^2, one pass.

    For a Gaussian step x_{t-1} ~ N(mean, std^2): pred = the policy mean (gets the gradient),
    target = the taken sample x_{t-1}, ref_pred = the reference mean (no gradient). (N,) float32
    (float64 for float64 inputs). e_pol is sample_errors' e_pol; e_div is what a KL between the
    policy's and the reference's Gaussians needs, read in the same pass.
    """
    _check_sample_inputs(pred, target, ref_pred, None)
    concrete = resolve_backend(backend, pred.device)
    if concrete == "native":
        common = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), ref_pred.dtype)
        pred, target, ref_pred = pred.to(common), target.to(common), ref_pred.to(common)
    return _step_errors_op(pred, target, ref_pred.detach(), concrete)
