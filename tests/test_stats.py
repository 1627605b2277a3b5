"""fastpref.utils.stats.sample_std: the one spread every report (seed tables, verdicts, trade-offs, diversity) states."""
import numpy as np
import pytest

from fastpref.utils.stats import sample_std


def test_sample_std_is_the_ddof1_std():
    values = np.random.default_rng(0).normal(size=7)
    mean = sum(values) / len(values)
    expected = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    assert sample_std(values) == pytest.approx(expected, rel=1e-12)
    assert sample_std([1.0, 3.0]) == pytest.approx(2 ** 0.5)


@pytest.mark.parametrize("values", [[], [4.2], np.array([4.2])])
def test_sample_std_of_fewer_than_two_is_zero(values):
    assert sample_std(values) == 0.0


def test_sample_std_takes_generators_and_returns_a_float():
    assert isinstance(sample_std(x for x in (1, 2, 3)), float)
