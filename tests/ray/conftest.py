"""Fixtures of the Ray Serve tests, on the session's loopback Ray cluster (``ray_cluster`` in tests/conftest.py):
a second worker node so that replicas spread over two nodes, and Serve's HTTP port for the session."""

from __future__ import annotations

import pytest

NAMESPACE = "tmu-serve"


@pytest.fixture(scope="session")
def serve_port() -> int:
    """Ray Serve's HTTP port for the session (Serve keeps the port it first started with)."""
    from ray_support import free_port

    return free_port()


@pytest.fixture(scope="session")
def serve_cluster(ray_cluster):
    """The session's cluster with one more worker node (1 CPU); this process is connected to it as a driver.
    Serve is shut down and the node removed at the end."""
    import ray

    cluster, _ = ray_cluster
    node = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes(timeout=120)
    if not ray.is_initialized():
        ray.init(address=cluster.address, namespace=NAMESPACE, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        yield cluster
    finally:
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
        cluster.remove_node(node)
