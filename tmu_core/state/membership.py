"""Which samples each model version was trained on, and which samples each model has forgotten or owes again.

Three tables of the state database:

- ``members (model, version, sample_id)``: the training set of a version, recorded with the version. A derived
  version's members are its parent's minus the samples its forget request removed. A version recorded without a
  membership (an older workspace) counts as trained on every training sample of the index, the safe reading.
- ``forgotten (model, sample_id, request_id)``: the model committed to no longer being trained on the sample. A
  version whose members include a forgotten sample is never served again unless a rollback undoes the forget.
- ``owed (model, sample_id, request_id)``: a rollback with ``undo_forgets`` served such a version: the model is
  trained on the sample again and owes its forgetting (``versions`` and the audit log say so).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

from tmu_core.state.db import read_conn, utc_now, write_tx

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS members (
        model TEXT NOT NULL, version INTEGER NOT NULL, sample_id TEXT NOT NULL,
        PRIMARY KEY (model, version, sample_id)) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS members_sample ON members (sample_id)",
    """CREATE TABLE IF NOT EXISTS forgotten (
        model TEXT NOT NULL, sample_id TEXT NOT NULL, request_id TEXT NOT NULL, at TEXT NOT NULL,
        PRIMARY KEY (model, sample_id)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS owed (
        model TEXT NOT NULL, sample_id TEXT NOT NULL, request_id TEXT NOT NULL, at TEXT NOT NULL,
        PRIMARY KEY (model, sample_id)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS recorded_membership (
        model TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (model, version)) WITHOUT ROWID""",
)
_CHUNK = 500


def create_tables(conn: sqlite3.Connection) -> None:
    """Create the membership tables (idempotent)."""
    for statement in _SCHEMA:
        conn.execute(statement)


def _chunks(ids: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(ids), _CHUNK):
        yield ids[start:start + _CHUNK]


class Membership:
    """Training membership, forgotten and owed samples, in ``workspace.state_db``.

    Args:
        path: the SQLite file; tables are created on first use.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with write_tx(self.path) as conn:
            create_tables(conn)

    def record(self, conn: sqlite3.Connection, model: str, version: int, sample_ids: Iterable[str]) -> None:
        """Record a version's training set inside the caller's transaction."""
        conn.execute("INSERT OR IGNORE INTO recorded_membership VALUES (?, ?)", (model, version))
        conn.executemany("INSERT OR IGNORE INTO members VALUES (?, ?, ?)",
                         ((model, version, sid) for sid in sorted(set(sample_ids))))

    def members(self, model: str, version: int) -> set[str] | None:
        """The samples ``version`` was trained on; None when its membership was never recorded."""
        with read_conn(self.path) as conn:
            if not conn.execute("SELECT 1 FROM recorded_membership WHERE model=? AND version=?",
                                (model, version)).fetchone():
                return None
            rows = conn.execute("SELECT sample_id FROM members WHERE model=? AND version=?", (model, version))
            return {row[0] for row in rows}

    def containing(self, model: str, version: int, sample_ids: Iterable[str]) -> set[str] | None:
        """The subset of ``sample_ids`` that ``version`` was trained on (None: membership unknown)."""
        wanted = sorted(set(sample_ids))
        with read_conn(self.path) as conn:
            if not conn.execute("SELECT 1 FROM recorded_membership WHERE model=? AND version=?",
                                (model, version)).fetchone():
                return None
            found: set[str] = set()
            for chunk in _chunks(wanted):
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(f"SELECT sample_id FROM members WHERE model=? AND version=? "
                                    f"AND sample_id IN ({marks})", (model, version, *chunk))
                found.update(row[0] for row in rows)
        return found

    def drop(self, conn: sqlite3.Connection, model: str, version: int) -> None:
        """Delete a purged version's membership (it can never be served again)."""
        conn.execute("DELETE FROM members WHERE model=? AND version=?", (model, version))

    def mark_forgotten(self, conn: sqlite3.Connection, model: str, sample_ids: Iterable[str],
                       request_id: str) -> None:
        """Record that ``model`` forgot ``sample_ids`` (they stop being owed, if they were)."""
        now, ids = utc_now(), sorted(set(sample_ids))
        conn.executemany("INSERT OR IGNORE INTO forgotten VALUES (?, ?, ?, ?)",
                         ((model, sid, request_id, now) for sid in ids))
        conn.executemany("DELETE FROM owed WHERE model=? AND sample_id=?", ((model, sid) for sid in ids))

    def mark_owed(self, conn: sqlite3.Connection, model: str, sample_ids: Iterable[str]) -> None:
        """A rollback served a version trained on forgotten ``sample_ids``: they are owed again."""
        now = utc_now()
        for sid in sorted(set(sample_ids)):
            row = conn.execute("SELECT request_id FROM forgotten WHERE model=? AND sample_id=?",
                               (model, sid)).fetchone()
            conn.execute("DELETE FROM forgotten WHERE model=? AND sample_id=?", (model, sid))
            conn.execute("INSERT OR REPLACE INTO owed VALUES (?, ?, ?, ?)",
                         (model, sid, row[0] if row else "", now))

    def forgotten(self, model: str) -> dict[str, str]:
        """Sample id -> the request that made ``model`` forget it."""
        with read_conn(self.path) as conn:
            return dict(conn.execute("SELECT sample_id, request_id FROM forgotten WHERE model=?", (model,)))

    def owed(self, model: str) -> dict[str, str]:
        """Sample id -> the request whose forgetting a rollback undid."""
        with read_conn(self.path) as conn:
            return dict(conn.execute("SELECT sample_id, request_id FROM owed WHERE model=?", (model,)))
