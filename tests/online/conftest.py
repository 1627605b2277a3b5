"""Shared by the tests of the online methods (tests/online/)."""

import pytest

torch = pytest.importorskip("torch")

from helpers.threads import single_thread_torch  # noqa: E402,F401 (autouse)
