"""Frozen result types of the training index."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "test")


@dataclass(frozen=True)
class SampleRecord:
    """One live sample of the index.

    Attributes:
        sample_id: stable id, ``"<split>/<class>/<file stem>"`` or ``"digits/<split>/<n>"``.
        owner_id: the data owner (the sample id itself when no owner mapping was given).
        label: index into the index's class names.
        split: ``"train"`` or ``"test"``.
        content_hash: sha256 hex of the decoded uint8 (C, H, W) pixel bytes.
        codec: how the bytes are stored: ``"jpeg"``, ``"png"`` (other formats arrive as PNG) or ``"raw"``.
        offset: where the encoded bytes start in ``blobs.bin``.
        length: how many bytes they take.
    """

    sample_id: str
    owner_id: str
    label: int
    split: str
    content_hash: str
    codec: str
    offset: int
    length: int


@dataclass(frozen=True)
class Tombstone:
    """What is left of a forgotten sample: its id, a keyed hash of its owner and its pixel hash, never its pixels.

    Attributes:
        sample_id: the forgotten sample's id (kept to recognise repeated requests and refuse re-ingest).
        owner_hmac: hex HMAC-SHA256 of the owner id under the index key (the owner id itself is not kept);
            compare with :meth:`TrainingIndex.owner_hmac`.
        content_hash: sha256 hex of the decoded pixels, so a rebuild refuses the same image under another id.
        request_id: the forget request that removed it.
        forgotten_at: UTC time of the forget, ISO 8601.
        offset: start of the zeroed byte range in ``blobs.bin``.
        length: its length; 0 (with offset 0) once a rebuild carried the tombstone into a blob file that
            never held the bytes.
    """

    sample_id: str
    owner_hmac: str
    content_hash: str
    request_id: str
    forgotten_at: str
    offset: int
    length: int


@dataclass(frozen=True)
class BuildRecord:
    """How the index was last built, from :meth:`TrainingIndex.build_record`.

    Attributes:
        stored: images written to the blob file.
        skipped_forgotten: source images refused because their sample id or pixel hash was forgotten.
        tombstones_kept: tombstones carried over from the index the build replaced.
    """

    stored: int
    skipped_forgotten: int
    tombstones_kept: int


@dataclass(frozen=True)
class ForgetResult:
    """Outcome of :meth:`TrainingIndex.forget`.

    Attributes:
        request_id: the caller's request id.
        forgotten: ids whose bytes this request wiped, sorted.
        already_forgotten: ids an earlier request had already wiped, sorted.
        repeated: True when this request id had already been carried out with the same ids (nothing changed).
    """

    request_id: str
    forgotten: list[str]
    already_forgotten: list[str]
    repeated: bool


@dataclass(frozen=True)
class AddResult:
    """Outcome of :meth:`TrainingIndex.add`.

    Attributes:
        stored: images appended.
        skipped_forgotten: images not stored because their sample id or pixel hash was forgotten.
        sample_ids: the ids appended, sorted.
        image_shape: the index's one shape after the append, or None when its images now differ.
    """

    stored: int
    skipped_forgotten: int
    sample_ids: list[str]
    image_shape: tuple[int, int, int] | None


@dataclass(frozen=True)
class IndexInfo:
    """Summary of an index: what it holds and how big it is on disk.

    Attributes:
        path: the index folder.
        classes: class names; labels index this list.
        image_shape: (C, H, W) shared by every image, or None when sizes or channels differ.
        counts: live samples per split, ``{"train": n, "test": n}``.
        class_counts: live samples per split and class name, ``{"train": {"cat": n, ...}, "test": {...}}``.
        owners: distinct owners of live samples.
        tombstones: forgotten samples.
        size_bytes: bytes of every file in the index folder (database, WAL, blobs).
    """

    path: Path
    classes: list[str]
    image_shape: tuple[int, int, int] | None
    counts: dict[str, int]
    class_counts: dict[str, dict[str, int]]
    owners: int
    tombstones: int
    size_bytes: int


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of :meth:`TrainingIndex.verify`.

    Attributes:
        checked: live samples decoded and hashed plus tombstones checked.
        bad: live sample ids whose bytes do not decode or do not match their hash, sorted.
        unwiped: forgotten sample ids whose byte range is not all zeros, sorted.
        ok: True when nothing is bad or unwiped.
    """

    checked: int
    bad: list[str] = field(default_factory=list)
    unwiped: list[str] = field(default_factory=list)
    ok: bool = True
