"""Undo for a job that failed before its commit: TorchServe and the files go back to how they were.

Before the commit nothing that a job did is visible to clients: the new version may be registered in TorchServe
(under its own version number, not the default) and its files may be on disk. Undoing means unregistering it and
deleting its files; the serving version, the index and the state database are untouched.
"""

from __future__ import annotations

import logging
import shutil

from tmu_core.config import Workspace
from tmu_core.state.jobs import Job, JobStore
from tmu_core.state.versions import VersionRegistry
from tmu_core.service.swap import SwapSettings

logger = logging.getLogger(__name__)

# Steps after which TorchServe may hold the new version (entering "register" may already have registered it).
SERVING_STEPS = ("register", "set_default", "drain", "unregister_old", "commit")


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


def fail_job(workspace: Workspace, job: Job, reason: str, settings: SwapSettings) -> None:
    """Undo what ``job`` changed and mark it failed with ``reason`` (and the undo's own failure, if any)."""
    jobs = JobStore(workspace.state_db)
    try:
        undo_uncommitted(workspace, job, settings)
    except Exception as err:  # the job is failed either way; say what could not be undone
        logger.exception("undo of job=%s failed", job.id)
        reason = f"{reason}; undoing it failed too: {err}"
    jobs.finish(job.id, "failed", reason=reason)
