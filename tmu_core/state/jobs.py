"""The forget-job queue: a persistent table in the state database.

A job is a ``forget`` job (it makes the model forget samples) or a ``retrain`` job (an exact retrain of the model on
its retained samples, :mod:`tmu_core.forget.retrain`). A job is ``queued``, then ``running`` (with its current step and progress 0..1), then ``succeeded`` or ``failed``
(with the reason). One job of each kind runs at a time per model: a retrain trains beside the forget jobs
and takes the model's lock only to swap its version in. A request that arrives while another request for the same
model is still queued with the same options is merged into it: the later job keeps its own id, records
``merged_into``, and mirrors the state of the job that carries it; the carrying job lists it in ``merged_from``.
Merging never touches a running job, whose forget set is fixed when it starts. Retrain jobs never merge; a model
has at most one queued or running retrain.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmu_core.errors import ConflictError, InvalidInputError, JobNotFoundError
from tmu_core.state.db import dumps, read_conn, utc_now, write_tx

logger = logging.getLogger(__name__)

JOB_STATES = ("queued", "running", "succeeded", "failed")
JOB_KINDS = ("forget", "retrain")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    state TEXT NOT NULL,
    step TEXT,
    progress REAL NOT NULL DEFAULT 0,
    reason TEXT,
    sample_ids TEXT NOT NULL,
    owner_ids TEXT NOT NULL,
    already_forgotten TEXT NOT NULL,
    options TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    merged_into TEXT,
    merged_from TEXT NOT NULL,
    steps TEXT NOT NULL,
    from_version INTEGER,
    to_version INTEGER,
    worker_pid INTEGER,
    result TEXT NOT NULL,
    followup TEXT NOT NULL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    request_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before TEXT,
    kind TEXT NOT NULL DEFAULT 'forget'
)
"""
# Columns added after the first release: an older state database gets them on open.
_ADDED_COLUMNS = {"request_id": "TEXT", "attempts": "INTEGER NOT NULL DEFAULT 0", "not_before": "TEXT",
                  "kind": "TEXT NOT NULL DEFAULT 'forget'"}
_JSON_COLUMNS = ("sample_ids", "owner_ids", "already_forgotten", "options", "merged_from", "steps", "result",
                 "followup")


@dataclass(frozen=True)
class Job:
    """One job as stored (``kind`` ``forget`` or ``retrain``). ``steps`` lists ``{"step", "at"}`` in the order the worker entered them."""

    id: str
    model: str
    state: str
    step: str | None
    progress: float
    reason: str | None
    sample_ids: list[str]
    owner_ids: list[str]
    already_forgotten: list[str]
    options: dict[str, Any]
    idempotency_key: str | None
    merged_into: str | None
    merged_from: list[str]
    steps: list[dict[str, Any]]
    from_version: int | None
    to_version: int | None
    worker_pid: int | None
    result: dict[str, Any] = field(default_factory=dict)
    followup: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    request_id: str | None = None
    attempts: int = 0
    not_before: str | None = None
    kind: str = "forget"

    @property
    def done(self) -> bool:
        """True once the job succeeded or failed."""
        return self.state in ("succeeded", "failed")

    def method(self) -> tuple[str, dict[str, Any]]:
        """The forget method this (forget) job asked for and its options: ``tmu`` when it names none."""
        options = dict(self.options)
        return options.pop("method", "tmu"), options

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dict(self.__dict__)


def _row_to_job(row: sqlite3.Row) -> Job:
    values = dict(row)
    for column in _JSON_COLUMNS:
        values[column] = json.loads(values[column])
    return Job(**values)


class JobStore:
    """The ``jobs`` table of ``workspace.state_db``.

    Args:
        path: the SQLite file; the table is created on first use.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with write_tx(self.path) as conn:
            conn.execute(_SCHEMA)
            present = {row["name"] for row in conn.execute("PRAGMA table_info(jobs)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in present:
                    conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
            conn.execute("CREATE INDEX IF NOT EXISTS jobs_model_state ON jobs (model, state)")

    def submit(self, model: str, sample_ids: list[str], owner_ids: list[str] | None = None,
               options: dict[str, Any] | None = None, idempotency_key: str | None = None,
               already_forgotten: list[str] | None = None, request_id: str | None = None,
               *, conn: sqlite3.Connection | None = None) -> Job:
        """Queue a forget job (or return the job already made for ``idempotency_key``).

        Args:
            model: the model to make forget.
            sample_ids: the resolved forget set (requested ids plus the owners' samples), validated by the caller.
            owner_ids: the owners that were asked for, kept for the record.
            options: unlearning options (JSON-ready); requests merge only when their options are equal.
            idempotency_key: a caller-chosen key; the same key returns the same job.
            already_forgotten: requested ids the index had already forgotten (reported, not redone).
            request_id: the forget request this job is part of.
            conn: an open write transaction to join (the request and its jobs commit together).

        Raises:
            InvalidInputError: empty forget set. ConflictError: the key was used for another model.
        """
        if not sample_ids:
            raise InvalidInputError("a forget job needs at least one sample id")
        options = dict(options or {})
        if conn is None:
            with write_tx(self.path) as own:
                job_id = self._submit(own, model, sample_ids, owner_ids, options, idempotency_key,
                                      already_forgotten, request_id)
            return self.get(job_id)
        job_id = self._submit(conn, model, sample_ids, owner_ids, options, idempotency_key, already_forgotten,
                              request_id)
        return _row_to_job(conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone())

    def _submit(self, conn: sqlite3.Connection, model: str, sample_ids: list[str], owner_ids: list[str] | None,
                options: dict[str, Any], idempotency_key: str | None, already_forgotten: list[str] | None,
                request_id: str | None) -> str:
        if idempotency_key is not None:
            existing = conn.execute("SELECT * FROM jobs WHERE idempotency_key=?", (idempotency_key,)).fetchone()
            if existing is not None:
                return self._same_key(_row_to_job(existing), model, idempotency_key).id
        primary = self._merge_target(conn, model, options)
        job_id = f"fj-{uuid.uuid4().hex[:12]}"
        conn.execute(
            "INSERT INTO jobs (id, model, state, progress, sample_ids, owner_ids, already_forgotten, options, "
            "idempotency_key, merged_into, merged_from, steps, result, followup, created_at, request_id) "
            "VALUES (?,?,'queued',0,?,?,?,?,?,?,'[]','[]','{}','{}',?,?)",
            (job_id, model, dumps(sorted(set(sample_ids))), dumps(sorted(owner_ids or [])),
             dumps(sorted(already_forgotten or [])), dumps(options), idempotency_key,
             primary.id if primary else None, utc_now(), request_id))
        if primary is not None:
            conn.execute("UPDATE jobs SET merged_from=? WHERE id=?",
                         (dumps(primary.merged_from + [job_id]), primary.id))
            logger.info("job=%s merged into queued job=%s model=%s", job_id, primary.id, model)
        else:
            logger.info("job=%s queued model=%s samples=%d", job_id, model, len(sample_ids))
        return job_id

    @staticmethod
    def _same_key(job: Job, model: str, key: str) -> Job:
        if job.model != model:
            raise ConflictError(f"idempotency key {key!r} was already used for job {job.id} on model "
                                f"{job.model!r}, not {model!r}")
        logger.info("idempotency key %r returns existing job=%s", key, job.id)
        return job

    @staticmethod
    def _merge_target(conn: sqlite3.Connection, model: str, options: dict[str, Any]) -> Job | None:
        rows = conn.execute("SELECT * FROM jobs WHERE model=? AND state='queued' AND merged_into IS NULL "
                            "AND kind='forget' ORDER BY created_at", (model,)).fetchall()
        return next((job for job in map(_row_to_job, rows) if job.options == options), None)

    def get(self, job_id: str) -> Job:
        """One job.

        Raises:
            JobNotFoundError: no job has that id.
        """
        with read_conn(self.path) as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(f"no job with id {job_id!r}; list jobs with GET /jobs or `tmu-admin jobs`")
        return _row_to_job(row)

    def by_key(self, idempotency_key: str) -> Job | None:
        """The job made for ``idempotency_key``, or None."""
        with read_conn(self.path) as conn:
            row = conn.execute("SELECT * FROM jobs WHERE idempotency_key=?", (idempotency_key,)).fetchone()
        return _row_to_job(row) if row is not None else None

    def list(self, model: str | None = None, state: str | None = None, limit: int = 100) -> list[Job]:
        """Jobs, newest first, optionally filtered by model and state.

        Raises:
            InvalidInputError: unknown state or a limit below 1.
        """
        if state is not None and state not in JOB_STATES:
            raise InvalidInputError(f"state must be one of {', '.join(JOB_STATES)}; got {state!r}")
        if limit < 1:
            raise InvalidInputError(f"limit must be >= 1, got {limit}")
        query, args = "SELECT * FROM jobs WHERE 1=1", []
        if model is not None:
            query, args = query + " AND model=?", args + [model]
        if state is not None:
            query, args = query + " AND state=?", args + [state]
        with read_conn(self.path) as conn:
            rows = conn.execute(query + " ORDER BY created_at DESC LIMIT ?", args + [limit]).fetchall()
        return [_row_to_job(r) for r in rows]

    def count(self) -> int:
        """How many jobs the table holds."""
        with read_conn(self.path) as conn:
            return conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]

    def queued_models(self) -> list[str]:
        """Models with at least one queued job that is not merged into another."""
        with read_conn(self.path) as conn:
            rows = conn.execute("SELECT DISTINCT model FROM jobs WHERE state='queued' AND merged_into IS NULL "
                                "ORDER BY model").fetchall()
        return [r[0] for r in rows]

    def claim_next(self, model: str, kind: str = "forget") -> Job | None:
        """Mark the oldest queued job of ``model`` and ``kind`` running, unless one of that kind is running
        already; None if nothing to do."""
        with write_tx(self.path) as conn:
            if conn.execute("SELECT 1 FROM jobs WHERE model=? AND state='running' AND merged_into IS NULL "
                            "AND kind=?", (model, kind)).fetchone():
                return None
            row = conn.execute("SELECT id FROM jobs WHERE model=? AND state='queued' AND merged_into IS NULL "
                               "AND kind=? AND (not_before IS NULL OR not_before <= ?) ORDER BY created_at LIMIT 1",
                               (model, kind, utc_now())).fetchone()
            if row is None:
                return None
            self._set(conn, row["id"], state="running", step="starting", progress=0.0, started_at=utc_now())
        return self.get(row["id"])

    def submit_retrain(self, model: str, options: dict[str, Any], *,
                       conn: sqlite3.Connection | None = None) -> tuple[Job, bool]:
        """Queue an exact retrain of ``model``, unless one is queued or running: then return that one.

        Args:
            options: why and for what (JSON-ready): ``reason``, the ``exact_base`` it replaces, ``requested_by``.
            conn: an open write transaction to join (a forget job's commit schedules its retrain with it).

        Returns:
            The job, and True when it was queued now.
        """
        if conn is None:
            with write_tx(self.path) as own:
                job, created = self.submit_retrain(model, options, conn=own)
            return self.get(job.id), created
        row = conn.execute("SELECT * FROM jobs WHERE model=? AND kind='retrain' AND state IN ('queued','running') "
                           "ORDER BY created_at LIMIT 1", (model,)).fetchone()
        if row is not None:
            return _row_to_job(row), False
        job_id = f"rj-{uuid.uuid4().hex[:12]}"
        conn.execute(
            "INSERT INTO jobs (id, model, state, progress, sample_ids, owner_ids, already_forgotten, options, "
            "merged_from, steps, result, followup, created_at, kind) "
            "VALUES (?,?,'queued',0,'[]','[]','[]',?,'[]','[]','{}','{}',?,'retrain')",
            (job_id, model, dumps(dict(options)), utc_now()))
        logger.info("job=%s queued: retrain model=%s (%s)", job_id, model, options.get("reason"))
        return _row_to_job(conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()), True

    def busy_forgets(self) -> list[Job]:
        """Forget jobs of any model that use the CPU now: running, or succeeded and preparing the next version's
        artifacts (their ``followup``). What a low-priority retrain waits for."""
        with read_conn(self.path) as conn:
            rows = conn.execute("SELECT * FROM jobs WHERE kind='forget' AND (state='running' OR (state='succeeded' "
                                "AND json_extract(followup, '$.artifacts')='preparing'))").fetchall()
        return [_row_to_job(r) for r in rows]

    def retrains(self, model: str, *, conn: sqlite3.Connection | None = None) -> list[Job]:
        """``model``'s retrain jobs, newest first."""
        if conn is None:
            with read_conn(self.path) as own:
                return self.retrains(model, conn=own)
        rows = conn.execute("SELECT * FROM jobs WHERE model=? AND kind='retrain' ORDER BY created_at DESC",
                            (model,)).fetchall()
        return [_row_to_job(r) for r in rows]

    def forget_set(self, job: Job) -> tuple[list[str], list[str]]:
        """The sample ids and request ids a job carries: its own plus those of the jobs merged into it."""
        ids, requests = set(job.sample_ids), [job.id]
        for merged_id in job.merged_from:
            ids.update(self.get(merged_id).sample_ids)
            requests.append(merged_id)
        return sorted(ids), requests

    def enter_step(self, job_id: str, step: str, progress: float, *,
                   conn: sqlite3.Connection | None = None) -> None:
        """Record that the worker entered ``step``; progress is the whole job's fraction done (0..1).

        Args:
            conn: an open write transaction to join (the commit records its next step with the commit).
        """
        if conn is None:
            with write_tx(self.path) as own:
                return self.enter_step(job_id, step, progress, conn=own)
        row = conn.execute("SELECT steps FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(f"no job with id {job_id!r}")
        steps = json.loads(row["steps"]) + [{"step": step, "at": utc_now()}]
        self._set(conn, job_id, step=step, progress=_clamp(progress), steps=dumps(steps))
        return None

    def set_progress(self, job_id: str, progress: float) -> None:
        """Update the progress (0..1) within the current step."""
        with write_tx(self.path) as conn:
            self._set(conn, job_id, progress=_clamp(progress))

    def set_fields(self, job_id: str, *, conn: sqlite3.Connection | None = None, **values: Any) -> None:
        """Set plain columns (``worker_pid``, ``from_version``, ``to_version``) or JSON ones (``result``...).

        Args:
            conn: an open write transaction to join.
        """
        allowed = {"worker_pid", "from_version", "to_version", "result", "followup", "reason"}
        unknown = set(values) - allowed
        if unknown:
            raise InvalidInputError(f"cannot set job fields {sorted(unknown)}; settable: {sorted(allowed)}")
        encoded = {k: dumps(v) if k in _JSON_COLUMNS else v for k, v in values.items()}
        if conn is not None:
            self._set(conn, job_id, mirror=False, **encoded)
            return
        with write_tx(self.path) as own:
            self._set(own, job_id, mirror=False, **encoded)

    def requeue(self, job_id: str, reason: str, delay_s: float) -> None:
        """Put a job that failed before its commit back in the queue (attempts + 1), not before ``delay_s``."""
        from datetime import datetime, timedelta, timezone

        later = (datetime.now(timezone.utc) + timedelta(seconds=delay_s)).isoformat(timespec="microseconds")
        attempts = self._back_to_queue(job_id, {"step": "requeued", "reason": reason}, reason, 1, later)
        logger.warning("job=%s requeued (attempt %d) in %.0fs: %s", job_id, attempts + 1, delay_s, reason)

    def hold(self, job_id: str, retrain_id: str, reason: str) -> None:
        """Put a job back in the queue behind retrain ``retrain_id`` (the dispatcher starts none of the model's
        forget jobs until that retrain is done); unlike :meth:`requeue` it costs no attempt."""
        self._back_to_queue(job_id, {"step": "held", "retrain": retrain_id, "reason": reason}, reason, 0, None)
        logger.info("job=%s waits for retrain %s: %s", job_id, retrain_id, reason)

    def _back_to_queue(self, job_id: str, record: dict[str, Any], reason: str, attempts: int,
                       not_before: str | None) -> int:
        """Queue a job again with ``record`` added to its steps; returns its attempts now."""
        with write_tx(self.path) as conn:
            row = conn.execute("SELECT steps, attempts FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(f"no job with id {job_id!r}")
            steps = json.loads(row["steps"]) + [{**record, "at": utc_now()}]
            self._set(conn, job_id, state="queued", step=None, progress=0.0, reason=reason, started_at=None)
            conn.execute("UPDATE jobs SET steps=?, attempts=?, not_before=?, worker_pid=NULL WHERE id=?",
                         (dumps(steps), row["attempts"] + attempts, not_before, job_id))
        return row["attempts"] + attempts

    def active_retrain(self, model: str) -> Job | None:
        """``model``'s queued or running retrain job, if any."""
        return next((j for j in self.retrains(model) if j.state in ("queued", "running")), None)

    def held_for(self, model: str) -> set[str]:
        """The retrain jobs that queued forget jobs of ``model`` wait for (:meth:`hold`)."""
        with read_conn(self.path) as conn:
            rows = conn.execute("SELECT steps FROM jobs WHERE model=? AND kind='forget' AND state='queued' "
                                "AND merged_into IS NULL", (model,)).fetchall()
        last = [json.loads(r["steps"])[-1:] for r in rows]
        return {s[0]["retrain"] for s in last if s and s[0]["step"] == "held"}

    def finish(self, job_id: str, state: str, reason: str | None = None, result: dict[str, Any] | None = None,
               *, conn: sqlite3.Connection | None = None) -> None:
        """Mark a job (and the jobs merged into it) ``succeeded`` or ``failed``.

        Args:
            conn: an open write transaction to join, so the outcome commits with the change it describes.
        """
        if state not in ("succeeded", "failed"):
            raise InvalidInputError(f"a job finishes as succeeded or failed, not {state!r}")
        if conn is None:
            with write_tx(self.path) as own:
                return self.finish(job_id, state, reason, result, conn=own)
        values: dict[str, Any] = {"state": state, "reason": reason, "finished_at": utc_now()}
        if state == "succeeded":
            values["progress"] = 1.0
        if result is not None:
            values["result"] = dumps(result)
        self._set(conn, job_id, **values)
        logger.info("job=%s %s%s", job_id, state, f": {reason}" if reason else "")
        return None

    @staticmethod
    def _set(conn: sqlite3.Connection, job_id: str, mirror: bool = True, **values: Any) -> None:
        """Update columns of a job; with ``mirror`` the jobs merged into it get the same state/step/progress."""
        assignments = ", ".join(f"{k}=?" for k in values)
        conn.execute(f"UPDATE jobs SET {assignments} WHERE id=?", (*values.values(), job_id))
        shared = {k: v for k, v in values.items() if k in ("state", "step", "progress", "reason", "started_at",
                                                            "finished_at")}
        if mirror and shared:
            assignments = ", ".join(f"{k}=?" for k in shared)
            conn.execute(f"UPDATE jobs SET {assignments} WHERE merged_into=?", (*shared.values(), job_id))


def _clamp(progress: float) -> float:
    return min(1.0, max(0.0, float(progress)))
