"""Build a training index from an ImageFolder tree, a zip of one, or scikit-learn's bundled digits."""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from tmu_core.errors import InvalidInputError
from tmu_core.index.sources import (
    FolderPlan,
    SourceImage,
    check_owners,
    digits_images,
    folder_paths,
    iter_plan,
    load_owners,
    plan_folder,
    zip_paths,
)
from tmu_core.index.records import AddResult
from tmu_core.index.store import TrainingIndex
from tmu_core.index.writer import IndexWriter

logger = logging.getLogger(__name__)

Owners = Path | str | Mapping[str, str] | None


def _write(dest: Path | str, classes: list[str], sample_ids: list[str], images: Iterable[SourceImage],
           owners: Owners, overwrite: bool) -> TrainingIndex:
    # The owner mapping is checked before any image is read, so a bad file fails fast.
    mapping, where = load_owners(owners)
    check_owners(mapping, where, sample_ids)
    logger.info("ingest dest=%s images=%d classes=%d", dest, len(sample_ids), len(classes))
    with IndexWriter(dest, classes, overwrite=overwrite) as writer:
        for item in images:
            writer.add(item)
        path = writer.finish(mapping)
    return TrainingIndex.open(path)


def _plan_ids(plan: FolderPlan) -> list[str]:
    return [sample_id for _, _, sample_id, _ in plan.entries]


def ingest_image_folder(root: Path | str, dest: Path | str, owners: Owners = None,
                        train_per_class: int | None = None, test_per_class: int | None = None,
                        overwrite: bool = False) -> TrainingIndex:
    """Index an ImageFolder tree ``root/train/<class>/*`` and ``root/test/<class>/*``.

    Images may be JPEG, PNG, WebP, BMP, GIF or TIFF, of any size and mode (see :mod:`tmu_core.index.codec`).

    Sample ids are ``"<split>/<class>/<file stem>"``; classes are the sorted folder names of ``train/``.

    Args:
        root: the folder holding ``train/`` and ``test/``.
        dest: the index folder to create.
        owners: CSV (``sample_id,owner_id`` header) or JSON file, or a mapping; other samples own themselves.
        train_per_class: keep only the first N files (sorted by name) of each train class.
        test_per_class: the same for the test split.
        overwrite: replace an existing index at ``dest``, keeping its tombstones, requests and key; source
            images whose sample id or pixel hash it forgot are skipped (see :meth:`TrainingIndex.build_record`).

    Returns:
        The new index, open.

    Raises:
        InvalidInputError: bad layout, corrupt image, shape mismatch or bad owner mapping (the item is named).
        ConflictError: ``dest`` exists and ``overwrite`` is False, or the index at ``dest`` forgot samples
            while it was being rebuilt.
        CheckpointError: ``overwrite`` would replace an index whose tombstones cannot be read.
    """
    root = Path(root)
    if not root.is_dir():
        raise InvalidInputError(f"image folder {root} does not exist or is not a folder")
    plan = plan_folder(folder_paths(root), str(root), train_per_class, test_per_class)
    images = iter_plan(plan, lambda rel: (root / rel).read_bytes(), str(root))
    return _write(dest, plan.classes, _plan_ids(plan), images, owners, overwrite)


def ingest_zip(zip_path: Path | str, dest: Path | str, owners: Owners = None,
               train_per_class: int | None = None, test_per_class: int | None = None,
               overwrite: bool = False) -> TrainingIndex:
    """Index a zip of an ImageFolder tree (``train/<class>/*``, ``test/<class>/*``, optionally under one folder).

    Same options and errors as :func:`ingest_image_folder`; the image bytes are read from the zip as they are.
    """
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise InvalidInputError(f"zip file {zip_path} does not exist")
    with _zip_plan(zip_path, train_per_class, test_per_class) as (plan, images):
        return _write(dest, plan.classes, _plan_ids(plan), images, owners, overwrite)


@contextmanager
def _zip_plan(zip_path: Path, train_per_class: int | None,
              test_per_class: int | None) -> Iterator[tuple[FolderPlan, Iterator[SourceImage]]]:
    """The plan of a zipped ImageFolder tree and its images, read from the zip while the block runs."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise InvalidInputError(f"{zip_path} is not a readable zip file: {err}") from err
    with archive:
        prefix, paths = zip_paths(archive.namelist())
        plan = plan_folder(paths, str(zip_path), train_per_class, test_per_class)
        yield plan, iter_plan(plan, lambda rel: _read_member(archive, prefix + rel, zip_path), str(zip_path))


def add_images(index: TrainingIndex, source: Path | str, owners: Owners = None) -> AddResult:
    """Append the images of an ImageFolder tree or a zip of one to ``index`` (``tmu-admin index add``).

    The tree has the layout :func:`ingest_image_folder` reads (``train/<class>/*``, optionally ``test/``), with
    class folders named after classes of the index; sample ids are ``"<split>/<class>/<file stem>"`` and must
    be new.

    Returns:
        What was appended (:class:`AddResult`).

    Raises:
        InvalidInputError: a missing source, a bad layout, a class the index lacks, an id it holds already, an
            unreadable image, or a bad owner mapping.
        ConflictError: an image matches a sample forgotten while the append ran (nothing was added).
    """
    source = Path(source)
    mapping, _ = load_owners(owners)
    if source.is_dir():
        plan = plan_folder(folder_paths(source), str(source), None, None)
        images = iter_plan(plan, lambda rel: (source / rel).read_bytes(), str(source))
        return index.add(plan.classes, images, _plan_ids(plan), mapping, str(source))
    if not source.is_file():
        raise InvalidInputError(f"{source} does not exist; expected an ImageFolder tree or a zip of one")
    with _zip_plan(source, None, None) as (plan, images):
        return index.add(plan.classes, images, _plan_ids(plan), mapping, str(source))


def _read_member(archive: zipfile.ZipFile, name: str, zip_path: Path) -> bytes:
    try:
        return archive.read(name)
    except (zipfile.BadZipFile, OSError, ValueError) as err:  # zlib.error is not an OSError subclass
        raise InvalidInputError(f"{zip_path}/{name}: cannot be read from the zip: {err}") from err


def ingest_digits(dest: Path | str, test_fraction: float = 0.2, seed: int = 0, owners: Owners = None,
                  overwrite: bool = False) -> TrainingIndex:
    """Index scikit-learn's bundled digits (1,797 real 8x8 images, 1 channel, classes ``"0"``..``"9"``).

    Pixel values 0..16 become uint8 ``round(v * 255 / 16)``; the split is stratified and seeded.
    Sample ids are ``"digits/<split>/<n>"`` with ``n`` the position in scikit-learn's array.

    Args:
        dest: the index folder to create.
        test_fraction: share of each class held out as the test split, strictly between 0 and 1.
        seed: seed of the split.
        owners: as for :func:`ingest_image_folder`.
        overwrite: replace an existing index at ``dest``, keeping its tombstones, requests and key; source
            images whose sample id or pixel hash it forgot are skipped (see :meth:`TrainingIndex.build_record`).

    Returns:
        The new index, open.
    """
    classes, images = digits_images(test_fraction, seed)
    return _write(dest, classes, [item.sample_id for item in images], images, owners, overwrite)
