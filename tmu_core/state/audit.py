"""The audit log: an append-only, hash-chained table in the state database.

Each record holds what an auditor needs to check that a forget request was honoured, and nothing that could leak
the data itself: the sha256 of every sample id (never raw ids, never pixels). Each record's ``hash`` is
``sha256(prev_hash + canonical JSON of the record)``, so editing, deleting or reordering any row breaks the chain
from that row on; SQLite triggers also refuse UPDATE and DELETE on the table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmu_core.errors import InvalidInputError
from tmu_core.state.db import dumps, read_conn, utc_now, write_tx

logger = logging.getLogger(__name__)

KINDS = ("forget", "swap", "rollback", "purge")
GENESIS = "0" * 64

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS audit (
        seq INTEGER PRIMARY KEY,
        time TEXT NOT NULL,
        kind TEXT NOT NULL,
        model TEXT NOT NULL,
        versions TEXT NOT NULL,
        request_ids TEXT NOT NULL,
        sample_hashes TEXT NOT NULL,
        details TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    )""",
    """CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
       BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
       BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
)


@dataclass(frozen=True)
class AuditRecord:
    """One audit entry. ``versions`` maps a role (``from``, ``to``, ``purged``...) to a version number."""

    seq: int
    time: str
    kind: str
    model: str
    versions: dict[str, Any]
    request_ids: list[str]
    sample_hashes: list[str]
    details: dict[str, Any] = field(default_factory=dict)
    prev_hash: str = GENESIS
    hash: str = ""

    def body(self) -> dict[str, Any]:
        """The hashed part: every field but ``prev_hash`` and ``hash``."""
        return {"seq": self.seq, "time": self.time, "kind": self.kind, "model": self.model,
                "versions": self.versions, "request_ids": self.request_ids,
                "sample_hashes": self.sample_hashes, "details": self.details}


@dataclass(frozen=True)
class AuditVerdict:
    """Result of walking the chain. ``broken_seq`` is the first bad record (None when the chain holds)."""

    ok: bool
    records: int
    broken_seq: int | None = None
    reason: str = ""


def hash_id(sample_id: str) -> str:
    """Hex sha256 of a sample id's UTF-8 bytes: lets an auditor check an id without the log storing it."""
    return hashlib.sha256(sample_id.encode("utf-8")).hexdigest()


def chain_hash(prev_hash: str, body: dict[str, Any]) -> str:
    """``sha256(prev_hash + canonical JSON(body))`` as hex."""
    return hashlib.sha256((prev_hash + dumps(body)).encode("utf-8")).hexdigest()


def _row_to_record(row: sqlite3.Row) -> AuditRecord:
    return AuditRecord(seq=row["seq"], time=row["time"], kind=row["kind"], model=row["model"],
                       versions=json.loads(row["versions"]), request_ids=json.loads(row["request_ids"]),
                       sample_hashes=json.loads(row["sample_hashes"]), details=json.loads(row["details"]),
                       prev_hash=row["prev_hash"], hash=row["hash"])


class AuditLog:
    """The ``audit`` table of ``workspace.state_db``.

    Args:
        path: the SQLite file; the table and its append-only triggers are created on first use.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with write_tx(self.path) as conn:
            for statement in _SCHEMA:
                conn.execute(statement)

    def append(self, kind: str, model: str, versions: dict[str, Any], request_ids: Iterable[str] = (),
               sample_ids: Iterable[str] = (), details: dict[str, Any] | None = None,
               *, conn: sqlite3.Connection | None = None) -> AuditRecord:
        """Append one record, chained to the last one.

        Args:
            kind: one of ``forget``, ``swap``, ``rollback``, ``purge``.
            model: the model the event concerns.
            versions: version numbers by role, e.g. ``{"from": 1, "to": 2}``.
            request_ids: the forget requests (job ids) involved.
            sample_ids: raw sample ids; only their sha256 is stored, sorted.
            details: JSON-ready extras (metrics, reasons, file names).
            conn: an open write transaction to join, so the record commits with the change it describes.

        Raises:
            InvalidInputError: unknown kind.
        """
        if kind not in KINDS:
            raise InvalidInputError(f"audit kind must be one of {', '.join(KINDS)}; got {kind!r}")
        if conn is None:
            with write_tx(self.path) as own:
                return self.append(kind, model, versions, request_ids, sample_ids, details, conn=own)
        last = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (last["seq"] + 1, last["hash"]) if last else (1, GENESIS)
        record = AuditRecord(seq=seq, time=utc_now(), kind=kind, model=model, versions=dict(versions),
                             request_ids=sorted(request_ids), sample_hashes=sorted(hash_id(s) for s in sample_ids),
                             details=dict(details or {}), prev_hash=prev)
        record = AuditRecord(**{**record.__dict__, "hash": chain_hash(prev, record.body())})
        conn.execute("INSERT INTO audit VALUES (?,?,?,?,?,?,?,?,?,?)",
                     (record.seq, record.time, record.kind, record.model, dumps(record.versions),
                      dumps(record.request_ids), dumps(record.sample_hashes), dumps(record.details),
                      record.prev_hash, record.hash))
        logger.info("audit seq=%d kind=%s model=%s requests=%s samples=%d", seq, kind, model,
                    record.request_ids, len(record.sample_hashes))
        return record

    def records(self, model: str | None = None, kind: str | None = None) -> list[AuditRecord]:
        """Records in order, optionally only one model's or one kind's."""
        query, args = "SELECT * FROM audit WHERE 1=1", []
        if model is not None:
            query, args = query + " AND model=?", args + [model]
        if kind is not None:
            query, args = query + " AND kind=?", args + [kind]
        with read_conn(self.path) as conn:
            return [_row_to_record(r) for r in conn.execute(query + " ORDER BY seq", args)]

    def verify(self) -> AuditVerdict:
        """Walk the whole chain and report the first record whose sequence, link or hash is wrong."""
        prev, expected_seq, count = GENESIS, 1, 0
        with read_conn(self.path) as conn:
            for row in conn.execute("SELECT * FROM audit ORDER BY seq"):
                count += 1
                try:
                    record = _row_to_record(row)
                except (ValueError, TypeError) as err:
                    return AuditVerdict(False, count, row["seq"], f"record {row['seq']}: unreadable JSON ({err})")
                reason = _check(record, prev, expected_seq)
                if reason:
                    logger.warning("audit chain broken at seq=%d: %s", record.seq, reason)
                    return AuditVerdict(False, count, record.seq, reason)
                prev, expected_seq = record.hash, record.seq + 1
        return AuditVerdict(True, count)

    def contains_sample(self, sample_id: str) -> list[int]:
        """Sequence numbers of the records that name ``sample_id`` (by hash)."""
        digest = hash_id(sample_id)
        return [r.seq for r in self.records() if digest in r.sample_hashes]


def _check(record: AuditRecord, prev: str, expected_seq: int) -> str:
    if record.seq != expected_seq:
        return f"record {record.seq}: expected sequence number {expected_seq} (a record was removed or reordered)"
    if record.prev_hash != prev:
        return f"record {record.seq}: prev_hash {record.prev_hash[:12]}... does not match the previous record's " \
               f"hash {prev[:12]}..."
    if chain_hash(prev, record.body()) != record.hash:
        return f"record {record.seq}: content does not match its hash (the record was edited)"
    return ""
