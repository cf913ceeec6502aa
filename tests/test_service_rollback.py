"""Rollback refusals and purge, on a real SQLite file (the TorchServe side is covered in tests/e2e)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from test_service_support import make_workspace, record_fake_version
from tmu_core.errors import CheckpointError, ConflictError, InvalidInputError, ModelNotFoundError
from tmu_core.state.audit import AuditLog
from tmu_core.state.db import write_tx
from tmu_core.state.jobs import JobStore
from tmu_core.state.versions import VersionRegistry
from tmu_core.service.rollback import parse_duration, purge, rollback, undone_forgets


def _derived(workspace, model: str, version: int, parent: int, request: str, members: list[str]):
    folder = workspace.version_dir(model, version)
    folder.mkdir(parents=True)
    archive = workspace.archive_path(model, version)
    archive.write_bytes(b"mar%d" % version)
    (folder / "checkpoint.pt").write_bytes(b"ckpt%d" % version)
    (folder / "artifacts").mkdir()
    (folder / "report.json").write_text("{}")
    registry = VersionRegistry(workspace.state_db)
    record = registry.record_version(model, version, archive, folder / "checkpoint.pt", None, parent=parent,
                                     forget_request=request, metrics={}, members=members)
    with write_tx(workspace.state_db) as conn:
        previous = registry.members(model, parent)
        registry.membership.mark_forgotten(conn, model, previous - set(members), request)
    return record


@pytest.fixture()
def chain(tmp_path: Path):
    """v1 (trained on s1..s4) -> v2 (forget fj-a: s1) -> v3 (forget fj-b: s2); v3 serves."""
    workspace = make_workspace(tmp_path)
    record_fake_version(workspace, "m", 1, members=["s1", "s2", "s3", "s4"])
    _derived(workspace, "m", 2, 1, "fj-a", ["s2", "s3", "s4"])
    _derived(workspace, "m", 3, 2, "fj-b", ["s3", "s4"])
    return workspace


def test_undone_forgets_follow_membership(chain) -> None:
    registry = VersionRegistry(chain.state_db)
    assert undone_forgets(registry, "m", 1) == ["fj-a", "fj-b"]
    assert undone_forgets(registry, "m", 2) == ["fj-b"]
    assert undone_forgets(registry, "m", 3) == []


def test_rollback_past_forgets_refused_and_nothing_changes(chain) -> None:
    with pytest.raises(ConflictError, match=r"2 sample\(s\) forgotten by 2 forget request\(s\): fj-a, fj-b; "
                                            "pass undo_forgets"):
        rollback(chain, "m", 1)
    with pytest.raises(ConflictError, match="already serves version 3"):
        rollback(chain, "m", 3)
    with pytest.raises(ModelNotFoundError, match="no version 9"):
        rollback(chain, "m", 9)
    assert VersionRegistry(chain.state_db).serving("m").version == 3
    assert AuditLog(chain.state_db).records() == []


def test_rollback_refused_while_a_job_runs(chain) -> None:
    store = JobStore(chain.state_db)
    job = store.submit("m", ["x"])
    store.claim_next("m")
    with pytest.raises(ConflictError, match=f"forget job {job.id} is running"):
        rollback(chain, "m", 2, undo_forgets=True)


def test_rollback_to_a_purged_version_refused(chain) -> None:
    VersionRegistry(chain.state_db).set_state("m", 1, "purged")
    with pytest.raises(CheckpointError, match="was purged or is missing"):
        rollback(chain, "m", 1, undo_forgets=True)


def test_purge_takes_superseded_and_rolled_back_versions_that_hold_forgotten_samples(chain) -> None:
    registry = VersionRegistry(chain.state_db)
    registry.set_state("m", 2, "rolled_back")
    assert purge(chain, timedelta(days=7)).purged == []
    future = datetime.now(timezone.utc) + timedelta(days=8)
    dry = purge(chain, timedelta(days=7), dry_run=True, now=future)
    assert [p["version"] for p in dry.purged] == [1, 2] and dry.dry_run
    assert chain.archive_path("m", 1).exists()
    done = purge(chain, timedelta(days=7), now=future)
    assert [p["version"] for p in done.purged] == [1, 2]
    assert not chain.archive_path("m", 1).exists() and not chain.archive_path("m", 2).exists()
    assert not (chain.version_dir("m", 1) / "checkpoint.pt").exists()
    assert [r.state for r in registry.versions("m")] == ["purged", "purged", "serving"]
    assert chain.archive_path("m", 3).exists()
    assert registry.members("m", 1) == set()  # a purged version's membership is dropped
    records = AuditLog(chain.state_db).records(kind="purge")
    assert [r.versions for r in records] == [{"purged": 1}, {"purged": 2}]
    assert AuditLog(chain.state_db).verify().ok
    assert purge(chain, timedelta(0), now=future).purged == []


def test_purge_keeps_reports(chain) -> None:
    purge(chain, timedelta(0), now=datetime.now(timezone.utc) + timedelta(seconds=1))
    assert (chain.version_dir("m", 2) / "report.json").exists()
    assert not (chain.version_dir("m", 2) / "artifacts").exists()


@pytest.mark.parametrize("text, seconds", [("7d", 604800), ("12h", 43200), ("30m", 1800), ("0s", 0),
                                           ("1.5h", 5400), ("2w", 1209600)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "7", "7 days", "-1d", "d7"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(InvalidInputError, match="use a number and a unit s, m, h, d or w"):
        parse_duration(text)


def test_rollback_is_refused_while_a_worker_holds_the_model(chain) -> None:
    """A job's worker holds the model's lock for its whole run; a rollback meanwhile is refused, naming it."""
    import subprocess
    import sys

    from tmu_core.state.locks import model_lock_path

    script = ("import sys, time; from tmu_core.config import Workspace; from tmu_core.state.locks import model_lock; "
              f"ws = Workspace(home={str(chain.home)!r}, model_store={str(chain.model_store)!r}); "
              "cm = model_lock(ws, 'm', holder='fj-running'); cm.__enter__(); print('held', flush=True); "
              "time.sleep(30)")
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "held"
        with pytest.raises(ConflictError, match=r"model 'm' is busy: pid \d+ \(fj-running"):
            rollback(chain, "m", 2, undo_forgets=True)
    finally:
        worker.kill()
        worker.wait()
    assert model_lock_path(chain, "m").exists()
