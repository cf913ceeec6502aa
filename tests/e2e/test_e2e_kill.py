"""Kill the job worker at the start of each pipeline step (``--kill-at``) against one real TorchServe.

Before the commit, a kill is undone: with one attempt allowed the job fails, and what serves (registry,
TorchServe default, registered versions), the index, the audit log and the files are as they were; with attempts
left, the job runs again and succeeds. After the commit, a kill never goes back: a new worker resumes the job at
its step and finishes it, and the forgotten samples' pixels are wiped.
"""

from __future__ import annotations

import pytest

from e2e_support import ask_to_forget, assert_serving, audit_kinds, run_dispatched, wait_wiped
from tmu_core.forget.commit import FORWARD_STEPS
from tmu_core.index import TrainingIndex
from tmu_core.state.store import StateStore

pytestmark = pytest.mark.integration

# Each step before the commit has its case; those whose undo is the same as a neighbour's (nothing in
# TorchServe yet, like "package") run with the long suite (-m integration_slow).
_SAME_UNDO_AS_NEIGHBOUR = ("load", "unlearn", "evaluate", "save")
_BEFORE = [pytest.param(step, marks=pytest.mark.integration_slow) if step in _SAME_UNDO_AS_NEIGHBOUR else step
           for step in ("load", "unlearn", "evaluate", "save", "package", "register", "commit")]



def _snapshot(workspace) -> tuple[int, list[tuple[int, str]]]:
    store = StateStore.open(workspace)
    return len(store.audit.records()), [(v.version, v.state) for v in store.versions.versions("m")]


@pytest.mark.parametrize("step", _BEFORE)
def test_killed_before_the_commit_changes_nothing(served, step: str) -> None:
    workspace, server = served
    owner = {"load": "owner-a-0", "unlearn": "owner-b-0", "evaluate": "owner-c-0", "save": "owner-d-0",
             "package": "owner-a-1", "register": "owner-b-1", "commit": "owner-c-1"}[step]
    serving = StateStore.open(workspace).versions.require_serving("m").version
    before = _snapshot(workspace)
    job_id, samples = ask_to_forget(workspace, owner)
    done = run_dispatched(workspace, job_id, kill_at=step, max_attempts=1)

    assert done.state == "failed"
    assert f"exited with code 9 during step '{step}'" in done.reason and "no change was committed" in done.reason
    assert_serving(workspace, server, serving)
    with TrainingIndex.open(workspace.index_dir) as index:
        assert not any(index.is_forgotten(s) for s in samples)
    assert _snapshot(workspace) == before and audit_kinds(workspace) is not None
    if done.to_version is not None:
        assert not workspace.archive_path("m", done.to_version).exists()
        assert not workspace.version_dir("m", done.to_version).exists()


def test_killed_before_the_commit_runs_again_and_succeeds(served) -> None:
    workspace, server = served
    serving = StateStore.open(workspace).versions.require_serving("m").version
    job_id, samples = ask_to_forget(workspace, "owner-d-1")
    done = run_dispatched(workspace, job_id, kill_at="register")

    assert done.state == "succeeded" and done.attempts == 1
    requeued = [s for s in done.steps if s["step"] == "requeued"]
    assert len(requeued) == 1 and "exited with code 9 during step 'register'" in requeued[0]["reason"]
    assert_serving(workspace, server, done.to_version)
    assert done.to_version > serving
    wait_wiped(workspace, samples)


@pytest.mark.parametrize("step", FORWARD_STEPS)
def test_killed_after_the_commit_is_resumed_and_finished(served, step: str) -> None:
    workspace, server = served
    owner = {"set_default": "owner-a-2", "drain": "owner-b-2", "unregister_old": "owner-c-2",
             "cleanup": "owner-d-2"}[step]
    store = StateStore.open(workspace)
    source = store.versions.require_serving("m").version
    job_id, samples = ask_to_forget(workspace, owner)
    done = run_dispatched(workspace, job_id, kill_at=step)

    assert done.state == "succeeded", done.reason
    assert done.attempts == 0 and "requeued" not in [s["step"] for s in done.steps]
    assert_serving(workspace, server, done.to_version)
    assert store.versions.get("m", source).state in ("superseded", "purged")
    assert not store.versions.members("m", done.to_version) & set(samples)
    assert set(samples) <= store.versions.forgotten("m")
    assert not (workspace.version_dir("m", source) / "artifacts").exists()
    wait_wiped(workspace, samples)
    kinds = audit_kinds(workspace)
    assert kinds.count("forget") >= 1 and kinds[-1] == "wipe"
