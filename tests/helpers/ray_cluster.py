"""One local Ray cluster per test module: 2 CPUs, no dashboard, no auth, no usage reports."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    import ray  # in the dev extra: make test installs it

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
