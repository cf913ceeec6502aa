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
# Format 3: images may differ in size and channels; ``image_shape`` is then null (a "mixed" index).
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)

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


def create_schema(conn: sqlite3.Connection, classes: list[str], image_shape: tuple[int, int, int] | None) -> None:
    """Create the tables of a new index and record its classes and image shape (None: mixed sizes)."""
    conn.executescript(SCHEMA)
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [
            ("format_version", str(FORMAT_VERSION)),
            ("classes", json.dumps(classes)),
            ("image_shape", json.dumps(list(image_shape) if image_shape is not None else None)),
        ],
    )


def read_meta(conn: sqlite3.Connection, root: Path) -> tuple[list[str], tuple[int, int, int] | None, int]:
    """Read the class names, image shape (None: mixed sizes) and format version, checking that the file is an
    index this code reads.

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
    classes = list(json.loads(meta["classes"]))
    return classes, parse_shape(meta["image_shape"]), int(meta["format_version"])


def parse_shape(text: str) -> tuple[int, int, int] | None:
    """The ``image_shape`` meta value: ``[C, H, W]`` or null."""
    shape = json.loads(text)
    return None if shape is None else (int(shape[0]), int(shape[1]), int(shape[2]))


def migrate(conn: sqlite3.Connection, key: bytes) -> int:
    """Bring an older index to the current format, in one transaction.

    Format 1 -> 2 replaces each tombstone's owner id by its HMAC (``secure_delete`` zeroes the replaced cells,
    and the checkpoint empties the WAL, so the plain owner ids leave no copy in the database files).
    Format 2 -> 3 changes no data: a format-3 index may also hold images of mixed sizes.

    Returns:
        How many tombstones were rewritten.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = int(conn.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()[0])
        rows: list[tuple] = []
        if version == 1:
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
