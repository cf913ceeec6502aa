"""Kill the job worker at the start of each pipeline step (``--kill-at``) against one real TorchServe.

After each kill the dispatcher recovers the job: it is marked failed with the step, v1 still serves (registry,
TorchServe default, no other version registered), the index still holds the samples, the audit log has no new
record and verifies, and no v2 file is left. Killed right after the index deletion, the job is finished instead.
"""

from __future__ import annotations

import pytest

from e2e_support import assert_serving, audit_kinds, run_dispatched
from test_service_support import FAST_TMU
from tmu_core.index import TrainingIndex
from tmu_core.state.jobs import JobStore
from tmu_core.forget.pipeline import STEPS
from tmu_core.state.versions import VersionRegistry

pytestmark = pytest.mark.integration


def _owner_samples(workspace, owner: str) -> list[str]:
    with TrainingIndex.open(workspace.index_dir) as index:
        return index.ids_for_owners([owner])


# Each step has its case; those whose undo path is the same as a neighbour's (nothing in TorchServe yet, like
# "package"; or both versions registered, like "set_default") run with the long suite (-m integration_slow).
_SAME_UNDO_AS_NEIGHBOUR = ("load", "unlearn", "evaluate", "save", "drain")
_CASES = [pytest.param(step, marks=pytest.mark.integration_slow) if step in _SAME_UNDO_AS_NEIGHBOUR else step
          for step in STEPS]


@pytest.mark.parametrize("step", _CASES)
def test_killed_worker_changes_nothing(served, step: str) -> None:
    workspace, server = served
    owner = f"owner-{'abcd'[STEPS.index(step) % 4]}-{STEPS.index(step) // 4}"
    samples = _owner_samples(workspace, owner)
    job = JobStore(workspace.state_db).submit("m", samples, owner_ids=[owner], options={"method": "tmu", **FAST_TMU})
    done = run_dispatched(workspace, job.id, kill_at=step)

    assert done.state == "failed"
    assert f"exited with code 9 during step '{step}'" in done.reason and "no change was committed" in done.reason
    assert_serving(workspace, server, 1)
    with TrainingIndex.open(workspace.index_dir) as index:
        assert not any(index.is_forgotten(s) for s in samples)
    assert audit_kinds(workspace) == []
    assert not workspace.archive_path("m", 2).exists()
    assert not workspace.version_dir("m", 2).exists()
    assert [r.version for r in VersionRegistry(workspace.state_db).versions("m")] == [1]


def test_killed_after_index_deletion_is_finished(served) -> None:
    workspace, server = served
    samples = _owner_samples(workspace, "owner-d-3")
    job = JobStore(workspace.state_db).submit("m", samples, owner_ids=["owner-d-3"],
                                              options={"method": "tmu", **FAST_TMU})
    done = run_dispatched(workspace, job.id, kill_at="commit.index_done")

    assert done.state == "succeeded" and "recovery recorded the new version" in done.reason
    assert_serving(workspace, server, 2)
    with TrainingIndex.open(workspace.index_dir) as index:
        assert all(index.tombstone(s).request_id == job.id for s in samples)
    assert audit_kinds(workspace) == ["forget", "swap"]
    assert VersionRegistry(workspace.state_db).get("m", 2).forget_request == job.id
