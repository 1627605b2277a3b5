"""Claims in words: is model A better than model B, given how much the scores move without any real difference?

Two sources of noise are combined: the evaluation's seed-to-seed spread (the base evaluated on each evaluation
seed alone, fastpref.eval.minigeneval.MiniGenEvalResult.seed_spread) and the training-seed spread of each side
(the std of its score over models trained with different seeds; 0 for a single model such as the base). A claim
is shown when the gain exceeds sqrt(eval_spread^2 + std_a^2 + std_b^2) and, when a paired bootstrap interval of
the difference is given, that interval lies above zero too; otherwise it is reported as not shown, never tuned.
"""

from __future__ import annotations

import math
from typing import Any, Sequence


def combined_spread(eval_spread: float, std_a: float, std_b: float) -> float:
    return math.sqrt(eval_spread**2 + std_a**2 + std_b**2)


def judge_claim(mean_a: float, std_a: float, mean_b: float, std_b: float, eval_spread: float,
                interval: Sequence[float] | None = None, names: tuple[str, str] = ("A", "B")) -> dict[str, Any]:
    """The verdict on "A > B" (scores in [0, 1]); `interval`: a paired bootstrap 95% interval of A - B, if any."""
    a, b = names
    gain = mean_a - mean_b
    spread = combined_spread(eval_spread, std_a, std_b)
    above_spread = gain > spread
    interval_ok = interval is None or interval[0] > 0
    if above_spread and interval_ok:
        verdict = "shown"
        text = f"{a} > {b} by {100 * gain:+.1f} points, more than the combined spread ({100 * spread:.1f})"
    elif gain < -spread and (interval is None or interval[1] < 0):
        verdict = "reversed"
        text = f"not shown: {b} > {a} by {100 * -gain:.1f} points, more than the combined spread ({100 * spread:.1f})"
    else:
        verdict = "not shown"
        why = (f"the gain {100 * gain:+.1f} is within the combined spread ({100 * spread:.1f})" if not above_spread
               else "the paired interval includes zero")
        text = f"not shown: {why}"
    if interval is not None:
        text += f"; paired bootstrap 95% interval [{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}]"
    return {"verdict": verdict, "gain": gain, "combined_spread": spread,
            "interval": list(interval) if interval is not None else None, "text": text}
