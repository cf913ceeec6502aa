"""Build a new index in a temporary folder beside its destination and move it into place when complete.

Rebuilding over an existing index keeps its tombstones, forget requests and key, and never stores an image
whose sample id or pixel hash was forgotten (see :mod:`tmu_core.index.carry`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

from tmu_core.errors import CheckpointError, ConflictError, InvalidInputError
from tmu_core.index.carry import Forgotten, write_forgotten
from tmu_core.index.codec import encode_for_index, pixel_hash
from tmu_core.index.private import (
    create_private_file,
    make_private_dir,
    open_private_for_writing,
    read_key,
    write_key,
)
from tmu_core.index.records import SPLITS, BuildRecord
from tmu_core.index.schema import BLOB_NAME, DB_NAME, connect, create_schema
from tmu_core.index.sources import SourceImage, check_owners

logger = logging.getLogger(__name__)


class IndexWriter:
    """Append images to a new index; nothing appears at ``dest`` until :meth:`finish` succeeds.

    Use it as a context manager: leaving the block without ``finish`` (or with an error) removes the
    temporary folder. With ``overwrite`` over an existing index, its tombstones, requests and key are kept
    and images it forgot are skipped (counted in :attr:`skipped`).
    """

    def __init__(self, dest: Path | str, classes: list[str], overwrite: bool = False) -> None:
        self.dest = Path(dest).absolute()
        if self.dest.exists() and not overwrite:
            raise ConflictError(f"destination {self.dest} already exists; pass overwrite to replace it")
        if not classes or len(set(classes)) != len(classes):
            raise InvalidInputError(f"classes must be a non-empty list of distinct names, got {classes}")
        self.classes = list(classes)
        self._key, self._forgotten = _read_existing(self.dest)
        self._refused = self._forgotten.filter()
        self.skipped = 0
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.dest.parent / f".{self.dest.name}.partial-{uuid.uuid4().hex[:8]}"
        make_private_dir(self._tmp)
        self._blob = open_private_for_writing(self._tmp / BLOB_NAME)
        self._offset = 0
        self._rows: list[tuple] = []
        self._names: dict[str, str] = {}
        self.shapes: set[tuple[int, int, int]] = set()

    def __enter__(self) -> "IndexWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self._discard()

    def _discard(self) -> None:
        if not self._blob.closed:
            self._blob.close()
        if self._tmp.exists():
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _check_item(self, item: SourceImage) -> None:
        if item.split not in SPLITS:
            raise InvalidInputError(f"{item.name}: split {item.split!r} is not one of {', '.join(SPLITS)}")
        if isinstance(item.label, bool) or not isinstance(item.label, int) or not 0 <= item.label < len(self.classes):
            raise InvalidInputError(
                f"{item.name}: label {item.label!r} is outside the classes 0..{len(self.classes) - 1}"
            )
        if item.sample_id in self._names:
            raise InvalidInputError(
                f"{item.name}: sample id {item.sample_id!r} is already taken by {self._names[item.sample_id]}"
            )

    def add(self, item: SourceImage) -> bool:
        """Check, hash and append one image, unless its sample id or pixel hash was forgotten.

        Returns:
            True when the image was stored, False when it was skipped as forgotten.

        Images may differ in size and channels (the index then records no one shape).

        Raises:
            InvalidInputError: unreadable image or a format not accepted, bad label or split, or a sample id
                already added.
        """
        self._check_item(item)
        self._names[item.sample_id] = item.name
        if self._refused.refuses(item.sample_id):  # refused by id: not even decoded
            return self._skip(item)
        if item.pixels is not None:
            codec, data, pixels = "raw", item.data, item.pixels
        else:
            codec, data, pixels = encode_for_index(item.data, item.name)
        digest = pixel_hash(pixels)
        if self._refused.refuses(item.sample_id, digest):
            return self._skip(item)
        self.shapes.add(tuple(int(d) for d in pixels.shape))  # type: ignore[arg-type]
        self._blob.write(data)
        self._rows.append((item.sample_id, item.label, item.split, digest, codec, self._offset, len(data)))
        self._offset += len(data)
        return True

    @property
    def shape(self) -> tuple[int, int, int] | None:
        """The one (C, H, W) every stored image has, or None when they differ (or none was stored)."""
        return next(iter(self.shapes)) if len(self.shapes) == 1 else None

    def _skip(self, item: SourceImage) -> bool:
        self.skipped += 1
        logger.debug("index=%s skipped forgotten image %s", self.dest, item.sample_id)
        return False

    def _owner_rows(self, owners: dict[str, str] | None) -> list[tuple]:
        owners = owners or {}
        check_owners(owners, "owner mapping", list(self._names))  # skipped images may be named too
        return [(sid, owners.get(sid, sid), label, split, digest, codec, offset, length)
                for sid, label, split, digest, codec, offset, length in self._rows]

    def finish(self, owners: dict[str, str] | None = None) -> Path:
        """Write the metadata and move the complete index to ``dest``.

        Args:
            owners: sample id -> owner id; samples left out own themselves.

        Raises:
            InvalidInputError: no image was stored, or ``owners`` names samples that were not added.
            ConflictError: the index being replaced forgot samples while this build ran.
        """
        if not self._rows:
            skipped = f" ({self.skipped} forgotten image(s) skipped)" if self.skipped else ""
            raise InvalidInputError(f"no images to index for {self.dest}{skipped}")
        rows = self._owner_rows(owners)
        self._blob.flush()
        os.fsync(self._blob.fileno())
        self._blob.close()
        forgotten = self._recheck_forgotten()
        record = BuildRecord(stored=len(rows), skipped_forgotten=self.skipped,
                             tombstones_kept=len(forgotten.tombstones))
        self._write_db(rows, forgotten, record)
        write_key(self._tmp, self._key)
        self._move_into_place()
        logger.info("index=%s written: %d images, shape=%s, skipped %d forgotten, kept %d tombstones", self.dest,
                    len(rows), self.shape or "mixed", self.skipped, record.tombstones_kept)
        return self.dest

    def _recheck_forgotten(self) -> Forgotten:
        # A forget committed to the old index during the build could name an image already written here.
        _, now = _read_existing(self.dest)
        if now.sample_ids != self._forgotten.sample_ids:
            raise ConflictError(
                f"the index at {self.dest} forgot samples while it was being rebuilt; build it again"
            )
        return now

    def _write_db(self, rows: list[tuple], forgotten: Forgotten, record: BuildRecord) -> None:
        db_path = self._tmp / DB_NAME
        create_private_file(db_path)  # SQLite gives its -wal and -shm files the mode of the database file
        conn = connect(db_path)
        try:
            create_schema(conn, self.classes, self.shape)  # executescript: runs outside the transaction below
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO samples (sample_id, owner_id, label, split, content_hash, codec, offset, "
                             "length) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            write_forgotten(conn, forgotten)
            conn.execute("INSERT INTO meta (key, value) VALUES ('build', ?)", (json.dumps(asdict(record)),))
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _move_into_place(self) -> None:
        old = None
        if self.dest.exists():
            old = self.dest.parent / f".{self.dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.dest, old)
        os.replace(self._tmp, self.dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _read_existing(dest: Path) -> tuple[bytes | None, Forgotten]:
    """The key and the forgotten rows of the index at ``dest`` (None and nothing when there is none).

    Raises:
        CheckpointError: ``dest`` holds an index that cannot be read, so its tombstones cannot be kept.
    """
    if not (dest / DB_NAME).is_file():
        return (read_key(dest) if dest.is_dir() else None), Forgotten()
    from tmu_core.index.store import TrainingIndex  # store does not import the writer; no cycle at run time

    try:
        # Opening finishes an interrupted forget, migrates an old format and makes a missing key.
        with TrainingIndex.open(dest) as old:
            forgotten = old.forgotten()
    except CheckpointError as err:
        raise CheckpointError(
            f"cannot replace the index at {dest}: its tombstones must be kept and cannot be read ({err}); "
            "repair it, or move the folder away to build a new index without them"
        ) from err
    return read_key(dest), forgotten
