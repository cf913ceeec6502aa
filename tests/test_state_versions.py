"""Version numbers are reserved: a forget job's new version and ``tmu-admin package`` never get the same number."""

from __future__ import annotations

import pytest
from test_service_support import make_workspace, record_fake_version

from tmu_core.errors import ConflictError
from tmu_core.state.versions import VersionRegistry


def test_a_job_and_package_never_share_a_number(tmp_path) -> None:
    workspace = make_workspace(tmp_path)
    record_fake_version(workspace, "m", 1)
    registry = VersionRegistry(workspace.state_db)

    job_version = registry.reserve("m", "fj-x")
    assert job_version == 2
    assert registry.reserve("m", "fj-x") == job_version  # the holder gets its own number back
    # Another process (a later CLI call) opens the registry afresh and still sees the reservation.
    assert VersionRegistry(workspace.state_db).reserve("m", "package") == job_version + 1
    assert registry.next_version("m") == job_version + 2

    with pytest.raises(ConflictError) as refused:
        registry.reserve("m", "package", version=job_version)
    assert f"version {job_version} of 'm' is already reserved by fj-x" in str(refused.value)
    assert f"the next free one is {job_version + 2}" in str(refused.value)


def test_recording_the_reserved_number_clears_the_reservation(tmp_path) -> None:
    workspace = make_workspace(tmp_path)
    record_fake_version(workspace, "m", 1)
    registry = VersionRegistry(workspace.state_db)
    job_version = registry.reserve("m", "fj-x")

    record_fake_version(workspace, "m", job_version)

    # The job's reservation is gone: the same holder is handed a fresh number, not the recorded one.
    assert registry.reserve("m", "fj-x") == job_version + 1
    with pytest.raises(ConflictError) as refused:
        registry.reserve("m", "package", version=job_version)
    assert f"version {job_version} of 'm' is already recorded" in str(refused.value)
    assert "reserved by" not in str(refused.value)


def test_a_holder_whose_number_was_overtaken_gets_one_above_the_newest_version(tmp_path) -> None:
    """A job held for a retrain reserved v2; the retrain recorded v3 meanwhile. The job's version is v3's child, so
    it gets v4, and its old reservation no longer blocks v2 for anyone."""
    workspace = make_workspace(tmp_path)
    record_fake_version(workspace, "m", 1)
    registry = VersionRegistry(workspace.state_db)
    assert registry.reserve("m", "fj-held") == 2
    assert registry.reserve("m", "rj-retrain") == 3
    record_fake_version(workspace, "m", 3)
    assert registry.reserve("m", "fj-held") == 4
    assert registry.reserve("m", "package", version=2) == 2
    registry.release("m", "fj-held")  # the job found nothing left to do: v4 is free again
    assert registry.reserve("m", "other", version=4) == 4


def test_reservations_are_per_model(tmp_path) -> None:
    workspace = make_workspace(tmp_path)
    record_fake_version(workspace, "m", 1)
    registry = VersionRegistry(workspace.state_db)
    assert registry.reserve("m", "fj-x") == 2
    assert registry.reserve("other", "package") == 1
    assert registry.reserve("other", "fj-y", version=2) == 2
