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
from tmu_core.service.audit import AuditLog
from tmu_core.service.db import write_tx
from tmu_core.service.jobs import Job, JobStore
from tmu_core.service.registry import VersionRecord, VersionRegistry
from tmu_core.service.swap import SwapSettings

logger = logging.getLogger(__name__)

# Steps after which TorchServe may hold the new version (entering "register" may already have registered it).
SERVING_STEPS = ("register", "set_default", "drain", "unregister_old", "commit")


def serving_version(registry: VersionRegistry, model: str) -> VersionRecord:
    """The model's serving version.

    Raises:
        ModelNotFoundError: the model has no version in state ``serving``.
    """
    record = registry.serving(model)
    if record is None:
        raise ModelNotFoundError(f"model {model!r} has no serving version in the registry; package and serve it "
                                 "first (tmu-admin package)")
    return record


def packaging_options(archive: Path) -> dict[str, Any]:
    """The serving options of an existing archive (backend, batching, workers), to package the next version alike.

    Raises:
        CheckpointError: the archive is missing or holds no readable ``model-config.yaml``.
    """
    import yaml

    try:
        with zipfile.ZipFile(archive) as mar:
            config = yaml.safe_load(io.BytesIO(mar.read("model-config.yaml"))) or {}
    except (OSError, KeyError, zipfile.BadZipFile, yaml.YAMLError) as err:
        raise CheckpointError(f"cannot read model-config.yaml from {archive}: {err}") from err
    handler = config.get("handler") or {}
    options = {"backend": handler.get("backend"), "top_k": handler.get("top_k"),
               "max_bytes": handler.get("max_bytes"), "batch_size": config.get("batchSize"),
               "max_batch_delay": config.get("maxBatchDelay"), "min_workers": config.get("minWorkers"),
               "max_workers": config.get("maxWorkers"), "response_timeout": config.get("responseTimeout")}
    return {key: value for key, value in options.items() if value is not None}


def remove_version_files(workspace: Workspace, registry: VersionRegistry, model: str, version: int) -> bool:
    """Delete the archive and folder of a version the registry does not hold (left by a failed job).

    Returns:
        True when something was deleted.
    """
    if any(r.version == version for r in registry.versions(model)):
        return False
    removed = False
    archive = workspace.archive_path(model, version)
    if archive.exists():
        archive.unlink()
        removed = True
    folder = workspace.version_dir(model, version)
    if folder.exists():
        shutil.rmtree(folder)
        removed = True
    if removed:
        logger.info("removed leftover files of model=%s version=%d", model, version)
    return removed


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
                      "owners_sha256": _owner_hashes(job), "already_forgotten": len(job.already_forgotten)},
                     conn=conn)
        audit.append("swap", model, {"from": source, "to": target}, requests, (),
                     {"timings": result.get("timings"), "unregistered": source}, conn=conn)
        jobs.finish(job.id, "succeeded", reason=job.reason, result=result, conn=conn)
    logger.info("job=%s committed: model=%s v%s -> v%s", job.id, model, source, target)


def _owner_hashes(job: Job) -> list[str]:
    from tmu_core.service.audit import hash_id

    return sorted(hash_id(owner) for owner in job.owner_ids)


def undo_uncommitted(workspace: Workspace, job: Job, settings: SwapSettings) -> None:
    """Put TorchServe and the files back as they were before ``job`` (which committed nothing).

    Raises:
        ServerError: TorchServe is unreachable or refuses to serve the old version again.
    """
    from tmu_core.service import swap

    if job.from_version is None or job.to_version is None:
        return
    registry = VersionRegistry(workspace.state_db)
    try:
        if job.step in SERVING_STEPS:
            keep = registry.get(job.model, job.from_version)
            swap.serve_only(workspace, job.model, keep.version, keep.archive, job.to_version, settings)
    finally:
        # Even when TorchServe cannot be reached: a restarted TorchServe must not find the new archive.
        remove_version_files(workspace, registry, job.model, job.to_version)


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


def fail_job(workspace: Workspace, job: Job, reason: str, settings: SwapSettings) -> None:
    """Undo what ``job`` changed and mark it failed with ``reason`` (and the undo's own failure, if any)."""
    jobs = JobStore(workspace.state_db)
    try:
        undo_uncommitted(workspace, job, settings)
    except Exception as err:  # the job is failed either way; say what could not be undone
        logger.exception("undo of job=%s failed", job.id)
        reason = f"{reason}; undoing it failed too: {err}"
    jobs.finish(job.id, "failed", reason=reason)


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
