"""Faults at and after the commit, against one real TorchServe: roll forward, never back, after the deletion point.

Jobs run in this process (``run_job`` after ``claim_next``) so that a fault can be injected at one exact place.
A locked database at the commit is waited out by its retries. A full database at the commit commits nothing: the
job is undone and queued again, and runs once there is room. A step after the commit that keeps failing leaves
the job running at that step, committed and never undone, and a later run finishes it; one that fails a few
times is retried in the same run. (A worker killed after the commit is covered by ``test_e2e_kill.py``.)
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

import pytest
from e2e_support import ask_to_forget, assert_serving, audit_kinds

from tmu_core.errors import ServerError
from tmu_core.forget import commit, undo
from tmu_core.forget.pipeline import PipelineConfig, run_job
from tmu_core.forget.retry import RetryPolicy
from tmu_core.index import TrainingIndex
from tmu_core.service import swap
from tmu_core.service.swap import SwapSettings
from tmu_core.state import db
from tmu_core.state.jobs import JobStore
from tmu_core.state.store import StateStore

pytestmark = pytest.mark.integration


def _config(attempts: int) -> PipelineConfig:
    return PipelineConfig(device="cpu", prepare_next=False, swap=SwapSettings(drain_grace_s=0.1),
                          retry=RetryPolicy(attempts=attempts, first_delay_s=0.05, max_delay_s=0.2))



def _claim(workspace, job_id: str) -> None:
    claimed = JobStore(workspace.state_db).claim_next("m")
    assert claimed is not None and claimed.id == job_id, claimed


def _retried(caplog, what: str, error: str) -> list[str]:
    """The retry warnings logged for ``what`` that name ``error``."""
    return [r.getMessage() for r in caplog.records
            if r.name == "tmu_core.forget.retry" and what in r.getMessage() and error in r.getMessage()]


def _before(workspace) -> tuple[int, int]:
    """The version serving now (it changes from test to test) and how many audit records there are."""
    store = StateStore.open(workspace)
    return store.versions.require_serving("m").version, len(store.audit.records())


def _assert_finished(workspace, server, job, source: int, samples: list[str], audit_before: int) -> None:
    """The job succeeded: its version alone serves, the old one is superseded (or purged), the samples are
    forgotten, and the audit log (still verifying) got one forget record, then the swap."""
    store = StateStore.open(workspace)
    assert job.state == "succeeded", job.reason
    assert_serving(workspace, server, job.to_version)
    assert job.to_version > source
    assert store.versions.get("m", source).state in ("superseded", "purged")
    assert set(samples) <= store.versions.forgotten("m")
    assert not store.versions.members("m", job.to_version) & set(samples)
    added = audit_kinds(workspace)[audit_before:]
    assert added.count("forget") == 1 and added[0] == "forget" and added[-1] == "swap", added


def test_commit_waits_out_a_locked_database(served, monkeypatch, caplog) -> None:
    """Another connection holds the state database (BEGIN EXCLUSIVE) for ~2 s as the job commits; each try
    gives up after a 0.2 s busy timeout, and a later try lands."""
    workspace, server = served
    source, audit_before = _before(workspace)
    job_id, samples = ask_to_forget(workspace, "owner-a-0")
    monkeypatch.setattr(db, "BUSY_TIMEOUT_S", 0.2)  # each try gives up fast; the retries outlast the lock
    real_commit, held, released = commit.commit_job, threading.Event(), threading.Event()

    def hold_lock() -> None:
        conn = sqlite3.connect(str(workspace.state_db), isolation_level=None)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            held.set()
            time.sleep(2.0)
            conn.execute("ROLLBACK")
        finally:
            conn.close()
            released.set()

    def commit_while_locked(*args, **kwargs):
        threading.Thread(target=hold_lock, daemon=True).start()
        assert held.wait(10)
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(commit, "commit_job", commit_while_locked)
    caplog.set_level(logging.WARNING, logger="tmu_core.forget.retry")
    _claim(workspace, job_id)
    done = run_job(workspace, job_id, _config(attempts=30))

    assert released.is_set()
    assert _retried(caplog, f"commit of job {job_id}", "database is locked")
    assert done.attempts == 0 and "requeued" not in [s["step"] for s in done.steps]
    _assert_finished(workspace, server, done, source, samples, audit_before)


def test_full_database_at_the_commit_is_undone_and_queued_again(served, monkeypatch, caplog) -> None:
    """No room in the state database while the job commits: nothing commits, the job is undone and requeued;
    once there is room again, the same job runs and succeeds."""
    workspace, server = served
    store = StateStore.open(workspace)
    source, audit_before = _before(workspace)
    versions_before = [(v.version, v.state) for v in store.versions.versions("m")]
    job_id, samples = ask_to_forget(workspace, "owner-b-0")
    real_connect, real_commit, full = db.connect, commit.commit_job, threading.Event()

    def connect_to_a_full_disk(path):
        conn = real_connect(path)
        if full.is_set():  # the file may not grow past its current size: a write that needs a page fails
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count={pages}")
        return conn

    def commit_on_a_full_disk(store, job, plan, result, policy):
        # A commit needs new pages only when it outgrows the room left in the file's pages, which depends on what
        # ran before: 64 KiB more in the job's report makes it need them whatever that room is.
        full.set()
        try:
            return real_commit(store, job, plan, {**result, "padding": "x" * 65536}, policy)
        finally:
            full.clear()

    monkeypatch.setattr(db, "connect", connect_to_a_full_disk)
    monkeypatch.setattr(commit, "commit_job", commit_on_a_full_disk)
    monkeypatch.setattr(undo, "REQUEUE_FIRST_S", 0.0)  # run it again at once, not after the usual back-off
    caplog.set_level(logging.WARNING, logger="tmu_core.forget.retry")
    _claim(workspace, job_id)
    again = run_job(workspace, job_id, _config(attempts=3))

    assert again.state == "queued" and again.attempts == 1, again.reason
    assert_serving(workspace, server, source)
    assert [(v.version, v.state) for v in store.versions.versions("m")] == versions_before
    assert len(audit_kinds(workspace)) == audit_before
    assert not set(samples) & store.versions.forgotten("m")
    assert not workspace.archive_path("m", again.to_version).exists()
    assert not workspace.version_dir("m", again.to_version).exists()
    with TrainingIndex.open(workspace.index_dir) as index:
        assert set(samples) <= set(index.ids("train"))
        assert not any(index.is_forgotten(s) for s in samples)

    monkeypatch.undo()  # the disk is freed
    _claim(workspace, job_id)
    done = run_job(workspace, job_id, _config(attempts=3))
    assert done.attempts == 1 and done.to_version == again.to_version  # the reserved number is kept
    _assert_finished(workspace, server, done, source, samples, audit_before)

    # Each failed try, and the requeued job, name the real cause (a rollback of the failed transaction must
    # not replace it with an error of its own).
    tried = _retried(caplog, f"commit of job {job_id}", "")
    assert len(_retried(caplog, f"commit of job {job_id}", "database or disk is full")) == 2, tried
    assert "step 'commit' failed: database or disk is full" in again.reason, again.reason


def test_a_step_after_the_commit_that_keeps_failing_is_resumed_not_undone(served, monkeypatch) -> None:
    """TorchServe refuses to make the new version default, on every try: the job stays committed and running;
    run again once TorchServe answers, it finishes."""
    workspace, server = served
    store = StateStore.open(workspace)
    source, audit_before = _before(workspace)
    job_id, samples = ask_to_forget(workspace, "owner-c-0")
    calls: list[int] = []

    def refusing_serve_only(workspace, model, keep, keep_archive, drop, settings):
        calls.append(keep)
        raise ServerError(f"TorchServe refused to make {model} version {keep} the default")

    monkeypatch.setattr(swap, "serve_only", refusing_serve_only)
    _claim(workspace, job_id)
    stuck = run_job(workspace, job_id, _config(attempts=3))

    assert stuck.state == "running" and stuck.step == "set_default", (stuck.state, stuck.step, stuck.reason)
    assert "step 'set_default' after the commit failed, to be resumed" in stuck.reason
    assert calls == [stuck.to_version] * 3  # retried, and never asked to serve the old version again (an undo)
    assert stuck.attempts == 0 and "requeued" not in [s["step"] for s in stuck.steps]
    assert commit.is_committed(store, stuck)
    assert store.versions.require_serving("m").version == stuck.to_version
    assert store.versions.get("m", source).state == "superseded"
    assert set(samples) <= store.versions.forgotten("m")
    assert audit_kinds(workspace)[audit_before:] == ["forget"]
    client = server.management()
    assert swap.registered_versions(client, "m") == {str(source), str(stuck.to_version)}
    assert swap.default_version(client, "m") == str(source)  # not yet switched, and nothing switched back
    assert workspace.archive_path("m", stuck.to_version).exists()
    assert (workspace.version_dir("m", stuck.to_version) / "checkpoint.pt").exists()

    monkeypatch.undo()  # TorchServe answers again
    done = run_job(workspace, job_id, _config(attempts=3))
    assert done.attempts == 0 and done.to_version == stuck.to_version
    _assert_finished(workspace, server, done, source, samples, audit_before)


def test_a_step_after_the_commit_that_fails_a_few_times_is_retried(served, monkeypatch) -> None:
    """The finishing transaction meets a full database twice: the third try lands, in the same run."""
    workspace, server = served
    source, audit_before = _before(workspace)
    job_id, samples = ask_to_forget(workspace, "owner-d-0")
    real_finish, calls = JobStore.finish, []

    def finish_on_a_full_disk(self, job, state, *args, **kwargs):
        if state == "succeeded":
            calls.append(job)
            if len(calls) <= 2:
                raise sqlite3.OperationalError("database or disk is full")
        return real_finish(self, job, state, *args, **kwargs)

    monkeypatch.setattr(JobStore, "finish", finish_on_a_full_disk)
    _claim(workspace, job_id)
    done = run_job(workspace, job_id, _config(attempts=4))

    assert calls == [job_id] * 3
    # One swap record: the failed tries rolled theirs back with the job's success.
    _assert_finished(workspace, server, done, source, samples, audit_before)


def test_the_next_version_is_prepared_while_the_job_commits_and_a_failed_job_leaves_none(served, monkeypatch) -> None:
    """The new version's artifacts are prepared in a thread from the saved checkpoint on. When the register step
    then fails, the undo waits for that thread and deletes what it wrote with the version's folder. The job that
    lands leaves them ready, and the next job uses them instead of preparing again."""
    from dataclasses import replace

    from tmu_core.forget import executor, pipeline
    from tmu_core.forget.artifacts import artifacts_dir

    workspace, server = served
    source, audit_before = _before(workspace)
    job_id, samples = ask_to_forget(workspace, "owner-a-1")
    real_prepare, preparing, prepared = executor._prepare_version, threading.Event(), threading.Event()

    def slow_prepare(*args):  # started ahead, and still running when the register step fails
        preparing.set()
        time.sleep(1.0)
        try:
            return real_prepare(*args)
        finally:
            prepared.set()

    def failing_register(run, loaded, package):
        assert preparing.wait(30)
        raise ServerError("TorchServe did not load the new version")

    monkeypatch.setattr(executor, "_prepare_version", slow_prepare)
    monkeypatch.setattr(pipeline, "_register", failing_register)
    monkeypatch.setattr(undo, "REQUEUE_FIRST_S", 0.0)
    config = replace(_config(attempts=3), prepare_next=True)
    _claim(workspace, job_id)
    again = run_job(workspace, job_id, config)

    assert again.state == "queued" and "did not load the new version" in again.reason, again.reason
    assert prepared.wait(60)
    assert not workspace.version_dir("m", again.to_version).exists()
    assert_serving(workspace, server, source)

    monkeypatch.undo()
    _claim(workspace, job_id)
    done = run_job(workspace, job_id, config)
    _assert_finished(workspace, server, done, source, samples, audit_before)
    assert done.followup["artifacts"] == "ready" and done.followup["preparation"] == "incremental", done.followup
    assert artifacts_dir(workspace, "m", done.to_version).is_dir()

    next_id, _ = ask_to_forget(workspace, "owner-b-1")
    _claim(workspace, next_id)
    after = run_job(workspace, next_id, _config(attempts=3))
    assert after.state == "succeeded", after.reason
    info = after.result["unlearn_details"]["prepared_info"]
    assert (info["kind"], info["parent"]) == ("incremental", f"m:v{source}"), info  # read, not built again
