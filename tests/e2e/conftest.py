"""A real TorchServe (token auth on, free loopback ports) serving a tiny model v1, started once per module."""

from __future__ import annotations

import pytest

from test_service_support import make_index, make_v1, make_workspace, torchserve_config
from tmu_core.serving import TorchServe


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("served")
    workspace = make_workspace(tmp)
    make_index(workspace, tmp).close()
    v1 = make_v1(workspace)
    server = TorchServe(workspace, torchserve_config(workspace.model_store))
    server.start([f"m={v1.archive.name}"])
    try:
        server.wait_ready("m", timeout=120)
        yield workspace, server
    finally:
        server.stop()
