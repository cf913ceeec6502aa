"""The point of no return of a forget job, and every step after it, which only ever goes forward.

The commit is one state-database transaction: the new version is recorded as the model's serving version with
its training membership (the old one's minus the forgotten samples), the model records the samples as forgotten,
and the audit log gets the forget record. From then on ``tmu-admin serve start`` serves the new version, a
rollback to a version trained on the samples is refused without ``undo_forgets``, and the job can only be
finished: ``set_default`` -> ``drain`` (the old version's queue) -> ``unregister_old`` -> ``cleanup`` (the old
version's prepared artifacts, and with a retention of 0 its archive, checkpoint and ONNX copy; the report; the
swap record and the job's success). Each step is idempotent and retried; a worker that dies or gives up leaves
the job ``running`` at its step, and the dispatcher starts a worker that resumes it there. The samples' pixels
are wiped afterwards by :mod:`tmu_core.forget.wipe`, once no model needs them.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tmu_core.config import Workspace
from tmu_core.forget.retry import RetryPolicy, retry
from tmu_core.state.jobs import Job
from tmu_core.state.store import StateStore

logger = logging.getLogger(__name__)

FORWARD_STEPS = ("set_default", "drain", "unregister_old", "cleanup")


@dataclass(frozen=True)
class CommitPlan:
    """What the commit records: the new version's files and membership, and the samples forgotten."""

    model: str
    source: int
    target: int
    archive: Path
    checkpoint: Path
    onnx: Path | None
    members: tuple[str, ...]
    forgotten: tuple[str, ...]
    request_ids: tuple[str, ...]
    kind: str = "approximate"
    drift: dict[str, Any] | None = None
    drift_policy: Any = None


def _audit_details(job: Job, plan: CommitPlan, result: dict[str, Any]) -> dict[str, Any]:
    if job.kind == "retrain":
        return {"method": "retrain", "metrics": result.get("metrics"), "caught_up": result.get("caught_up"),
                "reason": job.options.get("reason"), "trained_on": len(plan.members)}
    return {"method": result.get("method"), "metrics": result.get("metrics"), "owners": job.owner_ids,
            "forget_request": job.request_id, "already_forgotten": len(job.already_forgotten)}


def kill_point(config: Any, job: Job, name: str) -> None:
    """Test hook: exit the process at ``name`` in the job's first attempt when ``config.kill_at`` says so."""
    if getattr(config, "kill_at", None) == name and job.attempts == 0:
        logger.warning("test hook: worker of job=%s exits at %s", job.id, name)
        os._exit(9)


def is_committed(store: StateStore, job: Job) -> bool:
    """True when ``job``'s commit landed: its new version is recorded as made by it."""
    if job.to_version is None:
        return False
    record = next((v for v in store.versions.versions(job.model) if v.version == job.to_version), None)
    return record is not None and record.forget_request == job.id


def commit_job(store: StateStore, job: Job, plan: CommitPlan, result: dict[str, Any], policy: RetryPolicy) -> None:
    """The commit transaction, retried while the database is locked or full; the job's next step is set in it.

    The new version keeps its ``drift`` record in its metrics; when ``plan.drift_policy`` says the lineage is due,
    the exact retrain is queued in the same transaction (the report says so).

    Raises:
        sqlite3.OperationalError / OSError: still failing after ``policy``; nothing was committed.
    """
    from tmu_core.forget.drift import schedule_if_due

    metrics = {**result.get("metrics", {}), **({"drift": plan.drift} if plan.drift else {})}

    def once() -> None:
        with store.transaction() as conn:
            store.versions.record_version(plan.model, plan.target, plan.archive, plan.checkpoint, plan.onnx,
                                          parent=plan.source, forget_request=job.id, metrics=metrics,
                                          state="serving", members=plan.members, kind=plan.kind, conn=conn)
            if plan.forgotten:
                store.membership.mark_forgotten(conn, plan.model, plan.forgotten, job.id)
            record = store.audit.append(
                "retrain" if job.kind == "retrain" else "forget", plan.model,
                {"from": plan.source, "to": plan.target}, plan.request_ids, plan.forgotten,
                _audit_details(job, plan, result), conn=conn)
            final = {**result, "audit_head": f"{record.seq}:{record.hash}"}
            if plan.drift_policy is not None and "forgetting" in final:
                scheduled = schedule_if_due(store, plan.model, plan.drift, plan.drift_policy, conn=conn)
                outlook = {**final["forgetting"].get("retrain", {}), "scheduled": scheduled}
                final["forgetting"] = {**final["forgetting"], "retrain": outlook}
            store.jobs.set_fields(job.id, result=final, conn=conn)
            store.jobs.enter_step(job.id, FORWARD_STEPS[0], 0.7, conn=conn)

    retry(once, policy, f"commit of job {job.id}")
    logger.info("job=%s committed: model=%s v%s -> v%s", job.id, plan.model, plan.source, plan.target)


def finish_nothing_to_do(store: StateStore, job: Job, ids: list[str]) -> None:
    """The serving version holds none of the samples: record them as forgotten where another version holds
    them (so that version is never served again unawares), and mark the job succeeded."""
    from tmu_core.forget.intake import ForgetSet, fan_out

    plan = fan_out(store, ForgetSet(tuple(ids), tuple(ids), (), {}), job.model)
    held = plan.recorded.get(job.model, ())
    with store.transaction() as conn:
        if held:
            store.membership.mark_forgotten(conn, job.model, held, job.id)
            store.audit.append("forget", job.model, {}, [job.id], held,
                               {"recorded_only": True, "forget_request": job.request_id}, conn=conn)
        store.jobs.finish(job.id, "succeeded", reason="the serving version was not trained on these samples; "
                          "no new version was made", result={"nothing_to_do": True, "recorded": len(held)},
                          conn=conn)


def run_forward(workspace: Workspace, job_id: str, config: Any, resumed: bool = False) -> Job:
    """Run the steps after the commit, from the job's current step on, each retried (``config.retry``).

    Args:
        resumed: this process took the job over at its step (the test hook does not fire there again).

    Raises:
        the last error of a step that kept failing: the job stays ``running`` at that step, to be resumed.
    """
    store = StateStore.open(workspace)
    job = store.jobs.get(job_id)
    start = FORWARD_STEPS.index(job.step) if job.step in FORWARD_STEPS else 0
    for position, name in enumerate(FORWARD_STEPS[start:], start):
        if position > start:
            retry(lambda: store.jobs.enter_step(job.id, name, 0.7 + 0.075 * position), config.retry,
                  f"recording step {name} of job {job.id}")
        if not (resumed and position == start):
            kill_point(config, job, name)
        started = time.perf_counter()
        action: Callable[[], None] = lambda: _FORWARD[name](workspace, store, store.jobs.get(job_id), config)
        retry(action, config.retry, f"step {name} of job {job.id}")
        if name != "cleanup":  # cleanup writes the report and finishes the job with the timings so far
            retry(lambda: _add_timing(store, job_id, name, time.perf_counter() - started), config.retry,
                  f"recording the time of step {name}")
    return store.jobs.get(job_id)


def _add_timing(store: StateStore, job_id: str, name: str, seconds: float) -> None:
    """Add a step's time (and, after ``set_default``, the request-to-serving time) to the job's report."""
    from tmu_core.forget.report import seconds_since

    job = store.jobs.get(job_id)
    timings = {**job.result.get("timings", {}), name: round(seconds, 3)}
    if name == "set_default":
        timings["request_to_serving"] = round(seconds_since(job.created_at), 3)
    store.jobs.set_fields(job_id, result={**job.result, "timings": timings})


def _set_default(workspace: Workspace, store: StateStore, job: Job, config: Any) -> None:
    from tmu_core.service import swap

    target = store.versions.get(job.model, job.to_version)
    swap.serve_only(workspace, job.model, target.version, target.archive, None, config.swap)


def _drain(workspace: Workspace, store: StateStore, job: Job, config: Any) -> None:
    from tmu_core.service import swap

    swap.drain(workspace, job.model, job.from_version, config.swap)


def _unregister_old(workspace: Workspace, store: StateStore, job: Job, config: Any) -> None:
    from tmu_core.service import swap

    swap.unregister(workspace, job.model, job.from_version)


def _cleanup(workspace: Workspace, store: StateStore, job: Job, config: Any) -> None:
    from tmu_core.forget.artifacts import artifacts_dir
    from tmu_core.forget.report import write_report
    from tmu_core.service.rollback import purge_due

    if job.state == "succeeded":
        return
    shutil.rmtree(artifacts_dir(workspace, job.model, job.from_version), ignore_errors=True)
    write_report(workspace.version_dir(job.model, job.to_version), job.result)
    purge_due(workspace, config.retention_s, models=[job.model])
    _, requests = store.jobs.forget_set(job)
    with store.transaction() as conn:
        store.audit.append("swap", job.model, {"from": job.from_version, "to": job.to_version}, requests, (),
                           {"timings": job.result.get("timings"), "unregistered": job.from_version}, conn=conn)
        store.jobs.finish(job.id, "succeeded", reason=None, result=job.result, conn=conn)
    logger.info("job=%s finished: model=%s serves v%s", job.id, job.model, job.to_version)


_FORWARD: dict[str, Callable[[Workspace, StateStore, Job, Any], None]] = {
    "set_default": _set_default, "drain": _drain, "unregister_old": _unregister_old, "cleanup": _cleanup}
