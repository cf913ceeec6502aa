"""End to end on a real TorchServe: forget request over HTTP -> new default version -> index and audit -> rollback."""

from __future__ import annotations

import json
import time

import pytest
import requests

from e2e_support import assert_serving, audit_kinds, wait_wiped
from test_service_support import FAST_TMU
from tmu_core.forget.artifacts import artifacts_dir
from tmu_core.index import TrainingIndex
from tmu_core.state.versions import VersionRegistry
from tmu_core.service.server import ServiceConfig, in_process
from tmu_core.forget.dispatcher import WorkerSettings
from tmu_core.serving import InferenceClient

pytestmark = pytest.mark.integration


def _wait(service, job_id: str, timeout: float = 180, until=lambda job: job["state"] in ("succeeded", "failed")
          ) -> dict:
    """The job as the service shows it once ``until`` holds (by default: once it has finished)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{service.url}/jobs/{job_id}", headers=service.headers(), timeout=10).json()
        if until(job):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not get there in {timeout:.0f}s: {job}")


def test_forget_swap_index_audit_rollback(served) -> None:
    workspace, server = served
    infer = InferenceClient(server.config.url("inference"), server.keys().inference)
    image = (workspace.home.parent / "tree" / "test" / "a" / "0000.png").read_bytes()
    assert infer.predict("m", image).model_version == "1"
    worker = WorkerSettings(device="cpu", poll_s=0.2, retention_s=3600)  # keep v1's files: the test rolls back
    with in_process(workspace, ServiceConfig(worker=worker)) as service:
        resp = requests.post(f"{service.url}/forget/m", headers=service.headers(), timeout=30,
                             json={"owner_ids": ["owner-a-0"], "sample_ids": ["train/b/0000"], "options": FAST_TMU})
        assert resp.status_code == 202, resp.text
        job = _wait(service, resp.json()["job_id"])
        assert job["state"] == "succeeded", job["reason"]
        assert [s["step"] for s in job["steps"]][-5:] == ["commit", "set_default", "drain", "unregister_old",
                                                          "cleanup"] and job["progress"] == 1.0
        forgotten = job["sample_ids"]
        assert forgotten == ["train/a/0000", "train/a/0001", "train/a/0002", "train/b/0000"]

        assert_serving(workspace, server, 2)
        assert infer.predict("m", image).model_version == "2"
        wait_wiped(workspace, forgotten)
        with TrainingIndex.open(workspace.index_dir) as index:
            assert index.verify().ok
        assert audit_kinds(workspace) == ["forget", "swap", "wipe"]
        registry = VersionRegistry(workspace.state_db)
        assert registry.members("m", 2) == registry.members("m", 1) - set(forgotten)
        assert registry.forgotten("m") == set(forgotten)
        report = json.loads((workspace.version_dir("m", 2) / "report.json").read_text())
        assert report["samples"] == 4 and report["metrics"]["forget_size"] == 4
        assert report["timings"]["request_to_serving"] > 0
        assert (workspace.version_dir("m", 2) / "report.png").stat().st_size > 0
        # v2's state is made from v1's while v2 is registered, and is ready some time after the job succeeded
        prepared = _wait(service, job["id"], 120, lambda job: (job.get("followup") or {}).get("artifacts") == "ready")
        prepared = prepared["followup"]
        assert prepared["preparation"] == "incremental", prepared
        manifest = json.loads((artifacts_dir(workspace, "m", 2) / "manifest.json").read_text())
        assert manifest["info"]["parent"] == "m:v1", manifest["info"]
        assert [r.state for r in VersionRegistry(workspace.state_db).versions("m")] == ["superseded", "serving"]

        url = f"{service.url}/models/m/rollback"
        refused = requests.post(url, json={"to_version": 1}, headers=service.headers(), timeout=30)
        assert refused.status_code == 409 and job["id"] in refused.json()["error"]
        assert_serving(workspace, server, 2)
        done = requests.post(url, json={"to_version": 1, "undo_forgets": True}, headers=service.headers(),
                             timeout=120)
        assert done.status_code == 200, done.text
        assert done.json()["undone_requests"] == [job["id"]]
        assert done.json()["owed"] == 4 and done.json()["owed_pixels_wiped"] == 4
        assert "retrain" in done.json()["note"]
        again = requests.post(f"{service.url}/forget/m", headers=service.headers(), timeout=30,
                              json={"sample_ids": forgotten})
        assert again.status_code == 409 and "retrain" in again.json()["error"]
    assert_serving(workspace, server, 1)
    assert infer.predict("m", image).model_version == "1"
    assert audit_kinds(workspace) == ["forget", "swap", "wipe", "rollback"]
    assert VersionRegistry(workspace.state_db).owed("m") == set(forgotten)
    assert [r.state for r in VersionRegistry(workspace.state_db).versions("m")] == ["serving", "rolled_back"]
