"""Shared by the tests of the online methods (tests/online/)."""

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def single_thread_torch():
    """One intra-op thread: the machine's few cores are shared, and 1-thread results compare across processes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
