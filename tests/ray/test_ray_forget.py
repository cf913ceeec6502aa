"""A forget job on a workspace served by Ray Serve: the dispatcher's worker process unlearns, packages, stages
the new version in the cluster, commits, rolls it out and retires v1, while 16 clients predict; none fails and
every replica answers v2 at the end."""

from __future__ import annotations

import time

import pytest

from ray_support import Clients
from test_service_support import FAST_TMU, make_index, make_v1, make_workspace
from tmu_core.serving.backend import BackendSpec, write_backend

pytestmark = pytest.mark.ray


def _run_queue(workspace, job_id: str, timeout: float = 300.0):
    from tmu_core.forget.dispatcher import Dispatcher, WorkerSettings
    from tmu_core.state.jobs import JobStore

    dispatcher = Dispatcher(workspace, WorkerSettings(device="cpu", poll_s=0.2, resume_delay_s=0.5))
    dispatcher.start()
    jobs, deadline = JobStore(workspace.state_db), time.monotonic() + timeout
    try:
        while not jobs.get(job_id).done:
            assert time.monotonic() < deadline, f"job {job_id} not done after {timeout}s: {jobs.get(job_id)}"
            time.sleep(0.3)
    finally:
        dispatcher.stop(wait_s=120)
    return jobs.get(job_id)


def test_a_forget_job_swaps_every_replica_under_load(serve_cluster, serve_port, tmp_path):
    from tmu_core.forget.intake import ForgetRequest
    from tmu_core.forget.submit import submit_request
    from tmu_core.service import swap
    from tmu_core.state.store import StateStore
    from tmu_core.state.versions import VersionRegistry

    workspace = make_workspace(tmp_path)
    make_index(workspace, tmp_path).close()
    v1 = make_v1(workspace)
    write_backend(workspace.serve_dir, BackendSpec(kind="ray", address=serve_cluster.address, http_port=serve_port))
    backend = swap.backend_for(workspace)
    swap.serve_only(workspace, "m", 1, v1.archive, None, swap.SwapSettings())
    image = (tmp_path / "tree" / "test" / "a" / "0000.png").read_bytes()
    url = f"{backend.spec.url}/predictions/m"
    try:
        answer, created = submit_request(workspace, StateStore.open(workspace),
                                         ForgetRequest(owner_ids=("owner-a-0",), options=FAST_TMU), "m")
        assert created, answer
        with Clients(url, backend.headers, image, threads=16) as clients:
            job = _run_queue(workspace, answer["job_id"])
            done_at = time.monotonic()
            time.sleep(1.0)
        assert job.state == "succeeded", job.reason
        load = clients.load
        assert load.errors == [] and load.failed == [], f"{load.failed[:5]} {load.errors[:5]}"
        assert {a[2] for a in load.answers if a[0] > done_at} == {"2"}
        assert VersionRegistry(workspace.state_db).serving("m").version == 2
        assert backend.default_version("m") == "2" and backend.registered_versions("m") == {"2"}
        check = backend.wait_replicas("m", 2, timeout_s=30)
        assert len(check.answers) == 2 and set(check.answers.values()) == {"2"}
        print(f"forget job under load: {len(load.answers)} requests, none failed; "
              f"timings {job.result.get('timings')}")
    finally:
        backend.undeploy("m")
