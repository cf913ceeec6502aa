"""What outlives a rebuild: the tombstones, the forget requests and the key, and the rule that refuses
to store a forgotten image again.

A rebuild (``overwrite``) reads these from the index it replaces, skips every source image whose sample id
or pixel hash a tombstone holds, and writes the same tombstones and requests into the new index. The new
blob file never held the forgotten bytes, so a carried tombstone names no byte range (offset 0, length 0).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

_TOMBSTONE_COLUMNS = "sample_id, owner_hmac, content_hash, request_id, forgotten_at"
_REQUEST_COLUMNS = "request_id, ids_hash, forgotten, already_forgotten, created_at"


@dataclass(frozen=True)
class ForgottenFilter:
    """The sample ids and pixel hashes of forgotten samples; an image matching either must not be stored.

    Any path that adds images to an index calls :meth:`refuses` for each image before writing its bytes.
    """

    sample_ids: frozenset[str] = field(default_factory=frozenset)
    content_hashes: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_db(cls, conn: sqlite3.Connection) -> "ForgottenFilter":
        """Read the filter from the tombstones of an open index database."""
        rows = conn.execute("SELECT sample_id, content_hash FROM tombstones").fetchall()
        return cls(frozenset(r[0] for r in rows), frozenset(r[1] for r in rows))

    def refuses(self, sample_id: str, content_hash: str | None = None) -> bool:
        """True when ``sample_id`` was forgotten, or ``content_hash`` (sha256 hex of the pixels) is a forgotten one.

        Args:
            sample_id: the id the image would get.
            content_hash: its pixel hash (:func:`tmu_core.index.codec.pixel_hash`); None checks the id only,
                which lets a caller skip decoding an image whose id is already refused.
        """
        return sample_id in self.sample_ids or (content_hash is not None and content_hash in self.content_hashes)


@dataclass(frozen=True)
class Forgotten:
    """The rows a rebuild carries into the new index.

    Attributes:
        requests: rows of the ``requests`` table (every forget request carried out).
        tombstones: rows of the ``tombstones`` table without their byte range.
    """

    requests: tuple[tuple, ...] = ()
    tombstones: tuple[tuple, ...] = ()

    @property
    def sample_ids(self) -> frozenset[str]:
        """Ids of the forgotten samples."""
        return frozenset(r[0] for r in self.tombstones)

    def filter(self) -> ForgottenFilter:
        """The filter that refuses these samples' ids and pixel hashes."""
        return ForgottenFilter(self.sample_ids, frozenset(r[2] for r in self.tombstones))


def read_forgotten(conn: sqlite3.Connection) -> Forgotten:
    """Read the requests and tombstones of an open index database (a format-2 one)."""
    requests = conn.execute(f"SELECT {_REQUEST_COLUMNS} FROM requests ORDER BY request_id").fetchall()
    stones = conn.execute(f"SELECT {_TOMBSTONE_COLUMNS} FROM tombstones ORDER BY sample_id").fetchall()
    return Forgotten(tuple(requests), tuple(stones))


def write_forgotten(conn: sqlite3.Connection, forgotten: Forgotten) -> None:
    """Insert carried requests and tombstones (with no byte range) inside the caller's transaction."""
    conn.executemany(f"INSERT INTO requests ({_REQUEST_COLUMNS}) VALUES (?, ?, ?, ?, ?)", forgotten.requests)
    conn.executemany(f"INSERT INTO tombstones ({_TOMBSTONE_COLUMNS}, offset, length) VALUES (?, ?, ?, ?, ?, 0, 0)",
                     forgotten.tombstones)
