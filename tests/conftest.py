"""Shared fixtures: RNG restored after every test, CUDA tests skipped without CUDA, a loopback Ray cluster."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

# Read by Ray when it is imported: on a machine with a routable address Ray would bind and advertise it; these keep
# every socket on loopback, and usage reporting off. Processes the tests start inherit them.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")  # a loaded 2-core machine starts nodes slowly


@pytest.fixture(autouse=True)
def _restore_rng_state():
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(py_state)
    np.random.set_state(np_state)
    torch.set_rng_state(torch_state)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray cluster on loopback, once per session: a head with no CPUs (nothing is scheduled there) and one
    worker node of 2 CPUs, dashboard off; yields (cluster, worker node). Tests may add and remove nodes."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    try:
        worker = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        yield cluster, worker
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
