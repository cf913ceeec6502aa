"""Forget jobs' compute on a real loopback Ray cluster (``--executor ray``): same result as the worker process,
run on the worker node, and a node that dies mid-job leaves everything consistent and the job re-run."""

from __future__ import annotations

import time

import pytest
import torch

from e2e_support import ask_to_forget, assert_serving, audit_kinds, wait_wiped
from test_service_support import FAST_TMU, make_index, make_v1, make_workspace
from tmu_core.device import seed_everything
from tmu_core.forget.executor import ExecutorSettings, LocalExecutor
from tmu_core.forget.pipeline import PipelineConfig, _evaluate, _load, _Run, _unlearn
from tmu_core.forget.ray_executor import RayExecutor, actor_name
from tmu_core.state.jobs import JobStore

pytestmark = [pytest.mark.ray, pytest.mark.integration]

FORGET = ["train/a/0000", "train/b/0001", "train/c/0002"]


def _workspace(tmp):
    workspace = make_workspace(tmp)
    make_index(workspace, tmp, train=8, test=4).close()
    make_v1(workspace, epochs=3)
    return workspace


def _compute(workspace, executor):
    """The pipeline's load, unlearn and evaluate steps of one forget job, with ``executor``."""
    jobs = JobStore(workspace.state_db)
    job = jobs.submit("m", FORGET, options={"method": "tmu", **FAST_TMU})
    jobs.claim_next("m")
    seed_everything(0)  # as the worker does at the start of a job
    run = _Run(workspace, jobs.get(job.id), PipelineConfig(device="cpu"), executor=executor)
    try:
        loaded = _load(run)
        unlearned = _unlearn(run, loaded)
        return loaded, unlearned, _evaluate(run, loaded, unlearned)
    finally:
        run.index.close()


def test_a_forget_job_on_the_ray_worker_node_gives_the_local_result(ray_cluster, tmp_path) -> None:
    cluster, worker = ray_cluster
    local_ws, ray_ws = _workspace(tmp_path / "local"), _workspace(tmp_path / "ray")
    assert local_ws.version_dir("m", 1) != ray_ws.version_dir("m", 1)
    v1 = [torch.load(ws.version_dir("m", 1) / "checkpoint.pt", weights_only=False)["state_dict"]
          for ws in (local_ws, ray_ws)]
    assert all(torch.equal(v1[0][k], v1[1][k]) for k in v1[0])  # the two workspaces start from the same model

    _, local, local_metrics = _compute(local_ws, LocalExecutor())
    executor = RayExecutor(ExecutorSettings(kind="ray", ray_address=cluster.address, ray_num_cpus=2), ray_ws)
    try:
        _, remote, remote_metrics = _compute(ray_ws, executor)
    finally:
        import ray

        ray.kill(ray.get_actor(actor_name(ray_ws, "m"), namespace="tmu-serve"))
        executor.close()

    assert remote.outcome.details["executor"] == {"kind": "ray", "node": worker.node_id}
    ours, theirs = local.outcome.model.state_dict(), remote.outcome.model.state_dict()
    assert ours.keys() == theirs.keys()
    changed = [k for k in ours if not torch.equal(ours[k], v1[0][k].to(ours[k].dtype))]
    assert changed, "the fine-tune changed no weight: nothing was compared"
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"weights differ from the local run's: {different}"
    assert remote.outcome.predicted_hard_ids == local.outcome.predicted_hard_ids
    assert remote.outcome.details["steps"] == local.outcome.details["steps"]
    assert remote_metrics == local_metrics


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout}s")
        time.sleep(0.2)


def test_a_node_that_dies_mid_job_changes_nothing_and_the_job_runs_again_on_a_live_node(ray_cluster, served) -> None:
    """The actor's node is removed while the job's unlearn step runs there: the step fails, the job is undone
    and queued again (what serves, the index and the audit log as they were), and its next attempt runs on a
    new node and succeeds; a second request then finds the actor warm."""
    from tmu_core.forget.dispatcher import Dispatcher, WorkerSettings
    from tmu_core.index import TrainingIndex
    from tmu_core.state.store import StateStore

    cluster, _ = ray_cluster
    workspace, server = served
    doomed = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", resources={"tmu_jobs": 1})
    executor = ExecutorSettings(kind="ray", ray_address=cluster.address, ray_num_cpus=1,
                                ray_resources=(("tmu_jobs", 1.0),), ray_timeout_s=120, pause_at="unlearn", pause_s=90)
    dispatcher = Dispatcher(workspace, WorkerSettings(device="cpu", poll_s=0.2, resume_delay_s=0.5, executor=executor))
    store = StateStore.open(workspace)
    audit_before = audit_kinds(workspace)
    job_id, samples = ask_to_forget(workspace, "owner-a-0")
    dispatcher.start()
    spare = None
    try:
        _wait(lambda: store.jobs.get(job_id).step == "unlearn", 180, "the job's unlearn step")
        time.sleep(1.0)  # the unlearn call reached the paused actor
        cluster.remove_node(doomed)
        _wait(lambda: any(s["step"] == "requeued" for s in store.jobs.get(job_id).steps), 120, "the requeue")
        # Undone: nothing changed while the job waits for its next attempt.
        assert_serving(workspace, server, 1)
        assert audit_kinds(workspace) == audit_before
        with TrainingIndex.open(workspace.index_dir) as index:
            assert not any(index.is_forgotten(s) for s in samples)
        spare = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", resources={"tmu_jobs": 1})
        _wait(lambda: store.jobs.get(job_id).done, 300, "the job's second attempt")
        done = store.jobs.get(job_id)
        assert done.state == "succeeded" and done.attempts == 1, done.reason
        requeued = [s for s in done.steps if s["step"] == "requeued"]
        assert len(requeued) == 1 and "step 'unlearn' failed" in requeued[0]["reason"]
        assert done.result["unlearn_details"]["executor"] == {"kind": "ray", "node": spare.node_id}
        assert_serving(workspace, server, 2)
        wait_wiped(workspace, samples)
        # v1 is purged at once (retention 0), and the samples' pixels wiped once no model needs them
        assert audit_kinds(workspace)[len(audit_before):] == ["forget", "purge", "swap", "wipe"]
        _wait(lambda: (store.jobs.get(job_id).followup or {}).get("artifacts") == "ready", 120, "v2's preparation")

        first = samples
        second, second_samples = ask_to_forget(workspace, "owner-b-0")
        _wait(lambda: store.jobs.get(second).done, 300, "the second job")
        warm = store.jobs.get(second)
        assert warm.state == "succeeded", warm.reason
        assert warm.result["unlearn_details"]["prepared"] == "memory"  # the actor held v2's prepared state
        assert warm.result["unlearn_details"]["executor"]["node"] == spare.node_id
        assert_serving(workspace, server, 3)
        _the_actor_keeps_no_forgotten_sample(workspace, executor, first + second_samples)
    finally:
        dispatcher.stop(wait_s=120)
        if spare is not None:
            cluster.remove_node(spare)


def _the_actor_keeps_no_forgotten_sample(workspace, executor: ExecutorSettings, forgotten: list[str]) -> None:
    """The actor dropped each job's forget set at its end; a sample wiped from the index (here a test image, as
    an owner's test images are) is dropped by ``purge_actors``, with the state built from it; so are weights
    that no longer serve."""
    import ray

    from tmu_core.forget.ray_executor import connect, purge_actors
    from tmu_core.index import TrainingIndex
    from tmu_core.serving.export import sha256_file
    from tmu_core.state.versions import VersionRegistry

    connect(executor.ray_address)
    actor = ray.get_actor(actor_name(workspace, "m"), namespace="tmu-serve")
    serving = sha256_file(VersionRegistry(workspace.state_db).serving("m").checkpoint)
    held = ray.get(actor.holds.remote(serving, forgotten), timeout=60)
    assert held["weights"] and held["missing"] == forgotten  # the serving version's weights, no forgotten pixel
    with TrainingIndex.open(workspace.index_dir) as index:
        train, test = index.ids("train"), index.ids("test")
    assert ray.get(actor.holds.remote(serving, test), timeout=60)["missing"] == []
    wiped = test[0]
    assert purge_actors(executor, workspace, train + test[1:], {"m": serving}) == {"m": {"pixels": 1, "weights": 0}}
    after = ray.get(actor.holds.remote(serving, [wiped]), timeout=60)
    assert after["weights"] is False and after["missing"] == [wiped]  # the state built from it went too
    assert purge_actors(executor, workspace, train + test[1:], {"m": "another"}) == {"m": {"pixels": 0, "weights": 0}}
