"""Job workers without TorchServe: a failing step, a dead worker found at restart, a queued job started."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from test_service_support import FAST_TMU, make_index, make_v1, make_workspace
from tmu_core.index import TrainingIndex
from tmu_core.state.audit import AuditLog
from tmu_core.forget.dispatcher import Dispatcher, WorkerSettings, pid_runs_job, worker_command
from tmu_core.state.jobs import JobStore
from tmu_core.forget.pipeline import PipelineConfig, run_job
from tmu_core.state.versions import VersionRegistry


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("worker")
    ws = make_workspace(tmp)
    make_index(ws, tmp, train=8, test=4).close()
    make_v1(ws, epochs=3)
    return ws


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_failed_step_is_undone_and_reported(workspace) -> None:
    """Without a TorchServe, the job gets through load..package and fails at register; v2's files go away."""
    store = JobStore(workspace.state_db)
    job = store.submit("m", ["train/a/0000", "train/a/0001"], options={"method": "tmu", **FAST_TMU})
    store.claim_next("m")
    done = run_job(workspace, job.id, PipelineConfig(device="cpu", prepare_next=False, max_attempts=1))
    assert done.state == "failed"
    assert done.reason.startswith("step 'register' failed: no TorchServe config")
    assert "undoing it failed too" in done.reason and "(attempt 1 of 1, the last)" in done.reason
    assert [s["step"] for s in done.steps] == ["load", "unlearn", "evaluate", "save", "package", "register"]
    assert done.from_version == 1 and done.to_version == 2
    assert not workspace.archive_path("m", 2).exists() and not workspace.version_dir("m", 2).exists()
    assert (workspace.version_dir("m", 1) / "artifacts").is_dir()
    with TrainingIndex.open(workspace.index_dir) as index:
        assert not index.is_forgotten("train/a/0000")
    assert AuditLog(workspace.state_db).records() == []
    assert VersionRegistry(workspace.state_db).serving("m").version == 1


def test_a_job_that_fails_before_its_commit_is_queued_again(workspace) -> None:
    """An accepted request must not be lost to a passing failure: the job is undone and queued again."""
    store = JobStore(workspace.state_db)
    job = store.submit("m", ["train/a/0002"], options={"method": "tmu", **FAST_TMU})
    store.claim_next("m")
    again = run_job(workspace, job.id, PipelineConfig(device="cpu", prepare_next=False, max_attempts=3))
    assert again.state == "queued" and again.attempts == 1 and again.not_before > again.created_at
    assert again.steps[-1]["step"] == "requeued" and "no TorchServe config" in again.steps[-1]["reason"]
    assert store.claim_next("m") is None  # not before its back-off has passed
    assert not workspace.archive_path("m", again.to_version).exists()
    assert VersionRegistry(workspace.state_db).serving("m").version == 1
    store.finish(job.id, "failed", reason="test cleanup")


def test_restart_fails_orphaned_job_and_runs_queued_one(workspace) -> None:
    store = JobStore(workspace.state_db)
    orphan = store.submit("m", ["train/b/0000"])
    store.claim_next("m")
    store.enter_step(orphan.id, "unlearn", 0.1)
    store.set_fields(orphan.id, worker_pid=_dead_pid(), from_version=1, to_version=2)
    leftover = workspace.version_dir("m", 2)
    leftover.mkdir(parents=True)
    (leftover / "checkpoint.pt").write_bytes(b"half-written")
    queued = store.submit("m", ["train/b/0001"])

    dispatcher = Dispatcher(workspace, WorkerSettings(device="cpu", kill_at="load", poll_s=0.1, max_attempts=1))
    dispatcher.start()
    try:
        failed = store.get(orphan.id)
        assert failed.state == "failed" and "was gone when the service started" in failed.reason
        assert "no change was committed" in failed.reason and not leftover.exists()
        deadline = time.monotonic() + 60
        while not store.get(queued.id).done and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        dispatcher.stop(wait_s=30)
    ran = store.get(queued.id)
    assert ran.state == "failed" and "exited with code 9 during step 'load'" in ran.reason
    assert ran.worker_pid and not pid_runs_job(ran.worker_pid, ran.id)


def test_live_worker_is_adopted_not_failed(workspace) -> None:
    store = JobStore(workspace.state_db)
    job = store.submit("m", ["train/c/0000"])
    store.claim_next("m")
    # A stand-in process whose command line names the worker module and the job, as a real worker's does.
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "tmu_core.forget.worker",
                                 "--job", job.id])
    try:
        store.set_fields(job.id, worker_pid=stand_in.pid)
        dispatcher = Dispatcher(workspace, WorkerSettings(poll_s=0.1))
        dispatcher.recover_orphans()
        assert store.get(job.id).state == "running"
        assert dispatcher.running_workers() == {job.id: stand_in.pid}
    finally:
        stand_in.kill()
        stand_in.wait()
    store.finish(job.id, "failed", reason="test cleanup")


def test_worker_command_line(workspace) -> None:
    cmd = worker_command(workspace, "fj-x", WorkerSettings(device="cuda:1", kill_at="drain"))
    assert cmd[1:3] == ["-m", "tmu_core.forget.worker"]
    assert cmd[cmd.index("--job") + 1] == "fj-x" and cmd[cmd.index("--device") + 1] == "cuda:1"
    assert cmd[cmd.index("--home") + 1] == str(workspace.home) and cmd[-2:] == ["--kill-at", "drain"]
    assert os.path.basename(cmd[0]).startswith("python")


def test_a_version_past_the_hold_level_waits_for_the_retrain_instead_of_serving(workspace, monkeypatch) -> None:
    """The job's new version would cost 5 points against exact v1 (hold level 2): it queues the due retrain, is
    undone without losing an attempt and waits; once that retrain has failed it goes on and serves its version (here
    it fails at register, where a TorchServe would take it)."""
    import dataclasses

    from tmu_core.forget import pipeline
    from tmu_core.forget.drift import DriftPolicy

    real_evaluate = pipeline._evaluate

    def five_points_worse(run, loaded, unlearned):
        metrics = real_evaluate(run, loaded, unlearned)
        # Without the per-image masks the record has no error: the 5 points are taken as measured.
        return dataclasses.replace(metrics, acc_test_after=metrics.acc_test_before - 5, test_right_after="")

    monkeypatch.setattr(pipeline, "_evaluate", five_points_worse)
    store = JobStore(workspace.state_db)
    job = store.submit("m", ["train/d/0000"], options={"method": "tmu", **FAST_TMU})
    config = PipelineConfig(device="cpu", prepare_next=False, max_attempts=1,
                            drift=DriftPolicy(budget=1.0, hold_at=2.0))
    store.claim_next("m")
    held = run_job(workspace, job.id, config)
    retrain = store.retrains("m")[0]
    assert retrain.state == "queued" and retrain.options["requested_by"] == "drift budget"
    assert held.state == "queued" and held.attempts == 0 and held.not_before is None
    assert [s["step"] for s in held.steps] == ["load", "unlearn", "evaluate", "held"]
    assert held.steps[-1]["retrain"] == retrain.id
    assert "5.00 points of ACC_Dtest below exact v1 (hold level 2.0)" in held.reason
    assert not workspace.version_dir("m", held.to_version).exists()
    # The held job let go of its number.
    assert VersionRegistry(workspace.state_db).reserve("m", "other", version=held.to_version)
    assert VersionRegistry(workspace.state_db).serving("m").version == 1
    with TrainingIndex.open(workspace.index_dir) as index:
        assert not index.is_forgotten("train/d/0000")
    # The dispatcher starts none of the model's forget jobs while that retrain is on its way, whatever its policy.
    dispatcher = Dispatcher(workspace, WorkerSettings(poll_s=0.1))
    assert store.held_for("m") == {retrain.id} and dispatcher._held("m")
    store.finish(retrain.id, "failed", reason="test: no recipe")
    assert not dispatcher._held("m")
    store.claim_next("m")
    served = run_job(workspace, job.id, config)
    assert [s["step"] for s in served.steps][4:] == ["load", "unlearn", "evaluate", "save", "package", "register"]
    assert served.state == "failed" and "no TorchServe config" in served.reason
