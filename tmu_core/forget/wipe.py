"""Wiping the pixels of forgotten samples from the training index, once no model needs them.

A forget request queues its samples for wiping (``wipe_queue``). A training sample is still needed while any
model's serving version was trained on it (that model must still unlearn it, and the unlearning reads its
pixels), a queued or running job names it, or the model that forgot it has a retrain running (the network it
trains may hold the sample, and its catch-up reads the pixels to unlearn it). A test-split sample (an owner's held-out image, used by TMU's twin
problem and by the evaluation split) is wiped when no job runs, and every prepared artifact folder is deleted
then, because each was built from that split. The dispatcher calls :func:`sweep` on every pass; it is
idempotent, so a crash at any point is repaired by the next pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
from dataclasses import dataclass

from tmu_core.config import Workspace
from tmu_core.state.store import StateStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepResult:
    """What a sweep did: samples wiped now, samples still needed by a model or a job."""

    wiped: tuple[str, ...] = ()
    waiting: int = 0


def _needed(store: StateStore, queued: set[str], train: set[str]) -> tuple[set[str], bool]:
    """Queued samples that a serving version or a queued/running job still needs; and whether a job runs."""
    needed: set[str] = set()
    for model in store.versions.models():
        serving = store.versions.serving(model)
        if serving is not None:
            found = store.membership.containing(model, serving.version, train)
            needed |= train if found is None else found
    running = store.jobs.list(state="running", limit=10_000)
    for job in running + store.jobs.list(state="queued", limit=10_000):
        needed |= queued & set(job.sample_ids)
    for model in {job.model for job in running if job.kind == "retrain"}:
        needed |= train & set(store.versions.forgotten(model))  # the retrain's network may hold them: see above
    return needed, bool(running)


def sweep(workspace: Workspace, store: StateStore | None = None) -> SweepResult:
    """Wipe every queued sample that nothing needs any more, and take it off the queue."""
    from tmu_core.index import TrainingIndex

    store = store or StateStore.open(workspace)
    queue = store.requests.pending_wipe()
    if not queue:
        return SweepResult()
    with TrainingIndex.open(workspace.index_dir) as index:
        gone = {sid for sid in queue if index.is_forgotten(sid)}
        live = sorted(set(queue) - gone)
        splits = {r.sample_id: r.split for r in index.lookup(live)} if live else {}
        train = {sid for sid, split in splits.items() if split == "train"}
        needed, job_runs = _needed(store, set(queue), train)
        wipe = [sid for sid in live if sid not in needed and splits[sid] == "train"]
        held_out = [sid for sid in live if splits[sid] != "train"]
        with contextlib.ExitStack() as locks:
            if held_out and not job_runs and _lock_prepared_state(workspace, store, locks):
                wipe = sorted(wipe + held_out)
                _drop_prepared_state(workspace, store)
            if wipe:
                batch = "wipe-" + hashlib.sha256("\n".join(wipe).encode()).hexdigest()[:16]
                index.forget(wipe, batch)
    done = sorted(gone | set(wipe))
    if done:
        requests = sorted({r for sid in done for r in queue[sid]})
        with store.transaction() as conn:
            store.requests.wiped(conn, done)
            store.audit.append("wipe", "*", {}, requests, done, {"wiped": len(wipe), "already_gone": len(gone)},
                               conn=conn)
        logger.info("wiped %d samples (%d were already gone) for requests %s", len(wipe), len(gone), requests)
    return SweepResult(wiped=tuple(wipe), waiting=len(queue) - len(done))


def _prepared_folders(workspace: Workspace, store: StateStore) -> list:
    from tmu_core.forget.artifacts import artifacts_dir

    folders = [artifacts_dir(workspace, model, v.version) for model in store.versions.models()
               for v in store.versions.versions(model)]
    return [folder for folder in folders if folder.exists()]


def _lock_prepared_state(workspace: Workspace, store: StateStore, locks: contextlib.ExitStack) -> bool:
    """Lock every prepared-artifacts folder without waiting; False when one is being prepared right now."""
    from tmu_core.forget.artifacts import artifacts_lock

    try:
        for folder in _prepared_folders(workspace, store):
            locks.enter_context(artifacts_lock(folder, blocking=False))
    except BlockingIOError:
        logger.info("a version's artifacts are being prepared; held-out samples are wiped on a later pass")
        return False
    return True


def _drop_prepared_state(workspace: Workspace, store: StateStore) -> None:
    """Delete every version's prepared artifacts: they were built from a test split that loses samples."""
    for folder in _prepared_folders(workspace, store):
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("deleted prepared artifacts in %s (the test split changed)", folder)
