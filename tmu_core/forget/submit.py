"""Accepting a forget request: check it, find every model it concerns, and record it with its jobs at once.

The request row, one job per model whose serving version was trained on the samples, the models that only
record the forget (their other versions were trained on them), and the samples queued for wiping commit in one
transaction: after a crash either all of it is there or none of it. Owner ids are stored only as keyed hashes.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from tmu_core.config import Workspace
from tmu_core.errors import ConflictError
from tmu_core.forget.intake import FanOut, ForgetRequest, ForgetSet, check_method, check_owed, fan_out, resolve
from tmu_core.state.requests import ALL_MODELS, RequestRecord, request_json
from tmu_core.state.store import StateStore

logger = logging.getLogger(__name__)


def submit_request(workspace: Workspace, store: StateStore, request: ForgetRequest,
                   scope: str | None) -> tuple[dict[str, Any], bool]:
    """Check and record a forget request.

    Args:
        workspace: where the training index is.
        store: the workspace's state store.
        request: the checked request.
        scope: one model's name (``POST /forget/{model}``), or None for every model trained on the samples.

    Returns:
        (the answer as JSON, True when a new request was recorded). An idempotency key used before returns the
        earlier request; a request that changes nothing returns ``state: nothing_to_do``.

    Raises:
        UnknownIdsError: ids or owners the index never held. ModelNotFoundError: ``scope`` serves nothing.
        ConflictError: the key was used with another scope, or owed samples can no longer be unlearned.
        InvalidInputError: unknown method or options.
    """
    if request.idempotency_key:
        existing = store.requests.by_key(request.idempotency_key)
        if existing is not None:
            if existing.scope != (scope or ALL_MODELS):
                raise ConflictError(f"idempotency key {request.idempotency_key!r} was already used for request "
                                    f"{existing.id} with scope {existing.scope!r}")
            return {**_scoped(store, existing, scope), "existing": True}, False
    check_method(request)
    from tmu_core.index import TrainingIndex

    with TrainingIndex.open(workspace.index_dir) as index:
        forget_set = resolve(index, request)
    check_owed(store, forget_set, scope)
    plan = fan_out(store, forget_set, scope)
    if plan.empty:
        return {"request_id": None, "job_id": None, "state": "nothing_to_do",
                "already_forgotten": list(forget_set.already_forgotten),
                "message": "no model is trained on these samples and the index holds none of them any more; "
                           "nothing was queued"}, False
    record = _record(store, request, forget_set, plan, scope)
    return {**_scoped(store, record, scope), "already_forgotten": list(forget_set.already_forgotten),
            "existing": False}, True


def _scoped(store: StateStore, record: RequestRecord, scope: str | None) -> dict[str, Any]:
    """The request's view; for a request about one model, also that model's job as the old API answered it."""
    view = request_view(store, record)
    if scope is None or not record.jobs:
        return {**view, "job_id": None}
    job = store.jobs.get(record.jobs[0]["job_id"])
    return {**view, "job_id": job.id, "job_state": job.state, "model": job.model, "samples": len(job.sample_ids),
            "merged_into": job.merged_into, "links": {"job": f"/jobs/{job.id}", "request": f"/requests/{record.id}"}}


def _record(store: StateStore, request: ForgetRequest, forget_set: ForgetSet, plan: FanOut,
            scope: str | None) -> RequestRecord:
    owners = sorted(store.audit.id_hash(owner) for owner in request.owner_ids)
    record = RequestRecord(id=store.requests.new_id(), scope=scope or ALL_MODELS, sample_ids=list(forget_set.ids),
                           owner_hashes=owners, idempotency_key=request.idempotency_key,
                           recorded=sorted(plan.recorded))
    options = {"method": request.method, **request.options}
    with store.transaction() as conn:
        jobs = []
        for model, ids in sorted(plan.jobs.items()):
            job = store.jobs.submit(model, list(ids), owner_ids=owners, options=options,
                                    already_forgotten=list(forget_set.already_forgotten), request_id=record.id,
                                    conn=conn)
            jobs.append({"model": model, "job_id": job.id})
        record = replace(record, jobs=jobs)
        store.requests.insert(conn, record, list(plan.wipe))
        for model, ids in sorted(plan.recorded.items()):
            store.membership.mark_forgotten(conn, model, ids, record.id)
            store.audit.append("forget", model, {}, [record.id], ids,
                               {"recorded_only": True, "owners": owners,
                                "why": "only versions that no longer serve were trained on these samples"},
                               conn=conn)
    logger.info("request=%s scope=%s samples=%d jobs=%s recorded=%s wipe=%d", record.id, record.scope,
                len(record.sample_ids), [j["model"] for j in jobs], record.recorded, len(plan.wipe))
    return record


def request_view(store: StateStore, record: RequestRecord) -> dict[str, Any]:
    """A request as clients see it: its state, its jobs' states and what is still to wipe."""
    jobs = [store.jobs.get(j["job_id"]) for j in record.jobs]
    pending = store.requests.pending_wipe(record.id)
    return request_json(record, jobs, len(pending))
