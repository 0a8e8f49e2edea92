import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# One intra-op thread: the suite's shapes are tiny (latency-bound), and with two OpenMP threads a
# busy 2-core machine slows them 10x or more (threads spin against each other).
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

settings.register_profile(
    "moelab", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("moelab")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
