"""The exact retrain on a real TorchServe: queued by the drift policy, swapped in without a failed prediction,
caught up with a forget that lands while it trains (the forget does not wait for it), killed or failing before
its commit, and clearing samples a rollback made owed."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from e2e_support import ask_to_forget, assert_serving, audit_kinds, run_dispatched
from test_service_support import FAST_TMU
from tmu_core.forget import retrain
from tmu_core.forget.drift import DriftPolicy
from tmu_core.forget.pipeline import PipelineConfig
from tmu_core.forget.report import format_report
from tmu_core.serving import InferenceClient
from tmu_core.state.store import StateStore
from tmu_core.train import load_checkpoint
from tmu_core.unlearn.baselines import recipe_config

pytestmark = pytest.mark.integration



class _Predictions:
    """Predictions sent without pause from a thread (at most ``limit_s``), each answer's version kept."""

    def __init__(self, infer: InferenceClient, image: bytes, limit_s: float = 300.0) -> None:
        self.versions: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(infer, image, limit_s), daemon=True)

    def _loop(self, infer: InferenceClient, image: bytes, limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.versions.append(infer.predict("m", image).model_version)
            except Exception as err:  # every failure is a finding: the test asserts there are none
                self.failures.append(repr(err))
            time.sleep(0.01)

    def __enter__(self) -> "_Predictions":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _image(workspace) -> bytes:
    return (workspace.home.parent / "tree" / "test" / "a" / "0000.png").read_bytes()


def test_the_drift_policy_queues_a_retrain_that_swaps_in_an_exact_version(served) -> None:
    workspace, server = served
    store = StateStore.open(workspace)
    infer = InferenceClient(server.config.url("inference"), server.keys().inference)
    forget_id, samples = ask_to_forget(workspace, "owner-a-0")
    with _Predictions(infer, _image(workspace)) as load:
        forgot = run_dispatched(workspace, forget_id, drift=DriftPolicy(max_forgets=1))
        approximate = store.versions.get("m", forgot.to_version)
        scheduled = forgot.result["forgetting"]["retrain"]["scheduled"]
        assert forgot.state == "succeeded" and scheduled["queued"], forgot.result["forgetting"]
        assert "queued now" in format_report(forgot.result)
        done = run_dispatched(workspace, scheduled["job_id"], timeout=300)
        final = infer.predict("m", _image(workspace)).model_version
    assert done.state == "succeeded", done.reason
    assert done.kind == "retrain" and done.result["caught_up"] is None
    exact = store.versions.require_serving("m")
    assert (approximate.kind, exact.kind) == ("approximate", "exact")
    assert approximate.metrics["drift"]["cost_se"] >= 0  # paired with v1 on the same eval images
    assert exact.parent == approximate.version and exact.forget_request == done.id
    assert store.versions.members("m", exact.version) == store.versions.members("m", approximate.version)
    assert not set(samples) & store.versions.members("m", exact.version)
    assert exact.metrics["drift"]["cost"] == 0.0 and exact.metrics["drift"]["exact_base"] == exact.version
    assert exact.metrics["drift"]["base_right"] and exact.metrics["drift"]["eval_key"]  # its later costs get an error
    assert_serving(workspace, server, exact.version)
    assert load.failures == [] and final == str(exact.version)
    assert str(approximate.version) in load.versions
    kinds = [kind for kind in audit_kinds(workspace) if kind not in ("wipe", "purge")]
    assert kinds == ["forget", "swap", "retrain", "swap"]
    record = next(r for r in store.audit.records() if r.kind == "retrain")
    assert record.versions == {"from": approximate.version, "to": exact.version} and record.details["method"] == "retrain"
    _, meta = load_checkpoint(exact.checkpoint, "cpu")
    assert meta.recipe["retrain"]["job"] == done.id and recipe_config(meta).epochs == 8  # it can be retrained again
    report = json.loads((workspace.version_dir("m", exact.version) / "report.json").read_text())
    assert report["forgetting"]["kind"] == "exact" and "exact retrain" in format_report(report)
    # The next forget request finds the exact version prepared for the forget jobs' method.
    followup = store.jobs.get(done.id).followup
    assert followup["artifacts"] == "ready" and followup["version"] == exact.version, followup


def _forget_during_training(workspace, monkeypatch, owner: str) -> list[str]:
    """Make the retrain's training end with a forget request of ``owner`` run to its end by a worker process (the
    model's lock free for it), and a wipe pass after it; returns the forgotten samples once it has run."""
    from tmu_core.forget.wipe import sweep
    from tmu_core.index import TrainingIndex

    store = StateStore.open(workspace)
    real_train, forgotten = retrain._train, []

    def train_then_forget(run):
        trained = real_train(run)
        forget_id, samples = ask_to_forget(workspace, owner)
        assert store.jobs.claim_next("m").id == forget_id
        subprocess.run([sys.executable, "-m", "tmu_core.forget.worker", "--job", forget_id, "--home",
                        str(workspace.home), "--model-store", str(workspace.model_store), "--device", "cpu"],
                       check=True, timeout=300, capture_output=True)
        assert store.jobs.get(forget_id).state == "succeeded"
        sweep(workspace)  # the running retrain's network holds these samples: their pixels stay for its catch-up
        with TrainingIndex.open(workspace.index_dir) as index:
            assert not any(index.is_forgotten(sample) for sample in samples)
        forgotten.extend(samples)
        return trained

    monkeypatch.setattr(retrain, "_train", train_then_forget)
    return forgotten


def test_samples_forgotten_while_it_trains_are_caught_up_before_it_serves(served, monkeypatch) -> None:
    from tmu_core.forget.wipe import sweep
    from tmu_core.index import TrainingIndex

    workspace, server = served
    store = StateStore.open(workspace)
    job, created = store.jobs.submit_retrain("m", {"reason": "test"})
    assert created and store.jobs.claim_next("m", "retrain").id == job.id
    forgotten = _forget_during_training(workspace, monkeypatch, "owner-b-0")
    done = retrain.run_retrain(workspace, job.id, PipelineConfig(device="cpu", prepare_next=False))
    assert done.state == "succeeded", done.reason
    caught = done.result["caught_up"]
    assert caught["samples"] == len(forgotten) and caught["method"] == "tmu" and len(caught["forget_jobs"]) == 1
    assert caught["prepared_before_lock"]  # the forget landed during the training: prepared without the lock
    version = store.versions.require_serving("m")
    after_forget = store.versions.get("m", version.parent)
    assert version.forget_request == done.id and version.kind == "approximate"
    assert after_forget.kind == "approximate" and after_forget.forget_request == caught["forget_jobs"][0]
    members = store.versions.members("m", version.version)
    assert forgotten and not set(forgotten) & members
    assert members == store.versions.members("m", after_forget.version)
    drift = version.metrics["drift"]
    assert drift["exact_base"] == version.version and drift["forgets"] == 1 and drift["samples"] == len(forgotten)
    assert drift["base_acc_test"] == done.result["metrics"]["acc_test_retrained"]
    assert drift["cost_se"] >= 0 and drift["base_right"] and drift["eval_key"]  # the catch-up's cost has its error
    _, meta = load_checkpoint(version.checkpoint, "cpu")
    assert meta.recipe["retrain"]["caught_up"]["samples"] == len(forgotten)
    assert_serving(workspace, server, version.version)
    kinds = [kind for kind in audit_kinds(workspace) if kind not in ("wipe", "purge")]
    assert kinds[-4:] == ["forget", "swap", "retrain", "swap"]
    assert "caught up with" in format_report(done.result) and "unlearned by tmu" in format_report(done.result)
    sweep(workspace)  # the retrain is over: nothing needs the pixels any more
    with TrainingIndex.open(workspace.index_dir) as index:
        assert all(index.is_forgotten(sample) for sample in forgotten)


def _disk_full(*_: object) -> None:
    raise OSError(28, "No space left on device")


# "catch_up" fails under the lock with the target reserved; "prepare" (before the lock) runs with the long suite.
@pytest.mark.parametrize("step", [pytest.param("prepare", marks=pytest.mark.integration_slow), "catch_up"])
def test_a_failed_catch_up_leaves_what_serves_and_the_forget_it_was_for(served, monkeypatch, step: str) -> None:
    from tmu_core.forget.wipe import sweep
    from tmu_core.index import TrainingIndex

    workspace, server = served
    store = StateStore.open(workspace)
    job, _ = store.jobs.submit_retrain("m", {"reason": "test"})
    assert store.jobs.claim_next("m", "retrain").id == job.id
    forgotten = _forget_during_training(workspace, monkeypatch, {"prepare": "owner-c-1", "catch_up": "owner-d-1"}[step])
    if step == "prepare":  # before the lock: a method the catch-up cannot build
        monkeypatch.setattr(retrain, "_catch_up_method", lambda run, stale: ("no-such-method", {}, []))
    else:  # under the lock, the target version reserved: the disk fills up
        monkeypatch.setattr(retrain, "_catch_up", _disk_full)
    done = retrain.run_retrain(workspace, job.id, PipelineConfig(device="cpu", prepare_next=False, max_attempts=1))
    assert done.state == "failed" and f"step '{step}' failed" in done.reason, done.reason
    assert ("no-such-method" if step == "prepare" else "No space left") in done.reason
    serving = store.versions.require_serving("m")
    assert serving.forget_request != done.id and not set(forgotten) & store.versions.members("m", serving.version)
    assert done.to_version is None or not workspace.version_dir("m", done.to_version).exists()
    assert_serving(workspace, server, serving.version)
    sweep(workspace)
    with TrainingIndex.open(workspace.index_dir) as index:
        assert all(index.is_forgotten(sample) for sample in forgotten)


def _changes(store) -> int:
    """Audit records of changes to what serves (wipes of earlier tests' samples may land meanwhile)."""
    return sum(r.kind not in ("wipe", "purge") for r in store.audit.records())


# "register" is the step whose undo touches TorchServe; "train" (nothing made yet) runs with the long suite.
@pytest.mark.parametrize("step", [pytest.param("train", marks=pytest.mark.integration_slow), "register"])
def test_a_retrain_killed_before_its_commit_leaves_what_serves(served, step: str) -> None:
    workspace, server = served
    store = StateStore.open(workspace)
    serving = store.versions.require_serving("m")
    before = (_changes(store), [(v.version, v.state) for v in store.versions.versions("m")])
    job, _ = store.jobs.submit_retrain("m", {"reason": "test"})
    done = run_dispatched(workspace, job.id, kill_at=step, max_attempts=1)
    assert done.state == "failed"
    assert f"exited with code 9 during step '{step}'" in done.reason and "no change was committed" in done.reason
    assert_serving(workspace, server, serving.version)
    assert (_changes(store), [(v.version, v.state) for v in store.versions.versions("m")]) == before
    assert audit_kinds(workspace) is not None  # the chain verifies
    if done.to_version is not None:
        assert not workspace.version_dir("m", done.to_version).exists()
        assert not workspace.archive_path("m", done.to_version).exists()


@pytest.mark.integration_slow
def test_a_retrain_forgets_again_what_a_rollback_made_owed(served) -> None:
    from tmu_core.service.rollback import rollback

    workspace, server = served
    store = StateStore.open(workspace)
    forget_id, samples = ask_to_forget(workspace, "owner-c-0")
    forgot = run_dispatched(workspace, forget_id, retention_s=3600)  # keep the version rolled back to
    assert forgot.state == "succeeded", forgot.reason
    rollback(workspace, "m", forgot.from_version, undo_forgets=True)
    assert set(samples) <= store.versions.owed("m")
    job, _ = store.jobs.submit_retrain("m", {"reason": "owed samples"})
    done = run_dispatched(workspace, job.id, timeout=300)
    assert done.state == "succeeded", done.reason
    exact = store.versions.require_serving("m")
    assert exact.kind == "exact" and not set(samples) & store.versions.members("m", exact.version)
    assert store.versions.owed("m") == set() and set(samples) <= store.versions.forgotten("m")
    assert_serving(workspace, server, exact.version)


@pytest.mark.integration_slow
def test_a_forget_still_queued_when_a_round_starts_is_covered_by_the_exact_version(served) -> None:
    workspace, server = served
    store = StateStore.open(workspace)
    forget_id, samples = ask_to_forget(workspace, "owner-a-1")  # queued, not claimed: as a held job waits
    job, _ = store.jobs.submit_retrain("m", {"reason": "test"})
    assert store.jobs.claim_next("m", "retrain").id == job.id
    done = retrain.run_retrain(workspace, job.id, PipelineConfig(device="cpu", prepare_next=False))
    assert done.state == "succeeded" and done.result["caught_up"] is None, done.reason
    exact = store.versions.require_serving("m")
    assert not set(samples) & store.versions.members("m", exact.version)
    after = run_dispatched(workspace, forget_id)
    assert after.state == "succeeded" and after.result.get("nothing_to_do"), after.result
    assert set(samples) <= store.versions.forgotten("m")
    assert_serving(workspace, server, exact.version)


def test_a_forget_whose_version_would_pass_the_hold_waits_for_the_retrain_it_queues(served) -> None:
    """Hold level 0: the job's own version is past it. It queues the due retrain, serves nothing, and waits; the
    retrain leaves its samples out (the job is queued again by then), so once the exact version serves, the job
    finds nothing left to unlearn. No version the job made ever existed, and clients saw no failure."""
    workspace, server = served
    store = StateStore.open(workspace)
    infer = InferenceClient(server.config.url("inference"), server.keys().inference)
    start, _ = store.jobs.submit_retrain("m", {"reason": "test: start from an exact version"})
    assert run_dispatched(workspace, start.id, timeout=300).state == "succeeded"
    before = store.versions.require_serving("m")
    assert before.kind == "exact"
    # The job's version must cost something on the eval split to reach level 0. Without the held-out anchor this
    # tiny model's request always loses a little; with it, it may gain.
    forget_id, samples = ask_to_forget(workspace, "owner-d-2", {**FAST_TMU, "held_out_weight": 0.0})
    with _Predictions(infer, _image(workspace)) as load:
        # Confidence 0.5: the measured cost as it is, so that any loss reaches level 0.
        done = run_dispatched(workspace, forget_id, drift=DriftPolicy(max_forgets=1, hold_at=0.0, confidence=0.5),
                              timeout=400)
    assert done.state == "succeeded" and done.result.get("nothing_to_do"), (done.reason, done.result)
    held = [s for s in done.steps if s["step"] == "held"]
    assert len(held) == 1 and "hold level 0.0" in held[0]["reason"], done.steps
    waited = store.jobs.get(held[0]["retrain"])
    assert waited.state == "succeeded" and waited.options["requested_by"] == "drift budget"
    exact = store.versions.require_serving("m")
    assert exact.version == waited.to_version and exact.kind == "exact" and exact.parent == before.version
    assert not set(samples) & store.versions.members("m", exact.version)
    assert set(samples) <= store.versions.forgotten("m")
    assert [v.version for v in store.versions.versions("m")][-1] == exact.version  # nothing after it, nothing lost
    if done.to_version not in (None, exact.version):
        assert not workspace.version_dir("m", done.to_version).exists()
    assert_serving(workspace, server, exact.version)
    assert load.failures == [] and set(load.versions) <= {str(before.version), str(exact.version)}
