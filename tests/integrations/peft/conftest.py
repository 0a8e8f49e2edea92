import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The tiny models here are latency-bound: one intra-op thread is fastest, and far faster when
    # the machine is oversubscribed.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
