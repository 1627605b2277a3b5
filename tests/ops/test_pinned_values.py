"""Pinned closed-form values at extreme margins, where the other tests only check finiteness.

Two pairs (winner first) with beta * margin = +1e4 and -1e4 (beta 2500, s differing by 4: exact in every dtype),
through every backend, K=2 with scores (1, 0) (dcg and uniform weightings both reduce to the pair loss):
    sigmoid  softplus(-x)          -> 0 and 1e4;         d/d margin = -beta sigmoid(-x) -> 0 and -beta
    hinge    relu(1 - x)           -> 0 and 1 + 1e4;     d/d margin = -beta [x < 1]     -> 0 and -beta
    ipo      (m - 1/(2 beta))^2    -> (4 - 2e-4)^2 and (4 + 2e-4)^2; d/d margin = 2 (m - 1/(2 beta))
with margin m = s_loser - s_winner, so d/ds_winner = -d/dm and d/ds_loser = +d/dm.
"""

import pytest
import torch

from fastpref.ops import ranked_pair_loss

BETA = 2500.0
# pair 0: the policy prefers the winner by 4 (x = +1e4); pair 1: the loser by 4 (x = -1e4)
S = [0.0, 4.0, 4.0, 0.0]
MARGINS = [4.0, -4.0]


def closed_form(loss_type: str, m: float) -> tuple[float, float]:
    """(pair loss, d loss / d margin) in float64 arithmetic."""
    x = BETA * m
    if loss_type == "sigmoid":
        return (0.0, 0.0) if x > 0 else (-x, -BETA)  # softplus(-x) = -x + log1p(exp(x)); exp(-1e4) = 0 in fp64
    if loss_type == "hinge":
        return max(0.0, 1.0 - x), (-BETA if 1.0 - x > 0 else 0.0)
    shifted = m - 1.0 / (2.0 * BETA)
    return shifted * shifted, 2.0 * shifted


@pytest.mark.parametrize("weighting", ["dcg", "uniform"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_pair_losses_at_beta_margin_plus_minus_1e4(helpers, backend, loss_type, dtype, weighting):
    s = torch.tensor(S, dtype=dtype, device=helpers.device, requires_grad=True)
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=dtype, device=helpers.device)
    offsets = helpers.ragged_offsets([2, 2])
    loss, stats = ranked_pair_loss(s, scores, offsets, BETA, loss_type, weighting, backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    want = [closed_form(loss_type, m) for m in MARGINS]
    want_loss = torch.tensor([w[0] for w in want], dtype=torch.float64)
    slope = [w[1] for w in want]
    want_grad = torch.tensor([-slope[0], slope[0], -slope[1], slope[1]], dtype=torch.float64)
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(loss.detach().double().cpu(), want_loss, rtol=rtol, atol=0)
    torch.testing.assert_close(grad.double().cpu(), want_grad, rtol=rtol, atol=0)
    # stats: weight_sum > 0, one ordered pair each, correct for +1e4 only, margin_sum = beta * margin
    stats = stats.double().cpu()
    torch.testing.assert_close(stats[:, 1:], torch.tensor([[1.0, 1.0, 1e4], [1.0, 0.0, -1e4]], dtype=torch.float64),
                               rtol=rtol, atol=0)
    assert (stats[:, 0] > 0).all()
