"""The versions registry: every model version tmu-serve made, with file hashes, lineage and state.

A version is ``serving`` while it is the model's default in TorchServe, ``superseded`` once a forget request
replaced it, ``rolled_back`` once a rollback moved away from it, and ``purged`` once its archive and checkpoint
were deleted. At most one version of a model is ``serving``.

A version is ``exact`` when it was trained on exactly its membership (an original model, or a retrain on the
retained samples) and ``approximate`` when a forget method (TMU or another) derived it from its parent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmu_core.errors import CheckpointError, ConflictError, InvalidInputError, ModelNotFoundError
from tmu_core.state.db import dumps, read_conn, utc_now, write_tx
from tmu_core.state.membership import Membership

logger = logging.getLogger(__name__)

STATES = ("serving", "superseded", "rolled_back", "purged")
KINDS = ("exact", "approximate")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    parent INTEGER,
    forget_request TEXT,
    archive TEXT NOT NULL,
    archive_sha256 TEXT NOT NULL,
    checkpoint TEXT NOT NULL,
    checkpoint_sha256 TEXT NOT NULL,
    onnx TEXT,
    onnx_sha256 TEXT,
    metrics TEXT NOT NULL,
    created_at TEXT NOT NULL,
    state TEXT NOT NULL,
    state_changed_at TEXT NOT NULL,
    kind TEXT,
    PRIMARY KEY (model, version)
)
"""
_COLUMNS = ("model", "version", "parent", "forget_request", "archive", "archive_sha256", "checkpoint",
            "checkpoint_sha256", "onnx", "onnx_sha256", "metrics", "created_at", "state", "state_changed_at", "kind")
# Version numbers handed out but not (yet) recorded: a job and `tmu-admin package` never pick the same one.
_RESERVATIONS = """
CREATE TABLE IF NOT EXISTS reservations (
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    holder TEXT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (model, version)
)
"""


@dataclass(frozen=True)
class VersionRecord:
    """One row of the registry. Paths are absolute; hashes are hex sha256 of the file when it was recorded."""

    model: str
    version: int
    parent: int | None
    forget_request: str | None
    archive: Path
    archive_sha256: str
    checkpoint: Path
    checkpoint_sha256: str
    onnx: Path | None
    onnx_sha256: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    state: str = "serving"
    state_changed_at: str = ""
    kind: str = "exact"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (paths as strings)."""
        return {
            "model": self.model, "version": self.version, "parent": self.parent,
            "forget_request": self.forget_request, "archive": str(self.archive),
            "archive_sha256": self.archive_sha256, "checkpoint": str(self.checkpoint),
            "checkpoint_sha256": self.checkpoint_sha256, "onnx": str(self.onnx) if self.onnx else None,
            "onnx_sha256": self.onnx_sha256, "metrics": self.metrics, "created_at": self.created_at,
            "state": self.state, "state_changed_at": self.state_changed_at, "kind": self.kind,
        }


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks.

    Raises:
        CheckpointError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file {path} does not exist; cannot record its hash")
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _row_to_record(row: sqlite3.Row) -> VersionRecord:
    return VersionRecord(
        model=row["model"], version=row["version"], parent=row["parent"], forget_request=row["forget_request"],
        archive=Path(row["archive"]), archive_sha256=row["archive_sha256"],
        checkpoint=Path(row["checkpoint"]), checkpoint_sha256=row["checkpoint_sha256"],
        onnx=Path(row["onnx"]) if row["onnx"] else None, onnx_sha256=row["onnx_sha256"],
        metrics=json.loads(row["metrics"]), created_at=row["created_at"], state=row["state"],
        state_changed_at=row["state_changed_at"],
        # rows recorded before the column existed: a version made by a forget request is approximate
        kind=row["kind"] or ("exact" if row["forget_request"] is None else "approximate"),
    )


class VersionRegistry:
    """Model versions in ``workspace.state_db`` (table ``versions``).

    Args:
        path: the SQLite file; created with its tables on first use.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with write_tx(self.path) as conn:
            conn.execute(_SCHEMA)
            if "kind" not in {row["name"] for row in conn.execute("PRAGMA table_info(versions)")}:
                conn.execute("ALTER TABLE versions ADD COLUMN kind TEXT")
            conn.execute(_RESERVATIONS)
        self.membership = Membership(self.path)

    def record_version(self, model: str, version: int, archive: Path, checkpoint: Path, onnx: Path | None,
                       parent: int | None, forget_request: str | None, metrics: dict[str, Any],
                       *, state: str = "serving", members: Any = None, kind: str | None = None,
                       conn: sqlite3.Connection | None = None) -> VersionRecord:
        """Record a new version, hashing its files. A new ``serving`` version supersedes the one serving before.

        Args:
            model: model name as TorchServe knows it.
            version: version number (TorchServe version string ``str(version)``), >= 1.
            archive: the ``.mar`` file; checkpoint: the ``checkpoint.pt``; onnx: the ONNX copy or None.
            parent: the version this one was derived from, or None for an original model.
            forget_request: the forget request (job id) that produced it, or None.
            metrics: JSON-ready numbers worth keeping with the version.
            state: initial state, one of ``STATES`` except ``purged``.
            members: the sample ids the version was trained on (None: unknown, read as every training sample).
            kind: ``exact`` or ``approximate``; None: ``exact`` for an original (no ``forget_request``), else
                ``approximate``.
            conn: an open write transaction to join (used to commit a version with its audit record).

        Raises:
            InvalidInputError: bad version number or state. ConflictError: the version already exists.
            CheckpointError: a file is missing.
        """
        if not isinstance(version, int) or version < 1:
            raise InvalidInputError(f"version must be an integer >= 1, got {version!r}")
        if state not in STATES or state == "purged":
            raise InvalidInputError(f"state must be one of serving, superseded, rolled_back; got {state!r}")
        kind = kind or ("exact" if forget_request is None else "approximate")
        if kind not in KINDS:
            raise InvalidInputError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
        onnx_path = Path(onnx).absolute() if onnx else None
        values = (model, version, parent, forget_request, str(Path(archive).absolute()), file_sha256(archive),
                  str(Path(checkpoint).absolute()), file_sha256(checkpoint),
                  str(onnx_path) if onnx_path else None, file_sha256(onnx_path) if onnx_path else None,
                  dumps(metrics), utc_now(), state, kind)
        if conn is None:
            with write_tx(self.path) as own:
                return self.record_version(model, version, archive, checkpoint, onnx, parent, forget_request,
                                           metrics, state=state, members=members, kind=kind, conn=own)
        self._insert(conn, values)
        if members is not None:
            self.membership.record(conn, model, version, members)
        conn.execute("DELETE FROM reservations WHERE model=? AND version=?", (model, version))
        logger.info("recorded model=%s version=%d state=%s parent=%s", model, version, state, parent)
        return self.get(model, version, conn=conn)

    @staticmethod
    def _insert(conn: sqlite3.Connection, values: tuple) -> None:
        model, version, state, now = values[0], values[1], values[12], values[11]
        if conn.execute("SELECT 1 FROM versions WHERE model=? AND version=?", (model, version)).fetchone():
            raise ConflictError(f"model {model!r} already has a version {version}; the next free one is "
                                f"{_next(conn, model)}")
        if state == "serving":
            conn.execute("UPDATE versions SET state='superseded', state_changed_at=? "
                         "WHERE model=? AND state='serving'", (now, model))
        row = dict(zip(_COLUMNS[:13] + _COLUMNS[14:], values), state_changed_at=now)
        conn.execute(f"INSERT INTO versions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                     tuple(row.values()))

    def set_state(self, model: str, version: int, state: str, *, conn: sqlite3.Connection | None = None) -> None:
        """Move a version to ``state``; making one ``serving`` demotes the serving one to ``superseded``.

        Raises:
            InvalidInputError: unknown state. ModelNotFoundError: no such version.
        """
        if state not in STATES:
            raise InvalidInputError(f"state must be one of {', '.join(STATES)}; got {state!r}")
        if conn is None:
            with write_tx(self.path) as own:
                return self.set_state(model, version, state, conn=own)
        self.get(model, version, conn=conn)
        now = utc_now()
        if state == "serving":
            conn.execute("UPDATE versions SET state='superseded', state_changed_at=? "
                         "WHERE model=? AND state='serving' AND version<>?", (now, model, version))
        conn.execute("UPDATE versions SET state=?, state_changed_at=? WHERE model=? AND version=?",
                     (state, now, model, version))
        return None

    def versions(self, model: str) -> list[VersionRecord]:
        """All versions of ``model``, oldest first (empty when the model is unknown)."""
        with read_conn(self.path) as conn:
            rows = conn.execute("SELECT * FROM versions WHERE model=? ORDER BY version", (model,)).fetchall()
        return [_row_to_record(row) for row in rows]

    def models(self) -> list[str]:
        """Names of all models with at least one version, sorted."""
        with read_conn(self.path) as conn:
            return [row[0] for row in conn.execute("SELECT DISTINCT model FROM versions ORDER BY model")]

    def get(self, model: str, version: int, *, conn: sqlite3.Connection | None = None) -> VersionRecord:
        """One version.

        Raises:
            ModelNotFoundError: the model or the version is unknown (the message lists the known versions).
        """
        if conn is None:
            with read_conn(self.path) as own:
                return self.get(model, version, conn=own)
        row = conn.execute("SELECT * FROM versions WHERE model=? AND version=?", (model, version)).fetchone()
        if row is None:
            known = [r[0] for r in conn.execute("SELECT version FROM versions WHERE model=? ORDER BY version",
                                                (model,))]
            if not known:
                raise ModelNotFoundError(f"model {model!r} has no recorded versions; known models: "
                                         f"{', '.join(self.models()) or 'none'}")
            raise ModelNotFoundError(f"model {model!r} has no version {version}; known versions: "
                                     f"{', '.join(map(str, known))}")
        return _row_to_record(row)

    def latest(self, model: str) -> VersionRecord | None:
        """The highest-numbered version of ``model``, or None."""
        records = self.versions(model)
        return records[-1] if records else None

    def serving(self, model: str) -> VersionRecord | None:
        """The version in state ``serving``, or None."""
        return next((r for r in self.versions(model) if r.state == "serving"), None)

    def require_serving(self, model: str) -> VersionRecord:
        """The version in state ``serving``.

        Raises:
            ModelNotFoundError: the model has no serving version.
        """
        record = self.serving(model)
        if record is None:
            raise ModelNotFoundError(f"model {model!r} has no serving version in the registry; package and serve "
                                     "it first (tmu-admin package)")
        return record

    def next_version(self, model: str) -> int:
        """One more than the highest recorded or reserved version (1 for a new model)."""
        with read_conn(self.path) as conn:
            return _next(conn, model)

    def reserve(self, model: str, holder: str, version: int | None = None) -> int:
        """Reserve a version number for ``holder`` (a job id, or ``package``): the next free one, or ``version``.

        A holder that already reserved a number for ``model`` that is still unrecorded gets the same one back, unless
        a higher version was recorded since (a retrain landed while a held job waited): then its old number is let go
        and it gets the next free one, so a version's number is always above its parent's.

        Raises:
            ConflictError: ``version`` is recorded or reserved by another holder.
        """
        with write_tx(self.path) as conn:
            if version is None:
                mine = conn.execute("SELECT version FROM reservations WHERE model=? AND holder=? ORDER BY version "
                                    "DESC LIMIT 1", (model, holder)).fetchone()
                newest = conn.execute("SELECT MAX(version) FROM versions WHERE model=?", (model,)).fetchone()[0]
                if mine is not None and (newest is None or mine[0] > newest):
                    return int(mine[0])
                if mine is not None:
                    conn.execute("DELETE FROM reservations WHERE model=? AND holder=?", (model, holder))
                version = _next(conn, model)
            taken = conn.execute("SELECT holder FROM reservations WHERE model=? AND version=?",
                                 (model, version)).fetchone()
            recorded = conn.execute("SELECT 1 FROM versions WHERE model=? AND version=?", (model, version)).fetchone()
            if recorded or (taken and taken[0] != holder):
                raise ConflictError(f"version {version} of {model!r} is already "
                                    f"{'recorded' if recorded else 'reserved by ' + taken[0]}; the next free one "
                                    f"is {_next(conn, model)}")
            conn.execute("INSERT OR IGNORE INTO reservations VALUES (?,?,?,?)", (model, version, holder, utc_now()))
        return version

    def release(self, model: str, holder: str) -> None:
        """Let go of the numbers ``holder`` reserved for ``model`` and never recorded (a job that serves nothing)."""
        with write_tx(self.path) as conn:
            conn.execute("DELETE FROM reservations WHERE model=? AND holder=?", (model, holder))

    def members(self, model: str, version: int) -> set[str] | None:
        """The sample ids ``version`` was trained on (None when its membership was never recorded)."""
        return self.membership.members(model, version)

    def forgotten(self, model: str) -> set[str]:
        """Sample ids ``model`` has forgotten (committed forget requests not undone by a rollback)."""
        return set(self.membership.forgotten(model))

    def owed(self, model: str) -> set[str]:
        """Sample ids a rollback with ``undo_forgets`` made ``model`` trained on again."""
        return set(self.membership.owed(model))


def _next(conn: sqlite3.Connection, model: str) -> int:
    row = conn.execute("SELECT MAX(version) FROM versions WHERE model=?", (model,)).fetchone()
    reserved = conn.execute("SELECT MAX(version) FROM reservations WHERE model=?", (model,)).fetchone()
    return max(row[0] or 0, reserved[0] or 0) + 1
