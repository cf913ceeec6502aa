"""``TrainingIndex``: read, forget and check the samples a model was trained on."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tmu_core.errors import CheckpointError, InvalidInputError, UnknownIdsError
from tmu_core.index import append as append_steps
from tmu_core.index import forget as forget_steps
from tmu_core.index.carry import Forgotten, ForgottenFilter, read_forgotten
from tmu_core.index.codec import decode_stored, pixel_hash, preprocessed
from tmu_core.index.private import KEY_NAME, narrow_modes, owner_hmac, read_key, write_key
from tmu_core.index.records import (
    SPLITS,
    AddResult,
    BuildRecord,
    ForgetResult,
    IndexInfo,
    SampleRecord,
    Tombstone,
    VerifyReport,
)
from tmu_core.index.schema import (
    BLOB_NAME,
    DB_NAME,
    FORMAT_VERSION,
    connect,
    fetch_by_ids,
    migrate,
    read_meta,
)
from tmu_core.index.sources import SourceImage, check_owners
from tmu_core.preprocess import Preprocess


if TYPE_CHECKING:
    from tmu_core.index.view import IndexView

logger = logging.getLogger(__name__)

_RECORD_COLUMNS = "sample_id, owner_id, label, split, content_hash, codec, offset, length"


class TrainingIndex:
    """A training index on disk: ``index.sqlite`` (metadata), ``blobs.bin`` (encoded images), ``id.key``.

    Open it with :meth:`open`. Forgets are written by the job worker and appends by ``tmu-admin index add``
    (appends take a lock on the blob file); any number of processes may read. The folder is 0700 and its
    files 0600.

    ``image_shape`` is the (C, H, W) every image shares, or None for an index of mixed sizes. A model reads
    the index through its version's preprocessing: ``index.view(preprocess)`` (or ``preprocess=`` on
    :meth:`load` and :meth:`iter_batches`).
    """

    def __init__(self, root: Path, conn, classes: list[str], image_shape: tuple[int, int, int] | None,
                 key: bytes) -> None:
        self.root = root
        self.classes = classes
        self.image_shape = image_shape
        self._conn = conn
        self._key = key
        self._lock = threading.RLock()
        self._blob_path = root / BLOB_NAME

    @classmethod
    def open(cls, path: Path | str) -> "TrainingIndex":
        """Open the index in folder ``path``, finishing any forget that a crash interrupted.

        Opening also narrows the folder to mode 0700 and its files to 0600, creates the owner-id key of an
        index made without one, and rewrites the plain owner ids of a format-1 index's tombstones as HMACs.

        Raises:
            CheckpointError: ``path`` holds no index (or an unreadable one), or its key file is missing
                while its tombstones need it.
        """
        root = Path(path).absolute()
        db_path, blob_path = root / DB_NAME, root / BLOB_NAME
        if not db_path.is_file() or not blob_path.is_file():
            missing = DB_NAME if not db_path.is_file() else BLOB_NAME
            raise CheckpointError(f"no training index at {root}: {missing} is missing")
        narrow_modes(root)  # before SQLite opens the file: its -wal and -shm copy the database file's mode
        try:
            conn = connect(db_path)
        except sqlite3.DatabaseError as err:
            raise CheckpointError(f"{db_path} is not a training index: {err}") from err
        try:
            classes, shape, key = _prepare(conn, root)
            redone = forget_steps.wipe_pending(conn, blob_path)
        except BaseException:
            conn.close()
            raise
        if redone:
            logger.warning("index=%s finished an interrupted forget: zeroed %d byte range(s)", root, redone)
        return cls(root, conn, classes, shape, key)

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "TrainingIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _query(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def ids(self, split: str = "train", classes: list[int] | None = None) -> list[str]:
        """Live sample ids of one split, sorted, optionally only of some classes (label indexes).

        Raises:
            InvalidInputError: unknown split or class index.
        """
        if split not in SPLITS:
            raise InvalidInputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if classes is None:
            return [r[0] for r in self._query("SELECT sample_id FROM samples WHERE split = ? ORDER BY sample_id",
                                              (split,))]
        self._check_labels(classes)
        marks = ",".join("?" * len(classes))
        sql = f"SELECT sample_id FROM samples WHERE split = ? AND label IN ({marks}) ORDER BY sample_id"
        return [r[0] for r in self._query(sql, [split, *[int(c) for c in classes]])]

    def _check_labels(self, classes: list[int]) -> None:
        wrong = [c for c in classes if isinstance(c, bool) or not isinstance(c, (int, np.integer))
                 or not 0 <= int(c) < len(self.classes)]
        if wrong:
            raise InvalidInputError(
                f"class index(es) {', '.join(map(repr, wrong))} out of range; expected 0..{len(self.classes) - 1}"
            )

    def retained_ids(self) -> list[str]:
        """Live train ids: what a model trained now would see (the same as ``ids("train")``)."""
        return self.ids("train")

    def lookup(self, ids: list[str]) -> list[SampleRecord]:
        """Records of live samples, in the order of ``ids``.

        Raises:
            UnknownIdsError: ids that are not live (never held, or forgotten), all listed.
        """
        ids = list(ids)
        with self._lock:
            rows = fetch_by_ids(self._conn, f"SELECT {_RECORD_COLUMNS} FROM samples WHERE sample_id IN ({{marks}})",
                                sorted(set(ids)))
        by_id = {r[0]: SampleRecord(*r) for r in rows}
        unknown = sorted({i for i in ids if i not in by_id})
        if unknown:
            raise UnknownIdsError(unknown)
        return [by_id[i] for i in ids]

    def ids_for_owners(self, owner_ids: list[str], split: str | None = "train") -> list[str]:
        """Live sample ids of the given data owners, sorted.

        Args:
            owner_ids: owner ids (an owner whose samples were all forgotten is known and yields nothing; it is
                recognised by the HMAC its tombstones keep).
            split: ``"train"`` (default), ``"test"``, or None for both splits (everything a forget of these
                owners must remove).

        Raises:
            InvalidInputError: unknown split.
            UnknownIdsError: owners the index never held (kind ``"owner"``).
        """
        if split is not None and split not in SPLITS:
            raise InvalidInputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)} or None")
        owners = sorted(set(owner_ids))
        by_hmac = {self.owner_hmac(o): o for o in owners}
        with self._lock:
            live = fetch_by_ids(self._conn, "SELECT sample_id, owner_id, split FROM samples "
                                "WHERE owner_id IN ({marks})", owners)
            gone = fetch_by_ids(self._conn, "SELECT owner_hmac FROM tombstones WHERE owner_hmac IN ({marks})",
                                sorted(by_hmac))
        known = {r[1] for r in live} | {by_hmac[r[0]] for r in gone}
        unknown = [o for o in owners if o not in known]
        if unknown:
            raise UnknownIdsError(unknown, kind="owner")
        return sorted(r[0] for r in live if split is None or r[2] == split)

    def owner_hmac(self, owner_id: str) -> str:
        """Hex HMAC-SHA256 of ``owner_id`` under this index's key: what a tombstone keeps of its owner."""
        return owner_hmac(self._key, owner_id)

    def labels(self, ids: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """Labels of live samples as a LongTensor (N,), in the order of ``ids``."""
        records = self.lookup(ids)
        return torch.tensor([r.label for r in records], dtype=torch.long, device=device)

    def _check_readable(self, preprocess: Preprocess | None) -> None:
        if preprocess is None and self.image_shape is None:
            raise InvalidInputError(
                f"the index at {self.root} holds images of mixed sizes; read it through a model's preprocessing "
                "(index.view(preprocess), or preprocess=...)"
            )

    def _decode(self, records: list[SampleRecord], preprocess: Preprocess | None) -> torch.Tensor:
        self._check_readable(preprocess)
        shape = self.image_shape if preprocess is None else (preprocess.channels, preprocess.size, preprocess.size)
        out = torch.empty((len(records), *shape), dtype=torch.uint8)  # (N, C, H, W)
        pixels = out.numpy()  # the same memory
        with open(self._blob_path, "rb") as blob:
            for row, record in enumerate(records):
                blob.seek(record.offset)
                data = blob.read(record.length)
                if preprocess is None:
                    pixels[row] = decode_stored(record.codec, data, self.image_shape, record.sample_id)
                else:
                    out[row] = preprocessed(record.codec, data, self.image_shape, preprocess, record.sample_id)
        return out

    def load(self, ids: list[str], device: torch.device | str = "cpu",
             preprocess: Preprocess | None = None) -> torch.Tensor:
        """Decode live samples into a uint8 tensor (N, C, H, W), in the order of ``ids``.

        For subsets that fit in memory; use :meth:`iter_batches` for the rest.

        Args:
            preprocess: a model's preprocessing, applied to each image (then H = W = its ``size``); None reads
                the stored pixels, which needs an index whose images share one shape.

        Raises:
            UnknownIdsError: ids that are not live.
            InvalidInputError: no ``preprocess`` for an index of mixed sizes.
        """
        return self._decode(self.lookup(ids), preprocess).to(device)

    def iter_batches(self, ids: list[str], batch_size: int, device: torch.device | str = "cpu",
                     preprocess: Preprocess | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images uint8 (B, C, H, W), labels long (B,))`` over ``ids`` in order, decoding batch by batch.

        Raises:
            InvalidInputError: ``batch_size`` is not a positive int, or no ``preprocess`` for a mixed index.
            UnknownIdsError: ids that are not live (checked before the first batch).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise InvalidInputError(f"batch_size must be a positive int, got {batch_size!r}")
        self._check_readable(preprocess)  # before the first batch, as the unknown ids are
        records = self.lookup(ids)
        return self._batches(records, batch_size, device, preprocess)

    def _batches(self, records: list[SampleRecord], batch_size: int, device: torch.device | str,
                 preprocess: Preprocess | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            images = self._decode(chunk, preprocess).to(device)
            labels = torch.tensor([r.label for r in chunk], dtype=torch.long, device=device)
            yield images, labels

    def add(self, classes: list[str], images: Iterable[SourceImage], sample_ids: list[str],
            owners: dict[str, str] | None = None, where: str = "new samples") -> AddResult:
        """Append newly collected samples (see :mod:`tmu_core.index.append`); the index may become mixed-size.

        Args:
            classes: the class names that ``images``' labels index (each must be a class of this index).
            images: the images to add, yielding exactly ``sample_ids``.
            sample_ids: their ids, checked against the live ones before any image is read.
            owners: sample id -> owner id; samples left out own themselves.
            where: the source's name, for messages.

        Raises:
            InvalidInputError: a class this index lacks, an id it holds, an unreadable image, a bad owner mapping.
            ConflictError: an image matches a sample forgotten while the append ran (nothing was added).
        """
        check_owners(owners, f"owner mapping of {where}", list(sample_ids))
        with self._lock:
            result = append_steps.append(self._conn, self._blob_path, self.classes, list(classes), images,
                                         list(sample_ids), owners, where)
        self.image_shape = result.image_shape
        return result

    def view(self, preprocess: Preprocess) -> "IndexView":
        """This index as a model version reads it: every image through ``preprocess``."""
        from tmu_core.index.view import IndexView

        return IndexView(self, preprocess)

    def forget(self, ids: list[str], request_id: str) -> ForgetResult:
        """Forget samples of either split for good: tombstone them and zero their bytes on disk.

        Test-split samples are forgettable too: a data owner's test images feed the unlearning itself (TMU's
        twin model is fine-tuned on half of the test split).

        Args:
            ids: train or test sample ids; ids forgotten by an earlier request are reported, not redone.
            request_id: the caller's id; the same id with the same ids again changes nothing (``repeated``).

        Raises:
            InvalidInputError: empty list, or bad ids or request id.
            UnknownIdsError: ids the index never held (listed).
            ConflictError: ``request_id`` was used before with other ids.
        """
        with self._lock:
            return forget_steps.forget_samples(self._conn, self._blob_path, list(ids), request_id, self._key)

    def tombstone(self, sample_id: str) -> Tombstone | None:
        """The tombstone of a forgotten sample, or None when it was never forgotten."""
        rows = self._query("SELECT sample_id, owner_hmac, content_hash, request_id, forgotten_at, offset, length "
                           "FROM tombstones WHERE sample_id = ?", (sample_id,))
        return Tombstone(*rows[0]) if rows else None

    def forgotten_filter(self) -> ForgottenFilter:
        """The rule any path adding images to this index applies: refuse a forgotten sample id or pixel hash."""
        with self._lock:
            return ForgottenFilter.from_db(self._conn)

    def forgotten(self) -> Forgotten:
        """The forget requests and tombstones, as a rebuild carries them into the index that replaces this one."""
        with self._lock:
            return read_forgotten(self._conn)

    def build_record(self) -> BuildRecord | None:
        """How the index was last built (images stored, forgotten images skipped, tombstones kept), or None
        for an index built before builds were recorded."""
        rows = self._query("SELECT value FROM meta WHERE key = 'build'")
        return BuildRecord(**json.loads(rows[0][0])) if rows else None

    def is_forgotten(self, sample_id: str) -> bool:
        """True when ``sample_id`` was forgotten."""
        return self.tombstone(sample_id) is not None

    def fingerprint(self, ids: list[str]) -> str:
        """sha256 hex over the sorted ids joined by newlines: the index snapshot a model was trained on."""
        return forget_steps.ids_fingerprint(list(ids))

    def info(self) -> IndexInfo:
        """Classes, shape, live counts per split and class, owners, tombstones and size on disk."""
        per_class = self._query("SELECT split, label, COUNT(*) FROM samples GROUP BY split, label")
        class_counts = {s: {name: 0 for name in self.classes} for s in SPLITS}
        for split, label, count in per_class:
            class_counts[split][self.classes[label]] = count
        owners = self._query("SELECT COUNT(DISTINCT owner_id) FROM samples")[0][0]
        tombstones = self._query("SELECT COUNT(*) FROM tombstones")[0][0]
        size = sum(p.stat().st_size for p in self.root.iterdir() if p.is_file())
        return IndexInfo(
            path=self.root, classes=list(self.classes), image_shape=self.image_shape,
            counts={s: sum(class_counts[s].values()) for s in SPLITS}, class_counts=class_counts,
            owners=owners, tombstones=tombstones, size_bytes=size,
        )

    def verify(self) -> VerifyReport:
        """Check that every live sample decodes to its hash and every tombstone's bytes are all zeros."""
        records = [SampleRecord(*r) for r in self._query(f"SELECT {_RECORD_COLUMNS} FROM samples ORDER BY offset")]
        stones = self._query("SELECT sample_id, offset, length FROM tombstones ORDER BY offset")
        fd = os.open(self._blob_path, os.O_RDONLY)
        try:
            bad = [r.sample_id for r in records if not self._sample_ok(fd, r)]
            # A range past the end of the file reads short; what it does read must still be zeros.
            unwiped = [sid for sid, offset, length in stones if any(os.pread(fd, length, offset))]
        finally:
            os.close(fd)
        report = VerifyReport(checked=len(records) + len(stones), bad=sorted(bad), unwiped=sorted(unwiped),
                              ok=not bad and not unwiped)
        logger.info("index=%s verify checked=%d bad=%d unwiped=%d", self.root, report.checked, len(bad), len(unwiped))
        return report

    def _sample_ok(self, fd: int, record: SampleRecord) -> bool:
        data = os.pread(fd, record.length, record.offset)
        if len(data) != record.length:
            return False
        try:
            pixels = decode_stored(record.codec, data, self.image_shape, record.sample_id)
        except InvalidInputError:
            return False
        return pixel_hash(pixels) == record.content_hash


def _prepare(conn: sqlite3.Connection, root: Path) -> tuple[list[str], tuple[int, int, int] | None, bytes]:
    """Read the metadata, load (or make) the key and migrate a format-1 index; returns classes, shape, key."""
    classes, shape, version = read_meta(conn, root)
    key = _load_key(conn, root, version)
    if version < FORMAT_VERSION:
        migrated = migrate(conn, key)
        logger.info("index=%s migrated from format %d to %d: %d tombstone owner id(s) replaced by HMACs", root,
                    version, FORMAT_VERSION, migrated)
    return classes, shape, key


def _load_key(conn: sqlite3.Connection, root: Path, version: int) -> bytes:
    key = read_key(root)
    if key is not None:
        return key
    if version >= 2 and conn.execute("SELECT COUNT(*) FROM tombstones").fetchone()[0]:
        raise CheckpointError(
            f"{root / KEY_NAME} is missing, but the index's tombstones hold owner HMACs made with that key; "
            f"restore the key file from a backup of {root}"
        )
    try:
        return write_key(root)
    except FileExistsError:  # another process opening the same index made it first
        return read_key(root)
