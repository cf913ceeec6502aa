"""A real Ray cluster on loopback for the Ray Serve tests: a head (no CPUs: it runs only Ray's and Serve's own
actors) and two worker nodes of one CPU each, started once per session and shut down at the end.

Ray's usage stats and dashboard are off. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps every node and the
driver on 127.0.0.1 on hosts that also have a routable address.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

WORKER_NODES = 2


@pytest.fixture(scope="session")
def serve_port() -> int:
    """Ray Serve's HTTP port for the session (Serve keeps the port it first started with)."""
    from ray_support import free_port

    return free_port()


@pytest.fixture(scope="session")
def ray_cluster():
    """The cluster (``ray.cluster_utils.Cluster``); this process is connected to it as a driver."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "node_ip_address": "127.0.0.1"})
    try:
        for _ in range(WORKER_NODES):
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"tmu_worker": 1})
        cluster.wait_for_nodes(timeout=120)
        ray.init(address=cluster.address, namespace="tmu", _node_ip_address="127.0.0.1", log_to_driver=False)
        yield cluster
    finally:
        try:
            from ray import serve

            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
