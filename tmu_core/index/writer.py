"""Build a new index in a temporary folder beside its destination and move it into place when complete."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

from tmu_core.errors import ConflictError, InvalidInputError
from tmu_core.index.codec import decode_encoded, pixel_hash
from tmu_core.index.records import SPLITS
from tmu_core.index.schema import BLOB_NAME, DB_NAME, connect, create_schema
from tmu_core.index.sources import SourceImage, check_owners

logger = logging.getLogger(__name__)


class IndexWriter:
    """Append images to a new index; nothing appears at ``dest`` until :meth:`finish` succeeds.

    Use it as a context manager: leaving the block without ``finish`` (or with an error) removes the
    temporary folder.
    """

    def __init__(self, dest: Path | str, classes: list[str], overwrite: bool = False) -> None:
        self.dest = Path(dest).absolute()
        if self.dest.exists() and not overwrite:
            raise ConflictError(f"destination {self.dest} already exists; pass overwrite to replace it")
        if not classes or len(set(classes)) != len(classes):
            raise InvalidInputError(f"classes must be a non-empty list of distinct names, got {classes}")
        self.classes = list(classes)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.dest.parent / f".{self.dest.name}.partial-{uuid.uuid4().hex[:8]}"
        self._tmp.mkdir()
        self._blob = open(self._tmp / BLOB_NAME, "wb")
        self._offset = 0
        self._rows: list[tuple] = []
        self._names: dict[str, str] = {}
        self.shape: tuple[int, int, int] | None = None
        self._shape_from = ""

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

    def add(self, item: SourceImage) -> None:
        """Check, hash and append one image.

        Raises:
            InvalidInputError: unreadable image, another shape than the first image, bad label or split,
                or a sample id already added.
        """
        self._check_item(item)
        if item.pixels is not None:
            codec, pixels = "raw", item.pixels
        else:
            codec, pixels = decode_encoded(item.data, item.name)
        shape = tuple(int(d) for d in pixels.shape)
        if self.shape is None:
            self.shape, self._shape_from = shape, item.name  # type: ignore[assignment]
        elif shape != self.shape:
            raise InvalidInputError(
                f"{item.name}: image shape (C, H, W) {shape} differs from the index's {self.shape} "
                f"(set by {self._shape_from}); all images of an index must share one shape and channel count"
            )
        self._blob.write(item.data)
        self._rows.append((item.sample_id, item.label, item.split, pixel_hash(pixels), codec, self._offset,
                           len(item.data)))
        self._offset += len(item.data)
        self._names[item.sample_id] = item.name

    def _owner_rows(self, owners: dict[str, str] | None) -> list[tuple]:
        owners = owners or {}
        check_owners(owners, "owner mapping", list(self._names))
        return [(sid, owners.get(sid, sid), label, split, digest, codec, offset, length)
                for sid, label, split, digest, codec, offset, length in self._rows]

    def finish(self, owners: dict[str, str] | None = None) -> Path:
        """Write the metadata and move the complete index to ``dest``.

        Args:
            owners: sample id -> owner id; samples left out own themselves.

        Raises:
            InvalidInputError: no image was added, or ``owners`` names samples that were not added.
        """
        if self.shape is None:
            raise InvalidInputError(f"no images to index for {self.dest}")
        rows = self._owner_rows(owners)
        self._blob.flush()
        os.fsync(self._blob.fileno())
        self._blob.close()
        conn = connect(self._tmp / DB_NAME)
        try:
            create_schema(conn, self.classes, self.shape)  # executescript: runs outside the transaction below
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO samples (sample_id, owner_id, label, split, content_hash, codec, offset, "
                             "length) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            conn.execute("COMMIT")
        finally:
            conn.close()
        self._move_into_place()
        logger.info("index=%s written: %d images, shape=%s", self.dest, len(rows), self.shape)
        return self.dest

    def _move_into_place(self) -> None:
        old = None
        if self.dest.exists():
            old = self.dest.parent / f".{self.dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.dest, old)
        os.replace(self._tmp, self.dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
