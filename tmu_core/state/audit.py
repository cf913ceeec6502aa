"""The audit log: an append-only, hash-chained table in the state database, with a head kept outside it.

Each record holds what an auditor needs to check that a forget request was honoured, and nothing that could leak
the data itself: every sample id (and owner id) is stored as its keyed HMAC-SHA256 under the workspace secret
(``<home>/secret.key``, see :mod:`tmu_core.state.secret`), never raw and never as a plain sha256, which a
dictionary of guessable ids (``train/cat/0001``, e-mail addresses) would reverse. Each record's ``hash`` is
``sha256(prev_hash + canonical JSON of the record)``, so editing, deleting or reordering any row breaks the chain
from that row on; SQLite triggers also refuse UPDATE and DELETE on the table.

A chain alone cannot show that its last records were deleted, or that the whole chain was recomputed. So after
each append commits, a line ``seq hash time`` is appended (fsynced) to ``<home>/audit.head``, and ``verify``
checks that the record the head's last line names still exists with that hash. The line is written after the
COMMIT, so a crash in between leaves the file behind the database (accepted), never ahead of it. A head copied
elsewhere (``tmu-admin audit --show-head``) is checked with ``tmu-admin audit --verify --head SEQ:HASH``.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmu_core.errors import InvalidInputError
from tmu_core.state.db import StateConnection, dumps, read_conn, utc_now, write_tx
from tmu_core.state.secret import fsync_dir, keyed_id, load_or_create_secret

logger = logging.getLogger(__name__)

KINDS = ("forget", "retrain", "swap", "rollback", "purge", "wipe")
GENESIS = "0" * 64
SECRET_NAME = "secret.key"
HEAD_NAME = "audit.head"
HEAD_MODE = 0o600
_HEAD_RE = re.compile(r"(\d+):([0-9a-fA-F]{64})")
_HEAD_TAIL_BYTES = 512  # longer than one head line: seq, 64 hex digits, an ISO time

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
class AuditHead:
    """The newest record a head names: its sequence number and hash (seq 0 and GENESIS for an empty log)."""

    seq: int
    hash: str

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"


@dataclass(frozen=True)
class AuditVerdict:
    """Result of walking the chain. ``broken_seq`` is the first bad record (None when the chain holds).

    ``head`` is the head checked against (None when there was none), ``head_source`` where it came from
    (``"given"`` or the head file's path), and ``note`` says in words what was checked besides the chain.
    """

    ok: bool
    records: int
    broken_seq: int | None = None
    reason: str = ""
    head: AuditHead | None = None
    head_source: str = ""
    note: str = ""


def parse_head(text: str) -> AuditHead:
    """``"12:3f9a..."`` (a record number, a colon, that record's 64 hex-digit hash) -> :class:`AuditHead`.

    Raises:
        InvalidInputError: ``text`` is not of that form.
    """
    match = _HEAD_RE.fullmatch(text.strip())
    if match is None:
        raise InvalidInputError(f"audit head must be SEQ:HASH, a record number, a colon and that record's "
                                f"64 hex-digit hash (as tmu-admin audit --show-head prints it); got {text!r}")
    return AuditHead(int(match.group(1)), match.group(2).lower())


def chain_hash(prev_hash: str, body: dict[str, Any]) -> str:
    """``sha256(prev_hash + canonical JSON(body))`` as hex."""
    return hashlib.sha256((prev_hash + dumps(body)).encode("utf-8")).hexdigest()


def _row_to_record(row: sqlite3.Row) -> AuditRecord:
    return AuditRecord(seq=row["seq"], time=row["time"], kind=row["kind"], model=row["model"],
                       versions=json.loads(row["versions"]), request_ids=json.loads(row["request_ids"]),
                       sample_hashes=json.loads(row["sample_hashes"]), details=json.loads(row["details"]),
                       prev_hash=row["prev_hash"], hash=row["hash"])


class AuditLog:
    """The ``audit`` table of ``workspace.state_db``, its head file and the secret that keys stored ids.

    Args:
        path: the SQLite file; the table and its append-only triggers are created on first use. The head file
            is ``audit.head`` beside it.
        secret_path: the workspace secret (default ``secret.key`` beside ``path``), created when missing.

    Raises:
        CheckpointError: the secret file is open to group or others, or does not hold 32 bytes.
    """

    def __init__(self, path: Path, secret_path: Path | None = None) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(HEAD_NAME)
        self._secret = load_or_create_secret(secret_path or self.path.with_name(SECRET_NAME))
        with write_tx(self.path) as conn:
            for statement in _SCHEMA:
                conn.execute(statement)

    def id_hash(self, value: str) -> str:
        """The keyed hash the log stores for a sample or owner id: ``keyed_id(workspace secret, value)``."""
        return keyed_id(self._secret, value)

    def append(self, kind: str, model: str, versions: dict[str, Any], request_ids: Iterable[str] = (),
               sample_ids: Iterable[str] = (), details: dict[str, Any] | None = None,
               *, conn: StateConnection | None = None) -> AuditRecord:
        """Append one record, chained to the last one; its head line is written once the transaction commits.

        Args:
            kind: one of ``forget``, ``retrain`` (an exact version made), ``swap``, ``rollback``, ``purge``, ``wipe`` (pixels wiped from the index).
            model: the model the event concerns.
            versions: version numbers by role, e.g. ``{"from": 1, "to": 2}``.
            request_ids: the forget requests (job ids) involved.
            sample_ids: raw sample ids; only their keyed hashes (:meth:`id_hash`) are stored, sorted.
            details: JSON-ready extras (metrics, reasons, file names); ids in it must already be keyed hashes.
            conn: an open :func:`~tmu_core.state.db.write_tx` transaction to join, so the record commits with the
                change it describes.

        Raises:
            InvalidInputError: unknown kind, or ``conn`` is not a ``write_tx`` connection.
        """
        if kind not in KINDS:
            raise InvalidInputError(f"audit kind must be one of {', '.join(KINDS)}; got {kind!r}")
        if conn is None:
            with write_tx(self.path) as own:
                return self.append(kind, model, versions, request_ids, sample_ids, details, conn=own)
        if not isinstance(conn, StateConnection):
            raise InvalidInputError(f"audit append needs a connection from tmu_core.state.db.write_tx (its head "
                                    f"line is written after the COMMIT); got {type(conn).__name__}")
        last = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (last["seq"] + 1, last["hash"]) if last else (1, GENESIS)
        record = AuditRecord(seq=seq, time=utc_now(), kind=kind, model=model, versions=dict(versions),
                             request_ids=sorted(request_ids), sample_hashes=sorted(map(self.id_hash, sample_ids)),
                             details=dict(details or {}), prev_hash=prev)
        record = AuditRecord(**{**record.__dict__, "hash": chain_hash(prev, record.body())})
        conn.execute("INSERT INTO audit VALUES (?,?,?,?,?,?,?,?,?,?)",
                     (record.seq, record.time, record.kind, record.model, dumps(record.versions),
                      dumps(record.request_ids), dumps(record.sample_hashes), dumps(record.details),
                      record.prev_hash, record.hash))
        conn.after_commit.append(functools.partial(append_head_line, self.head_path, record))
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

    def head(self) -> AuditHead:
        """The last record's sequence number and hash (``AuditHead(0, GENESIS)`` for an empty log)."""
        with read_conn(self.path) as conn:
            row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        return AuditHead(row["seq"], row["hash"]) if row else AuditHead(0, GENESIS)

    def verify(self, head: AuditHead | None = None) -> AuditVerdict:
        """Walk the whole chain and check it against a head, reporting the first thing that is wrong.

        Args:
            head: a head kept elsewhere. Without one, the last line of the head file is used when the file exists.
                The record ``head.seq`` must exist and have ``head.hash``; records newer than the head are fine.

        Returns:
            The verdict; ``note`` says which head was checked, or that there was none.
        """
        source = "given"
        if head is None:
            # Read the file before the table: its lines follow commits, so it can only be behind what we read next.
            head, source = read_head_file(self.head_path), str(self.head_path)
        verdict, head_hash = self._walk(head.seq if head else None)
        if head is None:
            return AuditVerdict(**{**verdict.__dict__, "note": f"no head line in {self.head_path}; "
                                                              "checked the chain only"})
        return _against_head(verdict, head, head_hash, source)

    def _walk(self, head_seq: int | None) -> tuple[AuditVerdict, str | None]:
        """The chain's verdict, and the hash of record ``head_seq`` when the walk reached it."""
        prev, expected_seq, count = GENESIS, 1, 0
        head_hash = GENESIS if head_seq == 0 else None
        with read_conn(self.path) as conn:
            for row in conn.execute("SELECT * FROM audit ORDER BY seq"):
                count += 1
                try:
                    record = _row_to_record(row)
                except (ValueError, TypeError) as err:
                    reason = f"record {row['seq']}: unreadable JSON ({err})"
                    return AuditVerdict(False, count, row["seq"], reason), head_hash
                reason = _check(record, prev, expected_seq)
                if reason:
                    logger.warning("audit chain broken at seq=%d: %s", record.seq, reason)
                    return AuditVerdict(False, count, record.seq, reason), head_hash
                head_hash = record.hash if record.seq == head_seq else head_hash
                prev, expected_seq = record.hash, record.seq + 1
        return AuditVerdict(True, count), head_hash

    def contains_sample(self, sample_id: str) -> list[int]:
        """Sequence numbers of the records that name ``sample_id`` (by its keyed hash)."""
        digest = self.id_hash(sample_id)
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


def _against_head(verdict: AuditVerdict, head: AuditHead, head_hash: str | None, source: str) -> AuditVerdict:
    """``verdict`` of the chain walk, failed when the record ``head`` names is missing or has another hash."""
    fields = {**verdict.__dict__, "head": head, "head_source": source}
    if not verdict.ok:
        return AuditVerdict(**fields)
    if head_hash is None:
        reason = (f"the head {head.seq}:{head.hash[:12]}... ({source}) names record {head.seq}, but the log ends "
                  f"at record {verdict.records}: records {verdict.records + 1}..{head.seq} were removed")
        logger.warning("audit log behind its head: %s", reason)
        return AuditVerdict(**{**fields, "ok": False, "broken_seq": verdict.records + 1, "reason": reason})
    if head_hash != head.hash:
        reason = (f"record {head.seq}: hash {head_hash[:12]}... differs from the head's {head.hash[:12]}... "
                  f"({source}): the chain was rewritten")
        logger.warning("audit log does not match its head: %s", reason)
        return AuditVerdict(**{**fields, "ok": False, "broken_seq": head.seq, "reason": reason})
    newer = verdict.records - head.seq
    note = f"matches head {head.seq}:{head.hash[:12]}... ({source})" + \
        (f"; {newer} record(s) newer than the head" if newer else "")
    return AuditVerdict(**{**fields, "note": note})


def append_head_line(path: Path, record: AuditRecord) -> None:
    """Append ``seq hash time`` for a committed ``record`` to the head file (mode 0600), fsynced.

    Writers take an exclusive lock on the file. A line is skipped when the file already names this record or a
    newer one (two processes' after-commit steps can run out of order), so the file's sequence numbers only grow.
    """
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, HEAD_MODE)
    try:
        os.fchmod(fd, HEAD_MODE)  # the umask can only narrow O_CREAT's mode; set it exactly
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        tail = os.pread(fd, _HEAD_TAIL_BYTES, max(0, size - _HEAD_TAIL_BYTES))
        last = _last_head(tail)
        if last is not None and last.seq >= record.seq:
            return
        # A line torn by a crash has no newline: start on a fresh line so the new one stays readable.
        prefix = b"\n" if tail and not tail.endswith(b"\n") else b""
        os.write(fd, prefix + f"{record.seq} {record.hash} {record.time}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    if size == 0:
        fsync_dir(path.parent)


def read_head_file(path: Path) -> AuditHead | None:
    """The head in the last readable line of the head file; None when the file is missing or has no such line."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    return _last_head(data)


def _last_head(data: bytes) -> AuditHead | None:
    """The last line of ``data`` that reads as ``seq hash time`` (a torn line from a crash is skipped)."""
    for line in reversed(data.decode("utf-8", errors="replace").splitlines()):
        parts = line.split()
        if len(parts) == 3 and _HEAD_RE.fullmatch(f"{parts[0]}:{parts[1]}"):
            return AuditHead(int(parts[0]), parts[1].lower())
    return None

