"""Helpers of the end-to-end tests (no tests here): run the queue, check what serves, read the audit kinds."""

from __future__ import annotations

import time
from pathlib import Path

from tmu_core.service import swap
from tmu_core.state.audit import AuditLog
from tmu_core.forget.dispatcher import Dispatcher, WorkerSettings
from tmu_core.forget.drift import DriftPolicy
from tmu_core.state.jobs import JobStore
from tmu_core.state.versions import VersionRegistry


def run_dispatched(workspace, job_id: str, kill_at: str | None = None, timeout: float = 180.0,
                   max_attempts: int = 5, drift: DriftPolicy = DriftPolicy(), retention_s: float = 0.0):
    """Run the queue with a dispatcher (worker processes) until ``job_id`` is done; return the job."""
    settings = WorkerSettings(device="cpu", kill_at=kill_at, poll_s=0.2, max_attempts=max_attempts,
                              resume_delay_s=0.5, drift=drift, retention_s=retention_s)
    dispatcher = Dispatcher(workspace, settings)
    dispatcher.start()
    jobs = JobStore(workspace.state_db)
    deadline = time.monotonic() + timeout
    try:
        while not jobs.get(job_id).done or _wipe_pending(workspace, jobs.get(job_id)):
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not done after {timeout}s: {jobs.get(job_id)}")
            time.sleep(0.2)
    finally:
        dispatcher.stop(wait_s=120)
    return jobs.get(job_id)


def _wipe_pending(workspace, job) -> bool:
    """A succeeded job's samples still wait for the dispatcher to wipe them."""
    from tmu_core.state.requests import RequestStore

    return job.state == "succeeded" and bool(set(RequestStore(workspace.state_db).pending_wipe()) &
                                             set(job.sample_ids))


def ask_to_forget(workspace, owner: str, options: dict | None = None) -> tuple[str, list[str]]:
    """Forget one owner from model m through the service's own intake (TMU with ``options``, default the fast
    test options); returns (job id, its samples)."""
    from test_service_support import FAST_TMU
    from tmu_core.forget.intake import ForgetRequest
    from tmu_core.forget.submit import submit_request
    from tmu_core.index import TrainingIndex
    from tmu_core.state.store import StateStore

    answer, created = submit_request(workspace, StateStore.open(workspace),
                                     ForgetRequest(owner_ids=(owner,), options=options or FAST_TMU), "m")
    assert created, answer
    with TrainingIndex.open(workspace.index_dir) as index:
        return answer["job_id"], index.ids_for_owners([owner])


def assert_serving(workspace, server, version: int) -> None:
    """The registry, TorchServe's default and TorchServe's registered versions all say ``version``."""
    client = server.management()
    assert VersionRegistry(workspace.state_db).serving("m").version == version
    assert swap.default_version(client, "m") == str(version)
    assert swap.registered_versions(client, "m") == {str(version)}


def audit_kinds(workspace) -> list[str]:
    log = AuditLog(workspace.state_db)
    assert log.verify().ok
    return [r.kind for r in log.records()]


def wait_wiped(workspace, sample_ids: list[str], timeout: float = 30.0) -> None:
    """Wait until the dispatcher wiped every one of ``sample_ids`` from the index (and nothing is queued)."""
    from tmu_core.index import TrainingIndex
    from tmu_core.state.requests import RequestStore

    deadline = time.monotonic() + timeout
    while True:
        with TrainingIndex.open(workspace.index_dir) as index:
            gone = all(index.is_forgotten(s) for s in sample_ids)
        queued = set(RequestStore(workspace.state_db).pending_wipe()) & set(sample_ids)
        if gone and not queued:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"samples not wiped after {timeout}s: still queued {sorted(queued)}")
        time.sleep(0.2)


def files_holding(roots: list[Path], needles: list[bytes]) -> list[str]:
    """Every file under ``roots`` that contains one of ``needles``."""
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                found += [f"{path} holds needle {n}" for n, needle in enumerate(needles) if needle in data]
    return found
