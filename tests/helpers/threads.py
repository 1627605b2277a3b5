"""The one-thread fixture of the test folders that train or sample (tests/train, tests/online, tests/rewards)."""

import pytest


@pytest.fixture(autouse=True)
def single_thread_torch():
    """One intra-op thread: the machine's few cores are shared, and 1-thread results compare across processes."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
