"""SQLite helpers shared by the registry, the audit log and the job store.

All three live in one file (``workspace.state_db``) that several processes use at once: the extension service,
its job workers and the CLI. Every call opens a short-lived connection in WAL mode with a busy timeout, and writes
run in ``BEGIN IMMEDIATE`` transactions so that two writers never interleave a read-modify-write.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tmu_core.config import make_private, secure_mkdir

BUSY_TIMEOUT_S = 30.0


def connect(path: Path) -> sqlite3.Connection:
    """Open ``path`` (creating its folder) in WAL mode with rows addressable by column name."""
    path = Path(path)
    secure_mkdir(path.parent)
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):  # owner-only: jobs, versions, audit log
        make_private(name)
    return conn


@contextlib.contextmanager
def write_tx(path: Path) -> Iterator[sqlite3.Connection]:
    """A write transaction: committed when the block ends, rolled back if it raises."""
    conn = connect(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        conn.close()


@contextlib.contextmanager
def read_conn(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection for reads, closed when the block ends."""
    conn = connect(path)
    try:
        yield conn
    finally:
        conn.close()


def utc_now() -> str:
    """The current UTC time as ISO 8601 with microseconds, e.g. ``2024-05-01T12:00:00.123456+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def parse_time(text: str) -> datetime:
    """Inverse of :func:`utc_now`."""
    return datetime.fromisoformat(text)


def dumps(value: Any) -> str:
    """Canonical JSON: sorted keys, no spaces, UTF-8 kept as is. Used for stored JSON and for hashing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
