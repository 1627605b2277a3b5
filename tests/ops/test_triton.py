"""Triton kernels against the float64 reference; on CPU under TRITON_INTERPRET=1 at tiny sizes."""

from __future__ import annotations

import pytest
import torch

from fastpref.ops import library
from fastpref.ops import reference as R

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if "triton" not in library.available_backends(DEVICE):
    pytest.skip(
        f"triton kernels unavailable: {library.triton_unavailable_reason() or 'needs CUDA or TRITON_INTERPRET=1'}",
        allow_module_level=True,
    )

from fastpref.ops.triton import group_loss, sample_errors  # noqa: E402

# (sample shape, block, chunk): D = 105 is no multiple of the block; the small blocks/chunks force
# several chunks per sample and a ragged last chunk, as on a GPU with its large blocks.
SHAPES = [((3, 7, 5), None, None), ((3, 7, 5), 16, 32), ((4, 9, 9), 32, 64), ((1, 1, 1), None, None)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("shape, block, chunk", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_ref, with_weight", [(True, True), (False, False), (True, False)])
def test_sample_errors_forward(gen, helpers, shape, block, chunk, dtype, with_ref, with_weight):
    n = 5
    pred, target = helpers.randn(gen, n, *shape, dtype=dtype), helpers.randn(gen, n, *shape, dtype=dtype)
    ref_pred = helpers.randn(gen, n, *shape, dtype=dtype) if with_ref else None
    weight = torch.rand(n, generator=gen).to(DEVICE) if with_weight else None
    e_pol, e_ref = sample_errors.sample_errors_forward(pred, target, ref_pred, weight, block=block, chunk=chunk)
    want_pol, want_ref = R.sample_errors_reference(
        pred.double(), target.double(), ref_pred.double() if with_ref else None,
        weight.double() if with_weight else None,
    )
    assert e_pol.dtype == torch.float32
    torch.testing.assert_close(e_pol.double(), want_pol, rtol=helpers.forward_rtol[dtype], atol=1e-7)
    if with_ref:
        torch.testing.assert_close(e_ref.double(), want_ref, rtol=helpers.forward_rtol[dtype], atol=1e-7)
    else:
        assert e_ref.numel() == 0


@pytest.mark.parametrize("shape, block, chunk", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_errors_backward(gen, helpers, shape, block, chunk, dtype):
    n = 4
    pred, target = helpers.randn(gen, n, *shape, dtype=dtype), helpers.randn(gen, n, *shape, dtype=dtype)
    weight = torch.rand(n, generator=gen).to(DEVICE)
    grad_e = helpers.randn(gen, n)
    got = sample_errors.sample_errors_backward(grad_e, pred, target, weight, block=block, chunk=chunk)
    assert got.dtype == dtype and got.shape == pred.shape
    want = R.sample_errors_backward_reference(grad_e.double(), pred.double(), target.double(), weight.double())
    torch.testing.assert_close(got.double(), want, rtol=helpers.grad_rtol[dtype], atol=1e-6)


def test_launch_plan_fills_the_device_and_covers_every_element():
    block, chunk, num_chunks, _ = sample_errors.launch_plan(64, 4 * 128 * 128, torch.device("cpu"))
    assert chunk % block == 0 and num_chunks * chunk >= 4 * 128 * 128 > (num_chunks - 1) * chunk
    if torch.cuda.is_available():
        block, chunk, num_chunks, _ = sample_errors.launch_plan(64, 4 * 128 * 128, torch.device("cuda"))
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert 64 * num_chunks >= 2 * sms


@pytest.mark.parametrize("sizes", [[2, 2, 2], [3, 3], [4, 4], [7], [1, 2, 3, 7, 4], [0, 5, 2]])
@pytest.mark.parametrize("loss_type", sorted(R.LOSS_TYPES))
@pytest.mark.parametrize("weighting", sorted(R.PAIR_WEIGHTINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_kernel_matches_closed_form_reference(gen, helpers, sizes, loss_type, weighting, dtype):
    n = sum(sizes)
    s = helpers.randn(gen, n, dtype=torch.float64, scale=0.01)
    scores = torch.rand(n, generator=gen, dtype=torch.float64).to(DEVICE)
    scores[: n // 2] = torch.round(scores[: n // 2] * 2) / 2  # ties in scores
    if n > 3:
        s[3] = s[2]  # a tie in s
    s = s.to(dtype)
    offsets = helpers.ragged_offsets(sizes)
    got = group_loss.ranked_pair_loss_forward(
        s, scores.to(dtype), offsets, 50.0, R.LOSS_TYPES[loss_type], R.PAIR_WEIGHTINGS[weighting], max(sizes)
    )
    # the reference gets the very inputs the kernel got (scores rounded to dtype as well)
    want = R.ranked_pair_loss_with_grad_reference(s.double(), scores.to(dtype).double(), offsets, 50.0, loss_type,
                                                  weighting)
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-12, 1e-14)
    for name, g, w in zip(("loss", "grad_s", "stats"), got, want):
        # an element summed from pair terms of opposite sign (grad_s: +-41 cancelling to 0.14 at beta 50) carries
        # their rounding, not its own: the absolute tolerance scales with the largest element of the same output
        scaled_atol = max(atol, rtol * float(w.abs().max())) if w.numel() else atol
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=scaled_atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("loss_type", sorted(R.LOSS_TYPES))
def test_group_kernel_extreme_margins(helpers, loss_type):
    s = torch.tensor([0.0, 4.0, 4.0, 0.0, 1.0, 1.0], device=DEVICE)  # beta*m = +1e4, -1e4, tie
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0], device=DEVICE)
    loss, grad_s, stats = group_loss.ranked_pair_loss_forward(
        s, scores, helpers.ragged_offsets([2, 2, 2]), 2500.0, R.LOSS_TYPES[loss_type], 1, 2
    )
    want = R.ranked_pair_loss_with_grad_reference(s.double(), scores.double(), helpers.ragged_offsets([2, 2, 2]), 2500.0, loss_type, "dcg")
    assert torch.isfinite(loss).all() and torch.isfinite(grad_s).all()
    torch.testing.assert_close(loss.double(), want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_s.double(), want[1], rtol=1e-6, atol=1e-6)


def test_group_larger_than_block_is_poisoned_not_truncated(helpers):
    s = torch.arange(8, dtype=torch.float32, device=DEVICE)
    scores = torch.linspace(0, 1, 8, device=DEVICE)
    loss, _, _ = group_loss.ranked_pair_loss_forward(s, scores, helpers.ragged_offsets([3, 5]), 1.0, 0, 1, 4)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])
