"""Append newly collected samples to an existing index (``tmu-admin index add``).

Steps of :func:`append`, under an exclusive lock on ``blobs.bin`` (one append at a time; forgets and reads go on):

1. check the new ids (none live already), their classes and owners, before any image is read;
2. cut ``blobs.bin`` back to the end of the last range a row or tombstone names (bytes an interrupted append
   left behind, never indexed), then write the new images' bytes after it and fsync;
3. one transaction inserts the sample rows and updates the index's image shape (null once sizes differ).

A failure before the commit cuts the file back again, so the index is as it was. Images whose sample id or
pixel hash the index forgot are skipped, as a rebuild skips them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tmu_core.errors import ConflictError, InvalidInputError
from tmu_core.index.carry import ForgottenFilter
from tmu_core.index.codec import encode_for_index, pixel_hash
from tmu_core.index.records import SPLITS, AddResult
from tmu_core.index.schema import fetch_by_ids, parse_shape
from tmu_core.index.sources import SourceImage

logger = logging.getLogger(__name__)


@contextmanager
def _exclusive(blob_path: Path) -> Iterator[int]:
    fd = os.open(blob_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _labels(index_classes: list[str], source_classes: list[str], where: str) -> dict[int, int]:
    unknown = [name for name in source_classes if name not in index_classes]
    if unknown:
        raise InvalidInputError(f"{where}: class(es) {', '.join(unknown)} are not classes of the index; "
                                f"the index has {', '.join(index_classes)}")
    return {label: index_classes.index(name) for label, name in enumerate(source_classes)}


def check_new_ids(conn: sqlite3.Connection, ids: list[str], where: str) -> None:
    """Refuse ids the index already holds (live), listing them.

    Raises:
        InvalidInputError: some ids are live already.
    """
    taken = sorted(r[0] for r in fetch_by_ids(conn, "SELECT sample_id FROM samples WHERE sample_id IN ({marks})",
                                              sorted(set(ids))))
    if taken:
        shown = ", ".join(taken[:20]) + (f" and {len(taken) - 20} more" if len(taken) > 20 else "")
        raise InvalidInputError(f"{where}: {len(taken)} sample id(s) are already in the index: {shown}; "
                                "new samples need new file names (sample ids are <split>/<class>/<file stem>)")


def _end_of_data(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT MAX(e) FROM (SELECT MAX(offset + length) AS e FROM samples "
                            "UNION ALL SELECT MAX(offset + length) FROM tombstones)").fetchone()[0] or 0)


def append(conn: sqlite3.Connection, blob_path: Path, index_classes: list[str], source_classes: list[str],
           images: Iterable[SourceImage], sample_ids: list[str], owners: dict[str, str] | None,
           where: str) -> AddResult:
    """Append ``images`` (labels index ``source_classes``) to the index whose connection is ``conn``.

    Args:
        sample_ids: the ids ``images`` will yield, checked before any image is read.
        owners: sample id -> owner id; samples left out own themselves.
        where: the source's name, for messages.

    Raises:
        InvalidInputError: a class the index lacks, an id it holds already, an unreadable image, a bad split.
        ConflictError: an image matches a sample forgotten while the append ran (nothing was added).
    """
    labels = _labels(index_classes, source_classes, where)
    check_new_ids(conn, sample_ids, where)
    owners = owners or {}
    refused = ForgottenFilter.from_db(conn)
    with _exclusive(blob_path) as fd:
        end = _end_of_data(conn)
        if os.fstat(fd).st_size != end:
            logger.warning("index blob %s: cutting %d byte(s) an interrupted append left", blob_path,
                           os.fstat(fd).st_size - end)
            os.ftruncate(fd, end)
        try:
            rows, shapes, skipped = _write_images(fd, end, images, labels, refused)
            os.fsync(fd)
            shape = _commit(conn, rows, shapes, owners)
        except BaseException:
            os.ftruncate(fd, end)
            os.fsync(fd)
            raise
    logger.info("index blob %s: appended %d image(s) from %s, skipped %d forgotten", blob_path, len(rows), where,
                skipped)
    return AddResult(stored=len(rows), skipped_forgotten=skipped, sample_ids=sorted(r[0] for r in rows),
                     image_shape=shape)


def _write_images(fd: int, offset: int, images: Iterable[SourceImage], labels: dict[int, int],
                  refused: ForgottenFilter) -> tuple[list[tuple], set[tuple[int, ...]], int]:
    rows: list[tuple] = []
    shapes: set[tuple[int, ...]] = set()
    skipped = 0
    for item in images:
        if item.split not in SPLITS:
            raise InvalidInputError(f"{item.name}: split {item.split!r} is not one of {', '.join(SPLITS)}")
        if refused.refuses(item.sample_id):
            skipped += 1
            continue
        codec, data, pixels = encode_for_index(item.data, item.name)
        digest = pixel_hash(pixels)
        if refused.refuses(item.sample_id, digest):
            skipped += 1
            continue
        os.pwrite(fd, data, offset)
        rows.append((item.sample_id, labels[item.label], item.split, digest, codec, offset, len(data)))
        shapes.add(tuple(int(d) for d in pixels.shape))
        offset += len(data)
    return rows, shapes, skipped


def _commit(conn: sqlite3.Connection, rows: list[tuple], shapes: set[tuple[int, ...]],
            owners: dict[str, str]) -> tuple[int, int, int] | None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        check_new_ids(conn, [r[0] for r in rows], "the images to add")  # unchanged under the blob lock
        refused = ForgottenFilter.from_db(conn)  # a forget may have committed while the bytes were written
        late = sorted(r[0] for r in rows if refused.refuses(r[0], r[3]))
        if late:
            raise ConflictError(f"{len(late)} image(s) to add match samples forgotten while they were written "
                                f"({', '.join(late[:10])}); nothing was added; run the add again")
        conn.executemany("INSERT INTO samples (sample_id, owner_id, label, split, content_hash, codec, offset, "
                         "length) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         [(sid, owners.get(sid, sid), *rest) for sid, *rest in rows])
        shape = parse_shape(conn.execute("SELECT value FROM meta WHERE key = 'image_shape'").fetchone()[0])
        if shapes and (shape is None or shapes != {shape}):
            shape = None
            conn.execute("UPDATE meta SET value = 'null' WHERE key = 'image_shape'")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return shape
