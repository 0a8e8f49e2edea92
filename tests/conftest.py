import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI has 2 cores; keep intra-op threads fixed so timings and numerics are stable.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

settings.register_profile(
    "moelab", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("moelab")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
