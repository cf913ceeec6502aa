"""Rollback to an earlier version, and purge of superseded versions' files after a retention period.

Rolling back to a version trained on samples the model has forgotten would serve them again: it is refused
(``ConflictError``, listing the forget requests) unless the caller passes ``undo_forgets=True``; then those samples
are owed again, and either way the rollback is recorded in the audit log. Purge deletes the archive, checkpoint,
ONNX copy and prepared artifacts of versions that hold forgotten samples (superseded or rolled back), once they
have stopped serving for longer than the retention period; it keeps their reports and registry rows (state
``purged``) and never touches the serving version. The extension purges on its own schedule.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from tmu_core.config import Workspace
from tmu_core.errors import CheckpointError, ConflictError, InvalidInputError
from tmu_core.state.audit import AuditLog
from tmu_core.state.db import write_tx
from tmu_core.state.jobs import JobStore
from tmu_core.state.versions import VersionRecord, VersionRegistry
from tmu_core.service.swap import SwapSettings

logger = logging.getLogger(__name__)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True)
class RollbackResult:
    """What a rollback did."""

    model: str
    from_version: int
    to_version: int
    undone_requests: list[str] = field(default_factory=list)
    seconds: float = 0.0
    owed: int = 0
    owed_pixels_wiped: int = 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, with what to do about owed samples."""
        body = dict(self.__dict__)
        if self.owed:
            body["note"] = (f"{self.owed} sample(s) that {self.model!r} had forgotten are served again and owed; "
                            f"{self.owed_pixels_wiped} of them have no pixels left, so forgetting them again "
                            f"takes a retrain on the retained data (tmu-admin retrain {self.model})")
        return body


@dataclass(frozen=True)
class PurgeResult:
    """Versions whose files a purge deleted (or would delete, in a dry run)."""

    purged: list[dict[str, Any]]
    dry_run: bool = False


def lineage(registry: VersionRegistry, model: str, version: int) -> list[VersionRecord]:
    """``version`` and its ancestors through ``parent``, newest first."""
    chain, seen = [], set()
    current: int | None = version
    while current is not None and current not in seen:
        seen.add(current)
        record = registry.get(model, current)
        chain.append(record)
        current = record.parent
    return chain


def forgotten_in(registry: VersionRegistry, model: str, version: int) -> dict[str, str]:
    """Samples ``model`` has forgotten that ``version`` was trained on: sample id -> forget request.

    A version whose membership is unknown counts as trained on all of them.
    """
    forgotten = registry.membership.forgotten(model)
    found = registry.membership.containing(model, version, forgotten)
    return forgotten if found is None else {sid: forgotten[sid] for sid in found}


def undone_forgets(registry: VersionRegistry, model: str, version: int) -> list[str]:
    """Forget requests that serving ``version`` would undo, sorted."""
    return sorted(set(forgotten_in(registry, model, version).values()))


def _check_rollback(workspace: Workspace, registry: VersionRegistry, model: str,
                    to_version: int) -> tuple[VersionRecord, VersionRecord]:
    current = registry.require_serving(model)
    target = registry.get(model, to_version)
    if target.version == current.version:
        raise ConflictError(f"model {model!r} already serves version {to_version}")
    if target.state == "purged" or not target.archive.exists():
        raise CheckpointError(f"version {to_version} of {model!r} cannot be served again: its archive "
                              f"{target.archive} was purged or is missing")
    busy = JobStore(workspace.state_db).list(model=model, state="running", limit=1)
    if busy:
        raise ConflictError(f"forget job {busy[0].id} is running on {model!r}; roll back after it finishes")
    return current, target


def rollback(workspace: Workspace, model: str, to_version: int, undo_forgets: bool = False,
             settings: SwapSettings | None = None) -> RollbackResult:
    """Serve ``to_version`` again: register its archive if needed, make it default, unregister the current one.

    Holds the model's lock, so no forget job of the model runs meanwhile. Serving a version trained on samples
    the model has forgotten needs ``undo_forgets``; those samples are then owed again (``versions`` and the
    audit log say so), and since their pixels may be wiped already, forgetting them again takes a retrain.

    Args:
        workspace: the workspace (registry, audit log, TorchServe).
        model: the model name.
        to_version: the version to serve.
        undo_forgets: allow serving a version trained on samples the model has forgotten.
        settings: registration and drain timing.

    Raises:
        ModelNotFoundError: unknown model or version. CheckpointError: the version's archive was purged.
        ConflictError: it already serves, a forget job runs, or forgets would be undone without ``undo_forgets``.
        ServerError: TorchServe refused.
    """
    from tmu_core.state.locks import model_lock

    with model_lock(workspace, model, blocking=False, holder="rollback"):
        return _rollback(workspace, model, to_version, undo_forgets, settings or SwapSettings())


def _rollback(workspace: Workspace, model: str, to_version: int, undo_forgets: bool,
              settings: SwapSettings) -> RollbackResult:
    from tmu_core.service import swap

    started = time.perf_counter()
    registry, audit = VersionRegistry(workspace.state_db), AuditLog(workspace.state_db)
    current, target = _check_rollback(workspace, registry, model, to_version)
    owed = forgotten_in(registry, model, to_version)
    undone = sorted(set(owed.values()))
    if undone and not undo_forgets:
        raise ConflictError(f"rolling {model!r} back to version {to_version} would serve {len(owed)} sample(s) "
                            f"forgotten by {len(undone)} forget request(s): {', '.join(undone)}; pass undo_forgets "
                            "(--undo-forgets) to do it anyway")
    swap.serve_only(workspace, model, target.version, target.archive, current.version, settings)
    wiped = _wiped(workspace, owed)
    with write_tx(workspace.state_db) as conn:
        registry.set_state(model, current.version, "rolled_back", conn=conn)
        registry.set_state(model, target.version, "serving", conn=conn)
        registry.membership.mark_owed(conn, model, owed)
        audit.append("rollback", model, {"from": current.version, "to": target.version}, undone, owed,
                     {"undo_forgets": undo_forgets, "undone_requests": undone, "owed": len(owed),
                      "owed_pixels_wiped": wiped}, conn=conn)
    result = RollbackResult(model, current.version, target.version, undone, round(time.perf_counter() - started, 3),
                            owed=len(owed), owed_pixels_wiped=wiped)
    logger.info("rolled back model=%s v%d -> v%d undone=%s owed=%d", model, current.version, target.version,
                undone, len(owed))
    return result


def _wiped(workspace: Workspace, sample_ids: dict[str, str]) -> int:
    """How many of ``sample_ids`` no longer have pixels in the index."""
    if not sample_ids:
        return 0
    from tmu_core.index import TrainingIndex

    with TrainingIndex.open(workspace.index_dir) as index:
        return sum(1 for sid in sample_ids if index.is_forgotten(sid))


def parse_duration(text: str) -> timedelta:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"90s"``, ``"2w"`` -> timedelta.

    Raises:
        InvalidInputError: anything else.
    """
    match = _DURATION.match(text or "")
    if not match:
        raise InvalidInputError(f"duration {text!r} not understood; use a number and a unit s, m, h, d or w "
                                "(e.g. 7d, 12h)")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def purge(workspace: Workspace, older_than: timedelta, dry_run: bool = False, now: datetime | None = None,
          models: list[str] | None = None) -> PurgeResult:
    """Delete the files of versions that hold forgotten samples once they have not served for ``older_than``.

    A version is due when it is ``superseded`` or ``rolled_back``, its model has forgotten a sample it was trained
    on, and it left the serving state more than ``older_than`` ago. Its archive, checkpoint, ONNX copy and
    prepared artifacts are deleted, its membership dropped; its report and registry row (state ``purged``) stay.

    Args:
        workspace: the workspace.
        older_than: retention period, counted from when the version stopped serving.
        dry_run: list what would be deleted, delete nothing.
        now: the current time (for tests).
        models: only these models (default: all).

    Returns:
        The purged versions with the files deleted.
    """
    if older_than < timedelta(0):
        raise InvalidInputError(f"older_than must not be negative, got {older_than}")
    registry, audit = VersionRegistry(workspace.state_db), AuditLog(workspace.state_db)
    cutoff = (now or datetime.now(timezone.utc)) - older_than
    purged = []
    for model in models or registry.models():
        due = [r for r in registry.versions(model)
               if r.state in ("superseded", "rolled_back") and datetime.fromisoformat(r.state_changed_at) <= cutoff
               and forgotten_in(registry, model, r.version)]
        for record in due:
            files = _version_files(workspace, record)
            purged.append({"model": model, "version": record.version, "files": [str(p) for p in files]})
            if not dry_run:
                _purge_one(workspace, registry, audit, record, files)
    return PurgeResult(purged, dry_run)


def purge_due(workspace: Workspace, retention_s: float, models: list[str] | None = None) -> PurgeResult:
    """What the extension runs on its schedule and at the end of each forget job: :func:`purge` with the
    workspace's retention (``--retention``; 0 purges a superseded version as soon as its job finishes)."""
    return purge(workspace, timedelta(seconds=retention_s), models=models)


def _version_files(workspace: Workspace, record: VersionRecord) -> list:
    folder = workspace.version_dir(record.model, record.version)
    paths = [record.archive, record.checkpoint, record.onnx, folder / "artifacts"]
    return [p for p in paths if p is not None and p.exists()]


def _purge_one(workspace: Workspace, registry: VersionRegistry, audit: AuditLog, record: VersionRecord,
               files: list) -> None:
    if registry.get(record.model, record.version).state == "serving":
        raise ConflictError(f"version {record.version} of {record.model!r} serves; it is never purged")
    for path in files:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with write_tx(workspace.state_db) as conn:
        registry.set_state(record.model, record.version, "purged", conn=conn)
        registry.membership.drop(conn, record.model, record.version)
        audit.append("purge", record.model, {"purged": record.version}, [], [],
                     {"files": [p.name for p in files], "superseded_at": record.state_changed_at}, conn=conn)
    logger.info("purged model=%s version=%d files=%d", record.model, record.version, len(files))
