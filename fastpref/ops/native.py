"""The native C++ CPU ops: kernels/preference_ops.cpp, built by setup.py into fastpref._C.

`fastpref._C` is a Python extension module with no functions: importing it loads the library,
which registers these torch ops (semantics: fastpref/ops/reference.py):

    torch.ops.fastpref.sample_errors_native(pred, target, ref_pred, weight) -> (e_pol, e_ref)
    torch.ops.fastpref.sample_errors_backward_native(grad_e, pred, target, weight) -> grad_pred
    torch.ops.fastpref.ranked_pair_loss_native(s, scores, offsets, beta, loss_type, weighting)
        -> (loss_per_group, grad_s, stats)
    torch.ops.fastpref.step_errors_native(pred, target, ref_pred) -> (e_pol, e_div)
    torch.ops.fastpref.step_errors_backward_native(grad_pol, grad_div, pred, target, ref_pred) -> grad_pred

e_pol / e_ref / loss_per_group / grad_s / stats come out in the accumulation dtype (float32, float64
for float64 inputs); e_ref is empty when ref_pred is None; grad_pred has pred's dtype; grad_s is
d(sum of loss_per_group)/ds, so the backward of a per-group upstream gradient is
grad_s * upstream[group of each row]. The ops have CPU and Meta kernels (so they trace under
torch.compile) and no autograd: fastpref.ops wires that up.

The native ops are optional. This module never raises on import: check `available()`, and
`unavailable_reason()` says why they are off. FASTPREF_NO_NATIVE=1 turns them off at run time as
well as at build time. FASTPREF_REQUIRE_NATIVE=1 (CI sets it) turns "off" into an error raised by
`available()` / `unavailable_reason()`, so a failed build fails the suite instead of skipping every
native test.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

from fastpref.ops.reference import LOSS_TYPES, PAIR_WEIGHTINGS

OP_NAMES = (
    "sample_errors_native",
    "sample_errors_backward_native",
    "ranked_pair_loss_native",
    "step_errors_native",
    "step_errors_backward_native",
)
REBUILD_HINT = (
    "rebuild with `pip install --no-build-isolation --no-deps -v -e .` in the fastpref checkout "
    "(-v shows the CMake log)"
)


def native_disabled_by_env() -> bool:
    return os.environ.get("FASTPREF_NO_NATIVE", "") not in ("", "0")


def load_native_library() -> str:
    """Import fastpref._C; returns '' when the ops are registered, else why they are not."""
    if native_disabled_by_env():
        return "the native ops are turned off by FASTPREF_NO_NATIVE"
    try:
        import fastpref._C  # noqa: F401  (importing registers the ops)
    except ModuleNotFoundError as err:
        if err.name != "fastpref._C":
            return f"fastpref._C failed to import ({err}); {REBUILD_HINT}"
        # A plain `pip install` (build isolation: no torch to build against) leaves _C out.
        from fastpref.ops._native_build import compile_and_load

        why = compile_and_load()
        if why:
            return f"fastpref._C is not built (skipped or failed at install) and {why}; {REBUILD_HINT}"
    except (ImportError, OSError) as err:
        # Typically undefined symbols: the library was built against another torch.
        return f"fastpref._C failed to load ({err}); was it built against another torch? {REBUILD_HINT}"
    missing = [name for name in OP_NAMES if not hasattr(torch.ops.fastpref, name)]
    if missing:
        return f"fastpref._C does not register {missing}: it is older than kernels/; {REBUILD_HINT}"
    return ""


def native_required_by_env() -> bool:
    return os.environ.get("FASTPREF_REQUIRE_NATIVE", "") not in ("", "0")


@functools.cache
def _load_reason() -> str:
    reason = load_native_library()
    if reason and native_required_by_env():
        raise RuntimeError(f"FASTPREF_REQUIRE_NATIVE is set but the native C++ ops are off: {reason}")
    if reason and not native_disabled_by_env():
        # Once per process: CPU losses now run the slower PyTorch reference, and the user should know why.
        print(f"fastpref: native C++ ops off, CPU losses use the PyTorch reference: {reason}", file=sys.stderr)
    return reason


def available() -> bool:
    return _load_reason() == ""


def unavailable_reason() -> str:
    """Why the native ops are off ('' when they are available)."""
    return _load_reason()


def require_native() -> None:
    if not available():
        raise RuntimeError(f"fastpref: the native C++ ops are not available: {unavailable_reason()}")


def sample_errors(
    pred: torch.Tensor,
    target: torch.Tensor,
    ref_pred: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Native reference.sample_errors_reference (no autograd): (e_pol, e_ref or None)."""
    require_native()
    e_pol, e_ref = torch.ops.fastpref.sample_errors_native(pred, target, ref_pred, weight)
    return e_pol, (e_ref if ref_pred is not None else None)


def sample_errors_backward(
    grad_e: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """d(sum_i grad_e[i] * e_pol[i]) / d pred, in pred's dtype."""
    require_native()
    return torch.ops.fastpref.sample_errors_backward_native(grad_e, pred, target, weight)


def ranked_pair_loss(
    s: torch.Tensor,
    scores: torch.Tensor,
    offsets: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    weighting: str = "dcg",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Native reference.ranked_pair_loss_reference: (loss per group, d(sum loss)/ds, stats)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {sorted(LOSS_TYPES)}, got {loss_type!r}")
    if weighting not in PAIR_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {sorted(PAIR_WEIGHTINGS)}, got {weighting!r}")
    require_native()
    return torch.ops.fastpref.ranked_pair_loss_native(
        s, scores, offsets, float(beta), LOSS_TYPES[loss_type], PAIR_WEIGHTINGS[weighting]
    )
