"""Ray Serve as the serving backend, on a real loopback cluster (a head and two worker nodes): token auth, the
same answers as the TorchServe handler's code, and a swap and a rollback under 16 clients with no failed request.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import requests

from ray_support import Clients, make_versions, png
from tmu_core.serving.backend import BackendSpec, write_backend

pytestmark = pytest.mark.ray

MODEL = "m"
CLIENTS = 16


@pytest.fixture(scope="module")
def served(serve_cluster, serve_port, tmp_path_factory):
    """A workspace whose ``backend.json`` points at the cluster, serving v1 on 2 replicas."""
    from tmu_core.service import swap

    workspace = make_versions(tmp_path_factory.mktemp("ray_serve"), MODEL)
    spec = BackendSpec(kind="ray", address=serve_cluster.address, http_port=serve_port, replicas=2)
    write_backend(workspace.serve_dir, spec)
    backend = swap.backend_for(workspace)
    swap.serve_only(workspace, MODEL, 1, workspace.archive_path(MODEL, 1), None, swap.SwapSettings())
    try:
        yield workspace, backend
    finally:
        backend.undeploy(MODEL)


def _url(backend) -> str:
    return f"{backend.spec.url}/predictions/{MODEL}"


def _serving(workspace, backend, version: int) -> None:
    """Put ``version`` in place (registry and replicas) when an earlier test left another one."""
    from tmu_core.service import swap
    from tmu_core.state.versions import VersionRegistry

    registry = VersionRegistry(workspace.state_db)
    if registry.require_serving(MODEL).version != version:
        current = registry.require_serving(MODEL).version
        swap.serve_only(workspace, MODEL, version, workspace.archive_path(MODEL, version), current,
                        swap.SwapSettings(drain_grace_s=0.1))
        registry.set_state(MODEL, current, "superseded")
        registry.set_state(MODEL, version, "serving")


def _check_under_load(load, switched_at: float, version: int) -> None:
    assert load.errors == [] and load.failed == [], f"failed requests: {load.failed[:5]} {load.errors[:5]}"
    after = [a for a in load.answers if a[0] > switched_at]
    assert after, "no request was sent after the swap returned"
    assert {a[2] for a in after} == {str(version)}, "a request sent after the swap got another version"


def test_requests_need_the_bearer_token(served):
    _, backend = served
    body = png(0)
    assert requests.post(_url(backend), data=body, timeout=30).status_code == 401
    wrong = requests.post(_url(backend), data=body, headers={"Authorization": "Bearer not-the-token"}, timeout=30)
    assert wrong.status_code == 401 and "Bearer" in wrong.json()["message"]
    assert requests.get(_url(backend), headers={"Authorization": "Basic x"}, timeout=30).status_code == 401
    assert requests.post(_url(backend), data=body, headers=backend.headers, timeout=30).status_code == 200


def test_answers_match_the_classifier_service(served, tmp_path):
    from tmu_core.serving.inference import ClassifierService
    from tmu_core.serving.ray_serve import unpack_archive

    workspace, backend = served
    version = int(backend.default_version(MODEL))
    folder, model_yaml = unpack_archive(workspace.archive_path(MODEL, version).read_bytes(), MODEL, version)
    direct = ClassifierService.from_model_dir(folder, model_yaml, None, str(version))
    for seed in range(4):
        body = png(seed)
        expected = direct.answer([{"body": body}])[0]
        reply = requests.post(_url(backend), data=body, headers=backend.headers, timeout=30)
        assert reply.status_code == expected.status == 200
        got = reply.json()
        assert got["model_version"] == expected.body["model_version"] == str(version)
        assert [p["class"] for p in got["predictions"]] == [p["class"] for p in expected.body["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in got["predictions"]],
                                   [p["probability"] for p in expected.body["predictions"]], atol=1e-5)
    bad = requests.post(_url(backend), data=b"not an image", headers=backend.headers, timeout=30)
    assert bad.status_code == 400
    assert bad.json() == direct.answer([{"body": b"not an image"}])[0].body


def test_swap_v1_to_v2_under_16_clients(served):
    """The forget pipeline's steps after its commit: register, set_default (serve_only), drain, unregister."""
    from tmu_core.service import swap
    from tmu_core.state.versions import VersionRegistry

    workspace, backend = served
    _serving(workspace, backend, 1)
    settings = swap.SwapSettings(drain_grace_s=0.2)
    with Clients(_url(backend), backend.headers, png(1), threads=CLIENTS) as clients:
        time.sleep(1.0)
        swap.register(workspace, MODEL, 2, workspace.archive_path(MODEL, 2), settings)
        swap.serve_only(workspace, MODEL, 2, workspace.archive_path(MODEL, 2), None, settings)
        swap.drain(workspace, MODEL, 1, settings)
        assert swap.unregister(workspace, MODEL, 1)
        switched_at = time.monotonic()
        time.sleep(1.0)
    load = clients.load
    registry = VersionRegistry(workspace.state_db)
    registry.set_state(MODEL, 1, "superseded")
    registry.set_state(MODEL, 2, "serving")
    _check_under_load(load, switched_at, 2)
    print(f"swap: {len(load.answers)} requests, none failed; versions {sorted({a[2] for a in load.answers})}")
    assert {a[2] for a in load.answers} == {"1", "2"}
    check = backend.wait_replicas(MODEL, 2, timeout_s=30)
    assert len(check.answers) == 2 and set(check.answers.values()) == {"2"}
    assert len(set(check.nodes.values())) == 2, f"both replicas on one node: {check.nodes}"
    assert {a[3] for a in load.answers if a[0] > switched_at} <= set(check.answers)
    assert swap.registered_versions(backend, MODEL) == {"2"}


def test_rollback_v2_to_v1_under_16_clients(served):
    from tmu_core.service.rollback import rollback

    workspace, backend = served
    _serving(workspace, backend, 2)
    with Clients(_url(backend), backend.headers, png(2), threads=CLIENTS) as clients:
        time.sleep(1.0)
        result = rollback(workspace, MODEL, 1)
        switched_at = time.monotonic()
        time.sleep(1.0)
    assert (result.from_version, result.to_version) == (2, 1)
    _check_under_load(clients.load, switched_at, 1)
    print(f"rollback: {len(clients.load.answers)} requests, none failed")
    check = backend.wait_replicas(MODEL, 1, timeout_s=30)
    assert len(check.answers) == 2 and set(check.answers.values()) == {"1"}
    assert backend.default_version(MODEL) == "1"
