"""SQLite helpers shared by the registry, the audit log and the job store.

All three live in one file (``workspace.state_db``) that several processes use at once: the extension service,
its job workers and the CLI. Every call opens a short-lived connection in WAL mode with a busy timeout, and writes
run in ``BEGIN IMMEDIATE`` transactions so that two writers never interleave a read-modify-write. Commits are
durable (``synchronous=FULL``): in WAL mode ``NORMAL`` can lose the last commits on a power cut, while the index,
which runs ``FULL``, keeps its deletion. Effects outside the database that must follow a commit (the audit head
file) are registered on the connection's ``after_commit`` list and run only once the COMMIT has succeeded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tmu_core.config import make_private, secure_mkdir

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 30.0


class StateConnection(sqlite3.Connection):
    """A connection with ``after_commit``: callables :func:`write_tx` runs after its COMMIT succeeds.

    They are dropped, never run, when the transaction rolls back or its COMMIT fails.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.after_commit: list[Callable[[], None]] = []


def connect(path: Path) -> StateConnection:
    """Open ``path`` (creating its folder) in WAL mode with rows addressable by column name."""
    path = Path(path)
    secure_mkdir(path.parent)
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None, factory=StateConnection)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):  # owner-only: jobs, versions, audit log
        make_private(name)
    return conn


@contextlib.contextmanager
def write_tx(path: Path) -> Iterator[StateConnection]:
    """A write transaction: committed when the block ends, rolled back if it raises.

    After the COMMIT, the connection's ``after_commit`` callables run in order; a rolled-back one runs none.
    """
    conn = connect(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.after_commit.clear()
            if conn.in_transaction:  # SQLite already rolled back on some errors (a full disk): keep the real one
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        _run_after_commit(conn)
    finally:
        conn.close()


def _run_after_commit(conn: StateConnection) -> None:
    callbacks, conn.after_commit = conn.after_commit, []
    for callback in callbacks:
        try:
            callback()
        except Exception:  # the transaction has committed: a failed side effect must not report it as failed
            logger.exception("after-commit step %r failed; the transaction itself committed", callback)


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
