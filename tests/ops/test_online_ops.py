"""spo_loss / grpo_loss / step_errors on every backend against the float64 oracles of
fastpref/ops/reference.py (which compute the Gaussian log-densities elementwise, as the SPO and
Flow-GRPO code do), forward and backward, on fresh random inputs."""

from __future__ import annotations

import math

import pytest
import torch

import fastpref.ops as ops
from fastpref.ops import reference as R
from fastpref.ops.online import clamped_log_ratio

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd shapes: D = 105 and D = 1 are no multiple of any block; (4, 9, 9) is a latent-like shape.
SHAPES = [(3, 7, 5), (4, 9, 9), (1,)]
# The loss is a smooth function of the per-row errors, whose float32 accumulation is checked to
# 1e-5 relative; the loss and its gradient add a few float32 roundings on top.
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def _rounded64(t):
    return t.detach().double()


def _step_inputs(gen, helpers, n, shape, dtype, *, spread):
    """(policy_mean, reference_mean, sample, std (N,)): sample ~ N(reference_mean, std^2), the
    policy mean a perturbation of the reference mean of relative size `spread`."""
    std = (0.2 + torch.rand(n, generator=gen, dtype=torch.float64)).to(helpers.device)
    ref = helpers.randn(gen, n, *shape, dtype=dtype)
    std_b = std.reshape((-1,) + (1,) * len(shape))
    sample = (ref.double() + std_b * helpers.randn(gen, n, *shape, dtype=torch.float64)).to(dtype)
    policy = (ref.double() + spread * std_b * helpers.randn(gen, n, *shape, dtype=torch.float64)).to(dtype)
    return policy.requires_grad_(), ref, sample, std.float()


def _away_from_edges(log_ratio, eps, margin=1e-3):
    ratio = log_ratio.exp()
    return bool(((ratio - (1 - eps)).abs() > margin).all() and ((ratio - (1 + eps)).abs() > margin).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_spo_loss_matches_float64_oracle(gen, helpers, backend, dtype, shape):
    n, eps, beta = 8, 0.1, 10.0
    for _ in range(20):  # a row within float error of a clamp edge would make the gradient ambiguous
        policy, ref, sample, std = _step_inputs(gen, helpers, n, shape, dtype, spread=0.3)
        want_loss, want_log_ratio = R.spo_loss_reference(
            (p64 := _rounded64(policy).requires_grad_()), _rounded64(ref), _rounded64(sample), std.double(), beta, eps
        )
        if _away_from_edges(want_log_ratio.detach(), eps):
            break
    clipped = ((want_log_ratio.exp() - 1).abs() > eps).sum()
    out = ops.spo_loss(policy, ref, sample, std, beta=beta, clip_eps=eps, backend=backend)
    torch.testing.assert_close(out.loss.double(), want_loss.detach(), rtol=LOSS_RTOL[dtype], atol=1e-6)
    torch.testing.assert_close(
        out.metrics["log_ratio"].double(), want_log_ratio.detach().mean(), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(out.metrics["clip_fraction"].double(), clipped.double() / n)
    (grad,) = torch.autograd.grad(out.loss, policy)
    (want_grad,) = torch.autograd.grad(want_loss, p64)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), want_grad, rtol=helpers.grad_rtol[dtype], atol=1e-6)


def test_spo_loss_is_dpo_on_log_ratios_and_metrics(gen, helpers, backend):
    policy, ref, sample, std = _step_inputs(gen, helpers, 6, (2, 3, 3), torch.float64, spread=0.05)
    out = ops.spo_loss(policy, ref, sample, std, beta=3.0, clip_eps=0.5, backend=backend)
    log_r = (R.gaussian_log_prob_reference(sample, policy, std) - R.gaussian_log_prob_reference(sample, ref, std))
    assert bool((log_r.exp() - 1).abs().max() < 0.5)  # nothing clipped: plain DPO on the log ratios
    margin = log_r[0::2] - log_r[1::2]
    torch.testing.assert_close(out.loss, torch.nn.functional.softplus(-3.0 * margin).mean().detach())
    torch.testing.assert_close(out.metrics["implicit_accuracy"], (margin > 0).double().mean())
    torch.testing.assert_close(out.metrics["ratio_win"], log_r[0::2].exp().mean().detach())
    assert float(out.metrics["clip_fraction"]) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spo_clamp_edges_follow_torch_clamp(dtype):
    """At exactly 1 +- eps the gradient passes (torch.clamp's inclusive bounds, which SPO's
    `torch.clamp(torch.exp(...))` inherits); one step beyond, it is zero."""
    eps = 0.1
    for bound in (1 - eps, 1 + eps):
        edge = torch.log(torch.tensor(bound, dtype=dtype))
        if torch.exp(edge) != torch.tensor(bound, dtype=dtype):
            edge = torch.nextafter(edge, torch.tensor(0.0, dtype=dtype))
        outward = torch.tensor(math.copysign(math.inf, bound - 1), dtype=dtype)
        beyond, inward = torch.nextafter(edge, outward), torch.nextafter(edge, -outward)
        while torch.exp(beyond) == torch.tensor(bound, dtype=dtype):  # several log ulps per ratio ulp
            beyond = torch.nextafter(beyond, outward)
        while torch.exp(inward) == torch.tensor(bound, dtype=dtype):
            inward = torch.nextafter(inward, -outward)
        x = torch.stack([edge, beyond, inward, edge + 0.05 * (bound - 1) / eps]).requires_grad_()
        got, clipped = clamped_log_ratio(x, eps)
        (g,) = torch.autograd.grad(got.sum(), x)
        want = torch.log(torch.clamp(torch.exp(x), 1 - eps, 1 + eps))
        (wg,) = torch.autograd.grad(want.sum(), x)
        torch.testing.assert_close(got, want, rtol=0, atol=4 * torch.finfo(dtype).eps)
        assert g.tolist() == [1.0, 0.0, 1.0, 0.0] and wg.tolist() == g.tolist()
        assert clipped.tolist() == [False, True, False, True]


def test_spo_rows_beyond_the_clamp_get_no_gradient(gen, helpers, backend):
    policy, ref, sample, std = _step_inputs(gen, helpers, 4, (2, 4, 4), torch.float32, spread=0.0)
    with torch.no_grad():  # pair 0: winner far beyond 1+eps; pair 1: loser far below 1-eps
        policy[0] = sample[0]
        policy[3] = ref[3] + 3 * (ref[3] - sample[3])
        policy[1] = ref[1]
        policy[2] = ref[2]
    out = ops.spo_loss(policy, ref, sample, std, backend=backend)
    (grad,) = torch.autograd.grad(out.loss, policy)
    assert float(out.metrics["clip_fraction"]) == 0.5
    assert grad[0].abs().max() == 0 and grad[3].abs().max() == 0
    assert grad[1].abs().max() > 0 and grad[2].abs().max() > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_reference", [True, False])
def test_grpo_loss_matches_float64_oracle(gen, helpers, backend, dtype, shape, with_reference):
    n, clip = 8, 0.2
    policy, ref, sample, std = _step_inputs(gen, helpers, n, shape, dtype, spread=0.2)
    kl_std = std * 3.0
    p64 = _rounded64(policy).requires_grad_()
    old = (R.gaussian_log_prob_reference(_rounded64(sample), _rounded64(ref), std.double())).float()
    old = old + 0.3 * helpers.randn(gen, n)  # ratios on both sides of the clip range
    adv = helpers.randn(gen, n)
    kl_beta = 0.04 if with_reference else 0.0

    def oracle(old: torch.Tensor):
        return R.grpo_loss_reference(
            p64, _rounded64(ref) if with_reference else None, _rounded64(sample), std.double(), old.double(),
            adv.double(), clip, kl_beta, kl_std.double(),
        )

    want_loss, want_lp, _, want_kl = oracle(old)
    # a ratio within float error of the clip edge would make the clip mask (and the gradient) a coin toss between
    # backends: move such rows' old log-prob by 0.01 (the ratio by ~1%, off the edge)
    near_edge = (((want_lp - old.double()).exp() - 1).abs() - clip).abs() < 1e-3
    if bool(near_edge.any()):
        old = old + 0.01 * near_edge.float()
        want_loss, want_lp, _, want_kl = oracle(old)
    ratio = (want_lp - old.double()).exp().detach()
    assert bool((((ratio - 1).abs() - clip).abs() > 1e-4).all())
    out = ops.grpo_loss(
        policy, ref if with_reference else None, sample, std, old, adv,
        clip_range=clip, kl_beta=kl_beta, kl_std=kl_std, backend=backend,
    )
    # log_prob carries -log(std) - log sqrt(2 pi) ~ 1: absolute error of float32 rounding.
    torch.testing.assert_close(out.log_prob.double(), want_lp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss.double(), want_loss.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.metrics["kl"].double(), want_kl.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        out.metrics["clip_fraction"].double(), ((ratio - 1).abs() > clip).double().mean()
    )
    torch.testing.assert_close(
        out.metrics["approx_kl"].double(), 0.5 * (want_lp.detach() - old.double()).square().mean(), rtol=1e-4, atol=1e-6
    )
    (grad,) = torch.autograd.grad(out.loss, policy)
    (want_grad,) = torch.autograd.grad(want_loss, p64)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), want_grad, rtol=helpers.grad_rtol[dtype] * 10, atol=1e-6)


def test_grpo_on_policy_step_is_the_advantage_gradient(gen, helpers, backend):
    """At old_log_prob = log_prob (the first inner step), ratio = 1 and without KL
    d loss / d log_prob_i = -A_i / N: the policy-gradient estimator."""
    policy, ref, sample, std = _step_inputs(gen, helpers, 6, (3, 4), torch.float64, spread=0.1)
    old = R.gaussian_log_prob_reference(sample, policy.detach(), std)
    adv = helpers.randn(gen, 6, dtype=torch.float64)
    out = ops.grpo_loss(policy, None, sample, std, old, adv, clip_range=1e-4, kl_beta=0.0, backend=backend)
    torch.testing.assert_close(out.metrics["ratio"], torch.tensor(1.0, dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.loss, policy)
    (lp_grad,) = torch.autograd.grad(R.gaussian_log_prob_reference(sample, policy, std), policy, -adv / 6)
    torch.testing.assert_close(grad, lp_grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_step_errors_forward_backward(gen, helpers, backend, dtype, shape):
    n = 5
    pred = helpers.randn(gen, n, *shape, dtype=dtype).requires_grad_()
    target, ref = helpers.randn(gen, n, *shape, dtype=dtype), helpers.randn(gen, n, *shape, dtype=dtype)
    e_pol, e_div = ops.step_errors(pred, target, ref, backend=backend)
    p64 = _rounded64(pred).requires_grad_()
    want_pol = (p64 - target.double()).square().flatten(1).mean(1)
    want_div = (p64 - ref.double()).square().flatten(1).mean(1)
    torch.testing.assert_close(e_pol.double(), want_pol.detach(), rtol=helpers.forward_rtol[dtype], atol=1e-7)
    torch.testing.assert_close(e_div.double(), want_div.detach(), rtol=helpers.forward_rtol[dtype], atol=1e-7)
    up_pol, up_div = helpers.randn(gen, n), helpers.randn(gen, n)
    (grad,) = torch.autograd.grad((e_pol, e_div), pred, (up_pol, up_div), retain_graph=True)
    (want,) = torch.autograd.grad((want_pol, want_div), p64, (up_pol.double(), up_div.double()))
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), want, rtol=helpers.grad_rtol[dtype], atol=1e-6)
    (only_div,) = torch.autograd.grad(e_div.sum(), pred)  # one output unused: its gradient is None
    torch.testing.assert_close(only_div.double(), 2 * (p64 - ref.double()).detach() / p64[0].numel(),
                               rtol=helpers.grad_rtol[dtype], atol=1e-6)


def test_std_layouts_and_bad_inputs(gen, helpers):
    policy, ref, sample, std = _step_inputs(gen, helpers, 4, (2, 3), torch.float32, spread=0.1)
    base = ops.spo_loss(policy, ref, sample, std, backend="reference").loss
    for layout in (std.reshape(4, 1, 1), std.tolist()):
        torch.testing.assert_close(ops.spo_loss(policy, ref, sample, layout, backend="reference").loss, base)
    scalar = ops.spo_loss(policy, ref, sample, 0.5, backend="reference").loss
    torch.testing.assert_close(scalar, ops.spo_loss(policy, ref, sample, torch.full((4,), 0.5)).loss)
    with pytest.raises(ValueError, match="std must be one value per row"):
        ops.spo_loss(policy, ref, sample, torch.ones(4, 2, 3))
    with pytest.raises(ValueError, match="std must be positive"):
        ops.spo_loss(policy, ref, sample, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="even number of rows"):
        ops.spo_loss(policy[:3], ref[:3], sample[:3], std[:3])
    with pytest.raises(ValueError, match="kl_beta=0.1 needs reference_mean"):
        ops.grpo_loss(policy, None, sample, std, torch.zeros(4), torch.zeros(4), clip_range=0.2, kl_beta=0.1)
    with pytest.raises(ValueError, match=r"advantages must have shape \(N,\)"):
        ops.grpo_loss(policy, ref, sample, std, torch.zeros(4), torch.zeros(3), clip_range=0.2, kl_beta=0.1)
    with pytest.raises(ValueError, match="target requires grad"):
        ops.grpo_loss(policy, ref, sample.requires_grad_(), std, torch.zeros(4), torch.zeros(4),
                      clip_range=0.2, kl_beta=0.1)


def test_log_prob_agrees_with_the_online_sampler(gen, helpers):
    """The sampler's gaussian_log_prob (fastpref/online/sampler.py) and the op's log_prob are one
    formula: the old log-probs recorded while sampling must equal the op's at ratio 1."""
    sampler = pytest.importorskip("fastpref.online.sampler", reason="the online sampler is not in this tree yet")
    policy, _, sample, std = _step_inputs(gen, helpers, 4, (2, 3, 3), torch.float64, spread=0.1)
    want = sampler.gaussian_log_prob(sample, policy.detach(), std.double().reshape(4, 1, 1, 1))
    out = ops.grpo_loss(policy, None, sample, std.double(), want, torch.ones(4), clip_range=0.2, kl_beta=0.0)
    # the sampler computes in float32 whatever the inputs
    torch.testing.assert_close(out.log_prob.detach(), want.to(out.log_prob.dtype), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape, block, chunk", [((3, 7, 5), 16, 32), ((4, 9, 9), 32, 64), ((1,), None, None)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_step_errors_triton_kernels_with_several_chunks(gen, helpers, shape, block, chunk, dtype):
    """Small blocks / chunks force several chunks per sample and a ragged last one, as on a GPU."""
    if "triton" not in ops.available_backends(helpers.device):
        pytest.skip("triton unavailable (needs CUDA or TRITON_INTERPRET=1)")
    from fastpref.ops.triton import sample_errors as kernels

    n = 3
    pred, target, ref = (helpers.randn(gen, n, *shape, dtype=dtype) for _ in range(3))
    e_pol, e_div = kernels.step_errors_forward(pred, target, ref, block=block, chunk=chunk)
    want_pol, want_div = R.step_errors_reference(pred.double(), target.double(), ref.double())
    torch.testing.assert_close(e_pol.double(), want_pol, rtol=helpers.forward_rtol[dtype], atol=1e-7)
    torch.testing.assert_close(e_div.double(), want_div, rtol=helpers.forward_rtol[dtype], atol=1e-7)
    g_pol, g_div = helpers.randn(gen, n), helpers.randn(gen, n)
    got = kernels.step_errors_backward(g_pol, g_div, pred, target, ref, block=block, chunk=chunk)
    want = R.step_errors_backward_reference(g_pol.double(), g_div.double(), pred.double(), target.double(), ref.double())
    torch.testing.assert_close(got.double(), want, rtol=helpers.grad_rtol[dtype], atol=1e-6)


@pytest.mark.slow
def test_fullgraph_compile_of_an_online_step(gen, helpers, backend):
    """spo_loss + grpo_loss through torch.compile(fullgraph=True): no graph break, same loss and
    gradients as eager (~20 s per backend on a 2-core CPU)."""
    torch._dynamo.reset()
    model = torch.nn.Linear(12, 12).to(helpers.device)
    reference_model = torch.nn.Linear(12, 12).to(helpers.device).requires_grad_(False)
    x = helpers.randn(gen, 4, 12)
    sample = helpers.randn(gen, 4, 3, 2, 2)
    std = (0.5 + torch.rand(4, generator=gen)).to(helpers.device)
    old = helpers.randn(gen, 4) - 2.0
    adv = helpers.randn(gen, 4)

    def step(x, sample, std, old, adv):
        mean = model(x).view(4, 3, 2, 2)
        ref_mean = reference_model(x).view(4, 3, 2, 2)
        spo = ops.spo_loss(mean, ref_mean, sample, std, beta=10.0, clip_eps=0.1, backend=backend)
        grpo = ops.grpo_loss(mean, ref_mean, sample, std, old, adv, clip_range=0.2, kl_beta=0.04, backend=backend)
        return spo.loss + grpo.loss, grpo.log_prob.detach(), spo.metrics["clip_fraction"]

    eager = step(x, sample, std, old, adv)
    eager_grads = torch.autograd.grad(eager[0], list(model.parameters()))
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    got = compiled(x, sample, std, old, adv)
    grads = torch.autograd.grad(got[0], list(model.parameters()))
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_mixed_dtypes_bf16_means_with_a_float32_sample(gen, helpers, backend):
    """Under autocast the means come out in bf16 while the stored sample is float32: every backend accepts the
    mix (the C++ one promotes) and the gradient reaches the bf16 mean in its dtype."""
    policy, ref, sample, std = _step_inputs(gen, helpers, 4, (2, 4, 4), torch.float32, spread=0.2)
    policy16 = policy.detach().bfloat16().requires_grad_()
    old, adv = helpers.randn(gen, 4) - 1.0, helpers.randn(gen, 4)
    out = ops.grpo_loss(policy16, ref.bfloat16(), sample, std, old, adv, clip_range=0.2, kl_beta=0.04, backend=backend)
    want, *_ = R.grpo_loss_reference(policy16.double(), ref.bfloat16().double(), sample.double(), std.double(),
                                     old.double(), adv.double(), 0.2, 0.04)
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(out.loss + ops.spo_loss(policy16, ref.bfloat16(), sample, std, backend=backend).loss,
                                  policy16)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()
