"""Forgetting samples for good: tombstone in one transaction, zero the bytes, then clear the to-do list.

Steps of :func:`forget_samples`:

1. one ``BEGIN IMMEDIATE`` transaction deletes the sample rows and inserts their tombstones (the owner id
   kept only as a keyed HMAC), the request and ``pending_wipe`` rows (the byte ranges still to zero);
2. those ranges of ``blobs.bin`` are overwritten with zeros, flushed and fsynced;
3. the ``pending_wipe`` rows are deleted.

A process killed between the steps leaves ``pending_wipe`` rows behind; :func:`wipe_pending` (run by
``TrainingIndex.open``) redoes step 2 and 3, which is harmless when they already ran.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from tmu_core.errors import ConflictError, InvalidInputError, UnknownIdsError
from tmu_core.index.private import owner_hmac
from tmu_core.index.records import ForgetResult
from tmu_core.index.schema import fetch_by_ids

logger = logging.getLogger(__name__)

_ZERO_BLOCK = 1 << 16


def ids_fingerprint(ids: list[str]) -> str:
    """sha256 hex over the sorted ids joined by newlines."""
    return hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()


def _between_steps() -> None:
    """Runs after the tombstones are committed and before the bytes are zeroed (a seam for crash tests)."""


def _check_request(ids: list[str], request_id: str) -> list[str]:
    if isinstance(ids, str):
        raise InvalidInputError(f"ids must be a list of sample ids, got the string {ids!r}")
    if not ids:
        raise InvalidInputError("no sample ids to forget: expected a non-empty list of sample ids")
    wrong = [repr(i) for i in ids if not isinstance(i, str) or not i]
    if wrong:
        raise InvalidInputError(f"sample ids must be non-empty strings, got {', '.join(wrong[:10])}")
    if not isinstance(request_id, str) or not request_id.strip():
        raise InvalidInputError(f"request_id must be a non-empty string, got {request_id!r}")
    return sorted(set(ids))


def _repeat(row: tuple, request_id: str, ids_hash: str) -> ForgetResult:
    stored_hash, forgotten, already = row
    if stored_hash != ids_hash:
        raise ConflictError(
            f"request {request_id!r} was already carried out with other sample ids; use a new request id"
        )
    logger.info("forget request=%s repeated; nothing changed", request_id)
    return ForgetResult(request_id, json.loads(forgotten), json.loads(already), repeated=True)


def _tombstone(conn: sqlite3.Connection, wanted: list[str], request_id: str, ids_hash: str,
               key: bytes) -> ForgetResult:
    live = {r[0]: r for r in fetch_by_ids(
        conn, "SELECT sample_id, owner_id, split, content_hash, offset, length FROM samples "
        "WHERE sample_id IN ({marks})", wanted)}
    gone = {r[0] for r in fetch_by_ids(conn, "SELECT sample_id FROM tombstones WHERE sample_id IN ({marks})", wanted)}
    unknown = [i for i in wanted if i not in live and i not in gone]
    if unknown:
        raise UnknownIdsError(unknown)
    forgotten, already = sorted(live), sorted(gone)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    conn.execute(
        "INSERT INTO requests (request_id, ids_hash, forgotten, already_forgotten, created_at) VALUES (?, ?, ?, ?, ?)",
        (request_id, ids_hash, json.dumps(forgotten), json.dumps(already), now),
    )
    rows = [live[i] for i in forgotten]
    conn.executemany(
        "INSERT INTO tombstones (sample_id, owner_hmac, content_hash, request_id, forgotten_at, offset, length) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(r[0], owner_hmac(key, r[1]), r[3], request_id, now, r[4], r[5]) for r in rows],
    )
    conn.executemany("INSERT INTO pending_wipe (sample_id, offset, length) VALUES (?, ?, ?)",
                     [(r[0], r[4], r[5]) for r in rows])
    conn.executemany("DELETE FROM samples WHERE sample_id = ?", [(i,) for i in forgotten])
    return ForgetResult(request_id, forgotten, already, repeated=False)


def forget_samples(conn: sqlite3.Connection, blob_path: Path, ids: list[str], request_id: str,
                   key: bytes) -> ForgetResult:
    """Tombstone the given samples (of either split) and zero their bytes (see the module docstring for the steps).

    Args:
        conn: the index database.
        blob_path: its blob file.
        ids: sample ids to forget.
        request_id: the caller's request id.
        key: the index key; tombstones keep the HMAC of the owner id under it, not the owner id.

    Raises:
        InvalidInputError: empty list, bad ids or request id.
        UnknownIdsError: ids that the index never held.
        ConflictError: the request id was used before with other ids.
    """
    wanted = _check_request(ids, request_id)
    ids_hash = ids_fingerprint(wanted)
    conn.execute("BEGIN IMMEDIATE")
    try:
        previous = conn.execute("SELECT ids_hash, forgotten, already_forgotten FROM requests WHERE request_id = ?",
                                (request_id,)).fetchone()
        if previous:
            result = _repeat(previous, request_id, ids_hash)
        else:
            result = _tombstone(conn, wanted, request_id, ids_hash, key)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite already rolled back on some errors (a full disk): keep the real one
            conn.execute("ROLLBACK")
        raise
    _between_steps()
    wipe_pending(conn, blob_path)
    if not result.repeated:
        logger.info("forget request=%s forgot=%d already=%d", request_id, len(result.forgotten),
                    len(result.already_forgotten))
    return result


def zero_ranges(blob_path: Path, ranges: list[tuple[int, int]]) -> None:
    """Overwrite byte ranges of the blob file with zeros, then flush and fsync it."""
    with open(blob_path, "r+b") as blob:
        for offset, length in ranges:
            blob.seek(offset)
            remaining = length
            while remaining > 0:
                step = min(remaining, _ZERO_BLOCK)
                blob.write(bytes(step))
                remaining -= step
        blob.flush()
        os.fsync(blob.fileno())


def wipe_pending(conn: sqlite3.Connection, blob_path: Path) -> int:
    """Zero every byte range still listed in ``pending_wipe``, then clear the list.

    Returns:
        How many ranges were zeroed (0 when nothing was pending).
    """
    pending = conn.execute("SELECT sample_id, offset, length FROM pending_wipe").fetchall()
    if not pending:
        return 0
    zero_ranges(blob_path, [(offset, length) for _, offset, length in pending])
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany("DELETE FROM pending_wipe WHERE sample_id = ?", [(row[0],) for row in pending])
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite already rolled back on some errors (a full disk): keep the real one
            conn.execute("ROLLBACK")
        raise
    # Move the committed pages into the main file and empty the WAL, so old page copies do not linger there.
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return len(pending)
