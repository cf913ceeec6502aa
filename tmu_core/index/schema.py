"""SQLite layout of the training index and the way connections are opened."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from tmu_core.errors import CheckpointError
from tmu_core.index.private import owner_hmac

DB_NAME = "index.sqlite"
BLOB_NAME = "blobs.bin"
# Format 2: tombstones keep an HMAC of the owner id (``owner_hmac``); format 1 kept the owner id itself.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

SCHEMA = """
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE samples (
    sample_id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL,
    label INTEGER NOT NULL CHECK (label >= 0),
    split TEXT NOT NULL CHECK (split IN ('train', 'test')),
    content_hash TEXT NOT NULL,
    codec TEXT NOT NULL CHECK (codec IN ('jpeg', 'png', 'raw')),
    offset INTEGER NOT NULL CHECK (offset >= 0),
    length INTEGER NOT NULL CHECK (length > 0)
);
CREATE INDEX samples_owner ON samples (owner_id);
CREATE INDEX samples_split_label ON samples (split, label);
CREATE TABLE requests (
    request_id TEXT PRIMARY KEY,
    ids_hash TEXT NOT NULL,
    forgotten TEXT NOT NULL,
    already_forgotten TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE tombstones (
    sample_id TEXT PRIMARY KEY,
    owner_hmac TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    request_id TEXT NOT NULL REFERENCES requests (request_id),
    forgotten_at TEXT NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL
);
CREATE INDEX tombstones_owner ON tombstones (owner_hmac);
CREATE TABLE pending_wipe (
    sample_id TEXT PRIMARY KEY REFERENCES tombstones (sample_id),
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL
);
"""


def connect(db_path: Path) -> sqlite3.Connection:
    """Open the index database in autocommit mode (transactions are explicit), WAL, foreign keys on.

    ``secure_delete`` zeroes the pages of deleted rows, so a forgotten sample's row leaves no trace
    in the database file beyond its tombstone.
    """
    conn = sqlite3.connect(str(db_path), isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA secure_delete = ON")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


def create_schema(conn: sqlite3.Connection, classes: list[str], image_shape: tuple[int, int, int]) -> None:
    """Create the tables of a new index and record its classes and image shape."""
    conn.executescript(SCHEMA)
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [
            ("format_version", str(FORMAT_VERSION)),
            ("classes", json.dumps(classes)),
            ("image_shape", json.dumps(list(image_shape))),
        ],
    )


def read_meta(conn: sqlite3.Connection, root: Path) -> tuple[list[str], tuple[int, int, int], int]:
    """Read the class names, image shape and format version, checking that the file is an index this code reads.

    Raises:
        CheckpointError: the database has no index metadata or a format version this code does not read.
    """
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as err:
        raise CheckpointError(f"{root / DB_NAME} is not a training index: {err}") from err
    missing = sorted({"format_version", "classes", "image_shape"} - set(meta))
    if missing:
        raise CheckpointError(f"{root / DB_NAME} is not a training index: meta lacks {', '.join(missing)}")
    if meta["format_version"] not in {str(v) for v in READABLE_VERSIONS}:
        raise CheckpointError(
            f"{root / DB_NAME} has index format {meta['format_version']}; this version reads formats "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    shape = json.loads(meta["image_shape"])
    classes = list(json.loads(meta["classes"]))
    return classes, (int(shape[0]), int(shape[1]), int(shape[2])), int(meta["format_version"])


def migrate_owner_ids(conn: sqlite3.Connection, key: bytes) -> int:
    """Turn a format-1 index into format 2: replace each tombstone's owner id by its HMAC, in one transaction.

    ``secure_delete`` zeroes the replaced cells, and the checkpoint empties the WAL, so the plain owner ids
    leave no copy in the database files.

    Returns:
        How many tombstones were rewritten.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()[0]
        if version == str(FORMAT_VERSION):  # another process migrated it first
            conn.execute("COMMIT")
            return 0
        rows = conn.execute("SELECT sample_id, owner_id FROM tombstones").fetchall()
        conn.execute("ALTER TABLE tombstones RENAME COLUMN owner_id TO owner_hmac")
        conn.executemany("UPDATE tombstones SET owner_hmac = ? WHERE sample_id = ?",
                         [(owner_hmac(key, owner), sample_id) for sample_id, owner in rows])
        conn.execute("UPDATE meta SET value = ? WHERE key = 'format_version'", (str(FORMAT_VERSION),))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return len(rows)


_CHUNK = 900  # stays below SQLite's limit on bound parameters in one statement


def fetch_by_ids(conn: sqlite3.Connection, query: str, ids: list[str]) -> list[tuple]:
    """Run ``query`` (with a ``{marks}`` placeholder inside ``IN (...)``) over ``ids`` in chunks."""
    rows: list[tuple] = []
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start:start + _CHUNK]
        marks = ",".join("?" * len(chunk))
        rows.extend(conn.execute(query.format(marks=marks), chunk).fetchall())
    return rows
