"""Finishing and undoing forget jobs: the commit transaction, and the undo of a failed or dead job.

A job's only committed changes are the index deletion and the one state-database transaction that follows it
(version record, audit records, job ``succeeded``). Before the deletion, undoing a job means: make the old version
the registered default again (re-registering its archive if it was already unregistered), unregister the new
version, and delete the new version's files. After the deletion (the worker died between the two commits), the
job is finished instead: the new version serves, and the records are written from what the job stored.
"""

from __future__ import annotations

import io
import logging
import shutil
import zipfile
from pathlib import Path
from typing import Any

from tmu_core.config import Workspace
from tmu_core.errors import CheckpointError, ModelNotFoundError
from tmu_core.state.audit import AuditLog
from tmu_core.state.db import write_tx
from tmu_core.state.jobs import Job, JobStore
from tmu_core.state.versions import VersionRecord, VersionRegistry
from tmu_core.service.swap import SwapSettings
from tmu_core.forget.undo import fail_job

logger = logging.getLogger(__name__)



def finish_commit(workspace: Workspace, job: Job) -> None:
    """After the index deletion: record the new version, the audit records and success, in one transaction."""
    result = job.result
    model, source, target = job.model, job.from_version, job.to_version
    folder = workspace.version_dir(model, target)
    onnx = folder / "model.onnx"
    registry, audit, jobs = (VersionRegistry(workspace.state_db), AuditLog(workspace.state_db),
                             JobStore(workspace.state_db))
    ids, requests = jobs.forget_set(job)
    with write_tx(workspace.state_db) as conn:
        registry.record_version(model, target, workspace.archive_path(model, target), folder / "checkpoint.pt",
                                onnx if onnx.exists() else None, parent=source, forget_request=job.id,
                                metrics=result.get("metrics", {}), state="serving", conn=conn)
        audit.append("forget", model, {"from": source, "to": target}, requests, ids,
                     {"method": result.get("method"), "metrics": result.get("metrics"),
                      "owner_hashes": sorted(map(audit.id_hash, job.owner_ids)),
                      "already_forgotten": len(job.already_forgotten)},
                     conn=conn)
        audit.append("swap", model, {"from": source, "to": target}, requests, (),
                     {"timings": result.get("timings"), "unregistered": source}, conn=conn)
        jobs.finish(job.id, "succeeded", reason=job.reason, result=result, conn=conn)
    logger.info("job=%s committed: model=%s v%s -> v%s", job.id, model, source, target)


def index_committed(workspace: Workspace, job: Job) -> bool:
    """True when the index holds a tombstone made by ``job`` (its deletion committed)."""
    from tmu_core.index import TrainingIndex

    ids, _ = JobStore(workspace.state_db).forget_set(job)
    with TrainingIndex.open(workspace.index_dir) as index:
        for sample_id in ids:
            stone = index.tombstone(sample_id)
            if stone is not None and stone.request_id == job.id:
                return True
    return False


def recover_job(workspace: Workspace, job: Job, reason: str, settings: SwapSettings | None = None) -> None:
    """Deal with a job whose worker died: finish it if the index deletion committed, else undo and fail it."""
    settings = settings or SwapSettings()
    if job.step == "commit" and job.result and index_committed(workspace, job):
        logger.warning("job=%s: the index deletion had committed; finishing the job (%s)", job.id, reason)
        finished = JobStore(workspace.state_db).get(job.id)
        finish_commit(workspace, _with_reason(finished, f"{reason}; the index deletion had committed, so "
                                                        "recovery recorded the new version"))
        return
    fail_job(workspace, job, reason + "; no change was committed", settings)


def _with_reason(job: Job, reason: str) -> Job:
    from dataclasses import replace

    return replace(job, reason=reason)
