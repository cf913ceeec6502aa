"""Undo for a job that failed before its commit: TorchServe and the files go back to how they were.

Before the commit nothing that a job did is visible to clients: the new version may be registered in TorchServe
(under its own version number, not the default) and its files may be on disk. Undoing means unregistering it and
deleting its files; the serving version, the index and the state database are untouched.
"""

from __future__ import annotations

import logging
import shutil

from tmu_core.config import Workspace
from tmu_core.forget.drift import HeldForRetrain
from tmu_core.state.jobs import Job, JobStore
from tmu_core.state.versions import VersionRegistry
from tmu_core.service.swap import SwapSettings

logger = logging.getLogger(__name__)

# Steps before the commit in which TorchServe may hold the new version (entering "register" may have registered it).
SERVING_STEPS = ("register", "commit")
# Waits before a job that failed before its commit runs again: 5 s, 10 s, 20 s, ... at most 5 minutes.
REQUEUE_FIRST_S, REQUEUE_MAX_S = 5.0, 300.0


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


def fail_or_requeue(workspace: Workspace, job: Job, reason: str, settings: SwapSettings, max_attempts: int) -> None:
    """Undo what ``job`` changed before its commit, then queue it again, or fail it after its last attempt.

    An accepted request must end with the model no longer trained on the samples, so a failure (a killed
    worker, a locked database, TorchServe restarting) costs an attempt, not the request.
    """
    jobs = JobStore(workspace.state_db)
    try:
        undo_uncommitted(workspace, job, settings)
    except Exception as err:  # the next attempt unregisters a stale version first; say what could not be undone
        logger.exception("undo of job=%s failed", job.id)
        reason = f"{reason}; undoing it failed too: {err}"
    if job.attempts + 1 < max_attempts:
        jobs.requeue(job.id, reason, min(REQUEUE_MAX_S, REQUEUE_FIRST_S * 2 ** job.attempts))
    else:
        jobs.finish(job.id, "failed", reason=f"{reason} (attempt {job.attempts + 1} of {max_attempts}, the last)")


def hold_for_retrain(workspace: Workspace, job: Job, held: HeldForRetrain, settings: SwapSettings) -> None:
    """Undo what ``job`` changed before its commit and queue it again behind the retrain it waits for, without
    counting an attempt."""
    try:
        undo_uncommitted(workspace, job, settings)
    except Exception:  # nothing was registered before the hold; the next attempt removes leftovers first
        logger.exception("undo of held job=%s failed", job.id)
    VersionRegistry(workspace.state_db).release(job.model, job.id)  # its version comes after the retrain's
    JobStore(workspace.state_db).hold(job.id, held.retrain_id, str(held))


def fail_job(workspace: Workspace, job: Job, reason: str, settings: SwapSettings) -> None:
    """Undo what ``job`` changed and mark it failed with ``reason`` (and the undo's own failure, if any)."""
    jobs = JobStore(workspace.state_db)
    try:
        undo_uncommitted(workspace, job, settings)
    except Exception as err:  # the job is failed either way; say what could not be undone
        logger.exception("undo of job=%s failed", job.id)
        reason = f"{reason}; undoing it failed too: {err}"
    jobs.finish(job.id, "failed", reason=reason)
