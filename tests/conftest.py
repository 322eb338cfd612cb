import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Deterministic, quick property tests; CI can raise the count with HYPOTHESIS_PROFILE=thorough.
settings.register_profile("default", max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU and a CUDA build of opdcore")
    for item in items:
        if "cuda" in item.keywords and not has_gpu:
            item.add_marker(skip)
