"""The spread every report states: one definition, so a seed table, a verdict and a plot never disagree on it."""
from __future__ import annotations

from typing import Iterable

import numpy as np


def sample_std(values: Iterable[float]) -> float:
    """The sample standard deviation (ddof 1) of the values; 0.0 for fewer than two, where it is undefined and a
    report has no spread to state (one training seed, one evaluation-seed fold)."""
    array = np.asarray(list(values), dtype=float)
    return float(np.std(array, ddof=1)) if array.size > 1 else 0.0
