"""The drift budget (when an exact retrain is due), retrain jobs in the queue, and version kinds."""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from test_service_support import make_workspace, record_fake_version
from tmu_core.cli.common import drift_policy
from tmu_core.errors import InvalidInputError
from tmu_core.forget.drift import (DriftPolicy, add_policy_flags, drift_after, eval_key, exact_drift, paired_se,
                                   policy_flags, policy_from, right_mask, schedule_if_due)
from tmu_core.forget.report import forgetting_line
from tmu_core.state.jobs import JobStore
from tmu_core.state.store import StateStore
from tmu_core.state.versions import VersionRecord, VersionRegistry


def _version(version: int, kind: str, drift: dict | None = None) -> VersionRecord:
    return VersionRecord(model="m", version=version, parent=None, forget_request=None, archive=Path("a"),
                         archive_sha256="", checkpoint=Path("c"), checkpoint_sha256="", onnx=None, onnx_sha256=None,
                         metrics={"drift": drift} if drift else {}, created_at="2026-01-01T00:00:00+00:00",
                         kind=kind)


def test_the_cost_is_counted_from_the_last_exact_version() -> None:
    first = drift_after(_version(1, "exact"), acc_test_before=64.0, acc_test_after=63.0, samples=20)
    assert first == {"exact_base": 1, "base_acc_test": 64.0, "acc_test": 63.0, "cost": 1.0, "forgets": 1,
                     "samples": 20, "exact_since": "2026-01-01T00:00:00+00:00"}
    # the next job measures its source at 63.0, but the cost stays against the exact version's 64.0
    second = drift_after(_version(2, "approximate", first), acc_test_before=63.0, acc_test_after=61.5, samples=5)
    assert (second["exact_base"], second["cost"], second["forgets"], second["samples"]) == (1, 2.5, 2, 25)
    restart = drift_after(_version(3, "exact", exact_drift(3, 64.2, "2026-02-01T00:00:00+00:00")), 64.2, 64.0, 3)
    assert (restart["exact_base"], restart["cost"], restart["forgets"]) == (3, pytest.approx(0.2), 1)


def test_the_cost_carries_the_paired_error_of_the_eval_split_it_was_measured_on() -> None:
    ids = [f"test/{i:03d}" for i in range(100)]
    base = [True] * 60 + [False] * 40
    # 4 images only the exact version gets right, 1 only the new one: 3 points, error sqrt((5 - 9/100) / 99) x 10
    new = [True] * 56 + [False] * 4 + [True] + [False] * 39
    key = eval_key(ids)
    first = drift_after(_version(1, "exact"), 60.0, 57.0, 5, rights=(right_mask(base), right_mask(new)), key=key,
                        size=100)
    expected = 100 * ((5 - 0.09) / 99) ** 0.5 / 10
    assert first["cost"] == 3.0 and first["cost_se"] == pytest.approx(expected, abs=1e-3)
    assert first["base_right"] == right_mask(base) and first["eval_key"] == key
    assert paired_se(right_mask(base), right_mask(base), 100) == 0.0
    # a damaged stored mask (not hex, odd length, not text) or one of another size gives no error, and no exception
    for damaged in ("zz" * 13, right_mask(base)[:-1], 12345, right_mask(base[:50])):
        assert paired_se(damaged, right_mask(new), 100) is None
        # what a forget job computes from a source version whose stored record holds that mask: the cost as
        # measured, no error, and the damaged mask not carried on to the new version
        after = drift_after(_version(2, "approximate", {**first, "base_right": damaged}), 57.0, 56.0, 1,
                            rights=(right_mask(new), right_mask(new)), key=key, size=100)
        assert after["cost"] == 4.0 and after["forgets"] == 2
        assert "cost_se" not in after and "base_right" not in after
    # the next version is compared with the exact version's images, not with its source's
    second = drift_after(_version(2, "approximate", first), 57.0, 58.0, 1, rights=(right_mask(new), right_mask(base)),
                         key=key, size=100)
    assert second["cost"] == 2.0 and second["cost_se"] == 0.0  # it gets right exactly what the exact version did
    # a split that changed since the exact version: no error, the measured cost alone (and no mask carried on)
    moved = drift_after(_version(2, "approximate", first), 57.0, 56.0, 1, rights=(right_mask(new), right_mask(new)),
                        key=eval_key(ids[1:] + ["test/new"]), size=100)
    assert moved["cost"] == 4.0 and "cost_se" not in moved and "base_right" not in moved
    retrained = exact_drift(3, 61.0, "2026-02-01T00:00:00+00:00", right=right_mask(base), key=key)
    after_retrain = drift_after(_version(4, "approximate", drift_after(_version(3, "exact", retrained), 61.0, 61.0, 1,
                                                                       rights=(right_mask(base),) * 2, key=key,
                                                                       size=100)),
                                61.0, 58.0, 1, rights=(right_mask(base), right_mask(new)), key=key, size=100)
    assert after_retrain["exact_base"] == 3 and after_retrain["cost_se"] == pytest.approx(expected, abs=1e-3)


def test_the_budget_and_the_hold_act_on_the_cost_the_split_shows_at_the_policys_confidence() -> None:
    drift = {"exact_base": 1, "cost": 3.0, "cost_se": 1.5, "forgets": 4, "exact_since": "2026-01-01T00:00:00+00:00"}
    strict, plain = DriftPolicy(budget=1.0, hold_at=2.0), DriftPolicy(budget=1.0, hold_at=2.0, confidence=0.5)
    assert strict.evident(drift) == pytest.approx(3.0 - 1.6449 * 1.5, abs=1e-3)  # 0.53: not past 1 point
    assert strict.due(drift) is None and not strict.holds(drift)
    assert strict.outlook(drift)["cost_left"] == pytest.approx(0.467, abs=1e-3)
    assert plain.due(drift) == "ACC_Dtest fell 3.00 +- 1.50 points below exact v1 (budget 1.0)"
    assert plain.holds(drift)
    sure = {**drift, "cost": 6.0}  # 6 - 2.47 = 3.53: past both levels even at 95%
    assert "at least 3.53 at 95% confidence" in strict.due(sure) and strict.holds(sure)
    assert strict.due({**drift, "cost_se": None}) is not None  # no error recorded: the measured cost as it is


def test_each_limit_makes_a_retrain_due() -> None:
    drift = {"exact_base": 1, "cost": 1.5, "forgets": 3, "exact_since": "2026-01-01T00:00:00+00:00"}
    assert DriftPolicy().due(drift) is None and not DriftPolicy().enabled
    assert "1.50 points below exact v1" in DriftPolicy(budget=1.0).due(drift)
    assert DriftPolicy(budget=2.0).due(drift) is None
    assert "3 forget jobs" in DriftPolicy(max_forgets=3).due(drift)
    assert DriftPolicy(max_forgets=4).due(drift) is None
    day = 86400.0
    later = datetime(2026, 1, 9, tzinfo=timezone.utc)
    assert "8.0 days old" in DriftPolicy(max_age_s=7 * day).due(drift, now=later)
    assert DriftPolicy(max_age_s=9 * day).due(drift, now=later) is None
    assert DriftPolicy(budget=0.0).due({**drift, "forgets": 0}) is None  # an exact version has nothing to redo
    outlook = DriftPolicy(budget=2.0, max_forgets=5, max_age_s=day).outlook(drift)
    assert outlook["cost_left"] == 0.5 and outlook["forgets_left"] == 2
    assert outlook["due_at"] == "2026-01-02T00:00:00+00:00"


def test_forget_jobs_are_held_only_past_the_hold_level() -> None:
    drift = {"exact_base": 1, "cost": 2.5, "forgets": 3}
    assert DriftPolicy(hold_at=2.0).holds(drift) and not DriftPolicy(hold_at=3.0).holds(drift)
    assert not DriftPolicy().holds(drift) and not DriftPolicy(hold_at=0.0).holds({**drift, "forgets": 0})


@pytest.mark.parametrize("bad", [{"budget": -1}, {"max_forgets": 0}, {"max_age_s": 0},
                                 {"hold_at": -1}, {"confidence": 0.4}, {"confidence": 1.0}])
def test_a_policy_out_of_range_is_refused(bad: dict) -> None:
    with pytest.raises(InvalidInputError):
        DriftPolicy(**bad)


def test_the_cli_options_and_the_process_flags_carry_the_policy() -> None:
    assert not drift_policy("off", None, None).enabled
    policy = drift_policy("1.5", 10, "7d", "3", 0.9)
    assert policy == DriftPolicy(budget=1.5, max_forgets=10, max_age_s=7 * 86400.0, hold_at=3.0, confidence=0.9)
    with pytest.raises(InvalidInputError, match="--drift-budget takes ACC_Dtest points .* or 'off'"):
        drift_policy("lots", None, None)
    with pytest.raises(InvalidInputError, match="--drift-hold takes"):
        drift_policy("1", None, None, "soon")
    parser = argparse.ArgumentParser()
    add_policy_flags(parser)
    assert policy_from(parser.parse_args(policy_flags(policy))) == policy
    assert policy_flags(DriftPolicy()) == []


def test_the_extension_retrains_past_one_point_and_holds_forgets_past_two_by_default() -> None:
    from tmu_core.cli.forget_cmd import extension_start
    from tmu_core.cli.serve_cmd import serve_start

    for command in (serve_start, extension_start):
        defaults = {param.name: param.default for param in command.params}
        policy = drift_policy(defaults["drift_budget"], defaults["retrain_after_forgets"], defaults["retrain_after"],
                              defaults["drift_hold"], defaults["drift_confidence"])
        assert policy == DriftPolicy(budget=1.0, hold_at=2.0, confidence=0.95), command.name


def test_a_model_has_one_queued_or_running_retrain_beside_its_forget_jobs(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path / "state.sqlite")
    forget = jobs.submit("m", ["a"])
    retrain, created = jobs.submit_retrain("m", {"reason": "r"})
    again, created_again = jobs.submit_retrain("m", {"reason": "other"})
    assert created and not created_again and again.id == retrain.id and retrain.kind == "retrain"
    assert jobs.submit("m", ["b"], options={}).merged_into == forget.id  # forget jobs merge among themselves
    assert jobs.claim_next("m").id == forget.id
    assert jobs.claim_next("m", "retrain").id == retrain.id  # beside the running forget job
    assert jobs.claim_next("m", "retrain") is None
    jobs.finish(retrain.id, "succeeded")
    assert jobs.submit_retrain("m", {"reason": "later"})[1]
    assert [j.kind for j in jobs.retrains("m")] == ["retrain", "retrain"]


def test_a_due_lineage_queues_its_retrain_once_and_not_again_after_it_failed(tmp_path: Path) -> None:
    store = StateStore.open(make_workspace(tmp_path))
    drift = {"exact_base": 1, "cost": 3.0, "forgets": 2, "exact_since": "2026-01-01T00:00:00+00:00"}
    policy = DriftPolicy(budget=1.0)
    assert schedule_if_due(store, "m", {**drift, "cost": 0.5}, policy) is None
    first = schedule_if_due(store, "m", drift, policy)
    assert first["queued"] and schedule_if_due(store, "m", drift, policy)["job_id"] == first["job_id"]
    store.jobs.finish(first["job_id"], "failed", reason="no recipe")
    skipped = schedule_if_due(store, "m", drift, policy)
    assert not skipped["queued"] and "no recipe" in skipped["note"]
    assert schedule_if_due(store, "m", {**drift, "exact_base": 4}, policy)["queued"]  # a new lineage


def test_versions_say_exact_or_approximate_also_in_an_older_database(tmp_path: Path) -> None:
    workspace = make_workspace(tmp_path)
    record_fake_version(workspace)
    registry = VersionRegistry(workspace.state_db)
    assert registry.get("m", 1).kind == "exact" and registry.get("m", 1).to_json()["kind"] == "exact"
    folder = workspace.version_dir("m", 1)
    made = registry.record_version("m", 2, workspace.archive_path("m", 1), folder / "checkpoint.pt", None, 1,
                                   "fj-1", {})
    assert made.kind == "approximate"
    with pytest.raises(InvalidInputError, match="kind must be one of exact, approximate"):
        registry.record_version("m", 3, workspace.archive_path("m", 1), folder / "checkpoint.pt", None, 1, "j", {},
                                kind="partly")
    old = tmp_path / "old.sqlite"  # the table as it was before versions had a kind
    with sqlite3.connect(old) as conn:
        conn.execute("CREATE TABLE versions (model TEXT NOT NULL, version INTEGER NOT NULL, parent INTEGER, "
                     "forget_request TEXT, archive TEXT NOT NULL, archive_sha256 TEXT NOT NULL, checkpoint TEXT NOT "
                     "NULL, checkpoint_sha256 TEXT NOT NULL, onnx TEXT, onnx_sha256 TEXT, metrics TEXT NOT NULL, "
                     "created_at TEXT NOT NULL, state TEXT NOT NULL, state_changed_at TEXT NOT NULL, "
                     "PRIMARY KEY (model, version))")
        for version, request in ((1, None), (2, "fj-1")):
            conn.execute("INSERT INTO versions VALUES (?,?,?,?,'a','','c','',NULL,NULL,'{}','t','serving','t')",
                         ("m", version, None, request))
    migrated = VersionRegistry(old)
    assert [v.kind for v in migrated.versions("m")] == ["exact", "approximate"]


def test_a_report_says_what_kind_of_forgetting_was_done() -> None:
    drift = {"exact_base": 1, "cost": 0.4, "forgets": 2}
    off = {"kind": "approximate", "method": "tmu", "exact_base": 1, "drift": drift,
           "retrain": DriftPolicy().outlook(drift)}
    assert forgetting_line(off) == ("forgetting: approximate (tmu), 2 forget job(s) and +0.40 ACC_Dtest points "
                                    "since exact v1; no exact retrain is scheduled (drift budget off)")
    budget = {**off, "retrain": DriftPolicy(budget=1.0, max_forgets=5).outlook(drift)}
    assert forgetting_line(budget).endswith("next exact retrain: 0.60 points of budget left, 3 forget job(s) left")
    measured = {**off, "drift": {**drift, "cost_se": 1.25}}
    assert "+0.40 +- 1.25 ACC_Dtest points since exact v1" in forgetting_line(measured)
    queued = {**off, "retrain": {"scheduled": {"job_id": "rj-1", "reason": "r", "queued": True}}}
    assert forgetting_line(queued).endswith("exact retrain rj-1 queued now: r")
    exact = {"kind": "exact", "replaces": 4, "replaces_kind": "approximate"}
    assert forgetting_line(exact) == "forgetting: exact (retrained; replaces approximate v4)"


def test_the_age_limit_is_checked_against_the_time_the_exact_version_was_made() -> None:
    made = datetime.now(timezone.utc) - timedelta(hours=2)
    drift = {**exact_drift(1, 60.0, made.isoformat()), "forgets": 1, "cost": 0.0}
    assert DriftPolicy(max_age_s=3600).due(drift) is not None
    assert DriftPolicy(max_age_s=3 * 3600).due(drift) is None


def test_the_dispatcher_holds_forget_jobs_past_the_hold_level_while_a_retrain_waits(tmp_path: Path) -> None:
    from tmu_core.forget.dispatcher import Dispatcher, WorkerSettings

    workspace = make_workspace(tmp_path)
    v1 = record_fake_version(workspace)
    registry = VersionRegistry(workspace.state_db)
    drift = {"exact_base": 1, "base_acc_test": 60.0, "acc_test": 57.0, "cost": 3.0, "forgets": 2, "samples": 9,
             "exact_since": v1.created_at}
    registry.record_version("m", 2, v1.archive, v1.checkpoint, None, 1, "fj-x", {"drift": drift})
    jobs = JobStore(workspace.state_db)
    held = Dispatcher(workspace, WorkerSettings(drift=DriftPolicy(budget=1.0, hold_at=2.5)))
    lower = Dispatcher(workspace, WorkerSettings(drift=DriftPolicy(budget=1.0, hold_at=3.5)))
    assert not held._held("m")  # no retrain queued: nothing to wait for
    jobs.submit_retrain("m", {"reason": "r"})
    assert held._held("m") and not lower._held("m")
    assert not Dispatcher(workspace, WorkerSettings(drift=DriftPolicy(budget=1.0)))._held("m")


def _pretend_worker(job_id: str) -> subprocess.Popen:
    """A live process whose command line is that of ``job_id``'s worker (what ``pid_runs_job`` checks)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "tmu_core.forget.worker",
                             "--job", job_id])


def test_a_retrain_pauses_while_a_forget_job_works_and_goes_on_once_it_ends(tmp_path: Path) -> None:
    from tmu_core.forget.retrain import YieldToForgets

    store = StateStore.open(make_workspace(tmp_path))
    job = store.jobs.submit("m", ["s1"])
    assert store.jobs.claim_next("m").id == job.id
    pause = YieldToForgets(store, poll_s=0.05)
    assert not pause.busy()  # running, but no live worker: a record left by a dead worker holds nothing up
    worker = _pretend_worker(job.id)
    try:
        store.jobs.set_fields(job.id, worker_pid=worker.pid)
        assert pause.busy()
        threading.Timer(1.0, worker.kill).start()
        started = time.monotonic()
        pause()
        assert time.monotonic() - started >= 0.9 and pause.paused_s >= 0.9
    finally:
        worker.kill()
        worker.wait()
    # succeeded and preparing the next version's artifacts still uses the CPU; ready does not
    store.jobs.finish(job.id, "succeeded", result={})
    store.jobs.set_fields(job.id, followup={"artifacts": "preparing", "version": 2})
    worker = _pretend_worker(job.id)
    try:
        store.jobs.set_fields(job.id, worker_pid=worker.pid)
        assert pause.busy()
        store.jobs.set_fields(job.id, followup={"artifacts": "ready", "version": 2})
        assert not pause.busy()
    finally:
        worker.kill()
        worker.wait()


def test_a_retrain_under_an_endless_stream_still_runs_between_its_longest_pauses(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    from tmu_core.forget.retrain import YieldToForgets

    pause = YieldToForgets(StateStore.open(make_workspace(tmp_path)), poll_s=0.02, max_pause_s=0.2, run_s=30.0)
    monkeypatch.setattr(pause, "busy", lambda: True)
    started = time.monotonic()
    pause()
    assert 0.2 <= time.monotonic() - started < 5.0
    started = time.monotonic()
    for _ in range(100):  # within run_s of the capped pause: no more waiting
        pause()
    assert time.monotonic() - started < 0.5


def test_every_training_step_passes_the_pause_point_inside_yielding() -> None:
    import torch

    from tmu_core.models import build_model
    from tmu_core.train import TrainConfig, fit
    from tmu_core.train.loops import yielding
    from tmu_core.unlearn.common import train_epochs

    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(20) % 2
    model = build_model("small_cnn", 2, 3, 8)
    calls: list[int] = []
    with yielding(lambda: calls.append(1)):
        fit(model, images, labels, TrainConfig(epochs=2, batch_size=8, augment=False), "cpu")
        assert len(calls) == 2 * 3  # batches of 8, 8, 4 in each of two epochs
        train_epochs(model, images, labels, epochs=1, lr=0.01, batch_size=10, seed=0, device=torch.device("cpu"))
        assert len(calls) == 2 * 3 + 2
    fit(model, images, labels, TrainConfig(epochs=1, batch_size=8, augment=False), "cpu")
    assert len(calls) == 8  # outside the block the loops do not pause


def test_a_forget_job_waits_for_a_retrain_only_past_the_hold_level_and_at_most_twice(tmp_path: Path) -> None:
    from tmu_core.forget.drift import MAX_HOLDS, retrain_to_wait_for

    store = StateStore.open(make_workspace(tmp_path))
    job = store.jobs.submit("m", ["a"])
    drift = {"exact_base": 1, "base_acc_test": 60.0, "acc_test": 57.5, "cost": 2.5, "forgets": 3, "samples": 9,
             "exact_since": "2026-01-01T00:00:00+00:00"}
    assert retrain_to_wait_for(store, job, drift, DriftPolicy(hold_at=2.0)) is None  # nothing queued, none due
    assert retrain_to_wait_for(store, job, drift, DriftPolicy(budget=1.0, hold_at=3.0)) is None  # below the hold
    assert store.jobs.retrains("m") == []
    held = retrain_to_wait_for(store, job, drift, DriftPolicy(budget=1.0, hold_at=2.0))
    assert held is not None and held.retrain_id == store.jobs.retrains("m")[0].id  # queued because it was due
    for _ in range(MAX_HOLDS):
        store.jobs.hold(job.id, held.retrain_id, str(held))
    waited = store.jobs.get(job.id)
    assert retrain_to_wait_for(store, waited, drift, DriftPolicy(budget=1.0, hold_at=2.0)) is None
    assert waited.state == "queued" and waited.attempts == 0
