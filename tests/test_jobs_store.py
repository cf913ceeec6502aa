"""The persistent job queue: states, one running job per model, merging, idempotency."""

from __future__ import annotations

from pathlib import Path

import pytest

from tmu_core.errors import ConflictError, InvalidInputError, JobNotFoundError
from tmu_core.state.jobs import JobStore


def test_lifecycle_and_steps(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "state.sqlite")
    job = store.submit("m", ["b", "a", "a"], owner_ids=["o1"])
    assert job.state == "queued" and job.sample_ids == ["a", "b"] and job.owner_ids == ["o1"]
    claimed = store.claim_next("m")
    assert claimed.id == job.id and claimed.state == "running" and claimed.started_at
    store.enter_step(job.id, "unlearn", 0.2)
    store.set_progress(job.id, 0.25)
    current = store.get(job.id)
    assert current.step == "unlearn" and current.progress == 0.25
    assert [s["step"] for s in current.steps] == ["unlearn"]
    store.finish(job.id, "succeeded", result={"acc": 1.0})
    done = store.get(job.id)
    assert done.state == "succeeded" and done.progress == 1.0 and done.result == {"acc": 1.0} and done.done


def test_one_running_job_per_model(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "state.sqlite")
    first = store.submit("m", ["a"])
    assert store.claim_next("m").id == first.id
    second = store.submit("m", ["b"])
    other = store.submit("n", ["c"])
    assert second.merged_into is None
    assert store.claim_next("m") is None
    assert store.claim_next("n").id == other.id
    store.finish(first.id, "failed", reason="boom")
    assert store.get(first.id).reason == "boom"
    assert store.claim_next("m").id == second.id


def test_queued_requests_merge_when_options_match(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "state.sqlite")
    first = store.submit("m", ["a"], options={"noise": 0.1})
    second = store.submit("m", ["b", "a"], options={"noise": 0.1})
    third = store.submit("m", ["c"], options={"noise": 0.5})
    assert second.merged_into == first.id
    assert third.merged_into is None
    assert store.get(first.id).merged_from == [second.id]
    assert store.queued_models() == ["m"]
    claimed = store.claim_next("m")
    assert claimed.id == first.id
    assert store.forget_set(claimed) == (["a", "b"], [first.id, second.id])
    store.enter_step(first.id, "load", 0.1)
    assert store.get(second.id).state == "running" and store.get(second.id).step == "load"
    store.finish(first.id, "succeeded")
    assert store.get(second.id).state == "succeeded"
    assert store.get(third.id).state == "queued"


def test_no_merge_into_running_job(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "state.sqlite")
    first = store.submit("m", ["a"])
    store.claim_next("m")
    assert store.submit("m", ["b"]).merged_into is None
    assert first.merged_from == []


def test_idempotency_key_returns_existing_job(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "state.sqlite")
    job = store.submit("m", ["a"], idempotency_key="req-1")
    assert store.submit("m", ["zzz"], idempotency_key="req-1").id == job.id
    assert store.count() == 1
    with pytest.raises(ConflictError, match="already used for job"):
        store.submit("n", ["a"], idempotency_key="req-1")


def test_bad_input(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "state.sqlite")
    with pytest.raises(InvalidInputError, match="at least one sample"):
        store.submit("m", [])
    with pytest.raises(JobNotFoundError, match="fj-nope"):
        store.get("fj-nope")
    with pytest.raises(InvalidInputError, match="queued, running, succeeded, failed"):
        store.list(state="done")
    with pytest.raises(InvalidInputError, match="cannot set job fields"):
        store.set_fields("x", state="succeeded")
    assert store.count() == 0
