import os
import zlib

import pytest
import torch
from hypothesis import HealthCheck, settings

# Quick property tests drawn the same way in every run (CI passes or fails on the code, not on the draw);
# HYPOTHESIS_PROFILE=thorough draws 10x as many fresh examples each run, to hunt for new failures.
settings.register_profile("default", max_examples=30, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed_global_rng(request):
    """Tests that draw from torch's global generator see the same numbers in every run and order."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (or set OPDCORE_RUN_SLOW=1)")


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    run_slow = config.getoption("--runslow") or os.environ.get("OPDCORE_RUN_SLOW") == "1"
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU and a CUDA build of opdcore")
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow or OPDCORE_RUN_SLOW=1")
    for item in items:
        if "cuda" in item.keywords and not has_gpu:
            item.add_marker(skip)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
