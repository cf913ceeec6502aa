"""Forget requests as the caller made them, and the samples whose pixels are still to be wiped.

A request (``fr-...``) is about data: it names samples (and owners, kept only as keyed hashes) and fans out into
one forget job per model that was trained on them. It is done when every one of its jobs is done and every one
of its samples left the wipe queue. Its state is read from its jobs and the queue, never stored twice.

``wipe_queue (sample_id, request_id)`` lists samples a request asked to delete whose bytes are still in the
training index. The dispatcher wipes a sample once no model needs it any more (no serving version trained on
it, no queued or running job about it): never before the last model that needs it has committed.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmu_core.errors import JobNotFoundError
from tmu_core.state.db import dumps, read_conn, utc_now, write_tx

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS requests (
        id TEXT PRIMARY KEY,
        scope TEXT NOT NULL,
        sample_ids TEXT NOT NULL,
        owner_hashes TEXT NOT NULL,
        idempotency_key TEXT UNIQUE,
        jobs TEXT NOT NULL,
        recorded TEXT NOT NULL,
        created_at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS wipe_queue (
        sample_id TEXT NOT NULL, request_id TEXT NOT NULL, added_at TEXT NOT NULL,
        PRIMARY KEY (sample_id, request_id)) WITHOUT ROWID""",
)
ALL_MODELS = "*"


@dataclass(frozen=True)
class RequestRecord:
    """One stored forget request.

    Attributes:
        id: ``fr-`` followed by 12 hex digits.
        scope: ``*`` (every model trained on the samples) or one model's name.
        sample_ids: every sample the request resolved to (train and test split), sorted.
        owner_hashes: keyed hashes of the owners asked for.
        jobs: ``{"model", "job_id"}`` for each model that unlearns.
        recorded: models that needed no unlearning but had other versions trained on the samples.
    """

    id: str
    scope: str
    sample_ids: list[str]
    owner_hashes: list[str]
    idempotency_key: str | None
    jobs: list[dict[str, str]] = field(default_factory=list)
    recorded: list[str] = field(default_factory=list)
    created_at: str = ""


def _row(row: sqlite3.Row) -> RequestRecord:
    return RequestRecord(id=row["id"], scope=row["scope"], sample_ids=json.loads(row["sample_ids"]),
                         owner_hashes=json.loads(row["owner_hashes"]), idempotency_key=row["idempotency_key"],
                         jobs=json.loads(row["jobs"]), recorded=json.loads(row["recorded"]),
                         created_at=row["created_at"])


class RequestStore:
    """The ``requests`` and ``wipe_queue`` tables of ``workspace.state_db``.

    Args:
        path: the SQLite file; tables are created on first use.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with write_tx(self.path) as conn:
            for statement in _SCHEMA:
                conn.execute(statement)

    @staticmethod
    def new_id() -> str:
        """A fresh request id."""
        return f"fr-{uuid.uuid4().hex[:12]}"

    def insert(self, conn: sqlite3.Connection, record: RequestRecord, wipe: list[str]) -> None:
        """Store a request and queue ``wipe`` for wiping, inside the caller's transaction."""
        conn.execute("INSERT INTO requests VALUES (?,?,?,?,?,?,?,?)",
                     (record.id, record.scope, dumps(record.sample_ids), dumps(record.owner_hashes),
                      record.idempotency_key, dumps(record.jobs), dumps(record.recorded),
                      record.created_at or utc_now()))
        now = utc_now()
        conn.executemany("INSERT OR IGNORE INTO wipe_queue VALUES (?,?,?)",
                         ((sid, record.id, now) for sid in sorted(set(wipe))))

    def get(self, request_id: str) -> RequestRecord:
        """One request.

        Raises:
            JobNotFoundError: no request has that id.
        """
        with read_conn(self.path) as conn:
            row = conn.execute("SELECT * FROM requests WHERE id=?", (request_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(f"no forget request with id {request_id!r}; list them with GET /requests")
        return _row(row)

    def by_key(self, idempotency_key: str) -> RequestRecord | None:
        """The request made with ``idempotency_key``, or None."""
        with read_conn(self.path) as conn:
            row = conn.execute("SELECT * FROM requests WHERE idempotency_key=?", (idempotency_key,)).fetchone()
        return _row(row) if row is not None else None

    def list(self, limit: int = 50) -> list[RequestRecord]:
        """Requests, newest first."""
        with read_conn(self.path) as conn:
            rows = conn.execute("SELECT * FROM requests ORDER BY created_at DESC LIMIT ?", (limit,)).fetchall()
        return [_row(r) for r in rows]

    def pending_wipe(self, request_id: str | None = None) -> dict[str, list[str]]:
        """Sample id -> the requests still waiting for its wipe (only one request's samples, if given)."""
        query, args = "SELECT sample_id, request_id FROM wipe_queue", ()
        if request_id is not None:
            query, args = query + " WHERE request_id=?", (request_id,)
        queued: dict[str, list[str]] = {}
        with read_conn(self.path) as conn:
            for sample_id, owner in conn.execute(query + " ORDER BY sample_id", args):
                queued.setdefault(sample_id, []).append(owner)
        return queued

    def wiped(self, conn: sqlite3.Connection, sample_ids: list[str]) -> None:
        """Take wiped samples off the queue, inside the caller's transaction."""
        conn.executemany("DELETE FROM wipe_queue WHERE sample_id=?", ((sid,) for sid in sample_ids))


def request_state(record: RequestRecord, job_states: dict[str, str], pending_wipe: int) -> str:
    """``failed`` if a job failed for good; ``succeeded`` when every job succeeded and, for a request about every
    model, every sample's pixels are wiped; else ``pending``.

    A request about one model succeeds once that model forgot: its samples' pixels are wiped only when no other
    model needs them, which may be never (``pending_wipe`` says how many wait).
    """
    states = [job_states.get(j["job_id"], "queued") for j in record.jobs]
    if "failed" in states:
        return "failed"
    if all(s == "succeeded" for s in states) and (pending_wipe == 0 or record.scope != ALL_MODELS):
        return "succeeded"
    return "pending"


def request_json(record: RequestRecord, jobs: list[Any], pending_wipe: int) -> dict[str, Any]:
    """The JSON a client sees for a request; ``jobs`` are the request's :class:`Job` rows."""
    by_id = {job.id: job for job in jobs}
    states = {job.id: job.state for job in jobs}
    return {
        "request_id": record.id, "scope": "all" if record.scope == ALL_MODELS else record.scope,
        "state": request_state(record, states, pending_wipe), "samples": len(record.sample_ids),
        "pending_wipe": pending_wipe, "recorded_only": record.recorded, "created_at": record.created_at,
        "jobs": [{"model": j["model"], "job_id": j["job_id"], "state": states.get(j["job_id"]),
                  "step": getattr(by_id.get(j["job_id"]), "step", None),
                  "reason": getattr(by_id.get(j["job_id"]), "reason", None)} for j in record.jobs],
    }
