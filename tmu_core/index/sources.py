"""Where images come from: ImageFolder trees (on disk or in a zip), scikit-learn's digits, owner mappings."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from tmu_core.device import generator
from tmu_core.errors import InvalidInputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class SourceImage:
    """One image to ingest: ``data`` is encoded image bytes, or raw (C, H, W) pixel bytes when ``pixels`` is set."""

    sample_id: str
    label: int
    split: str
    name: str
    data: bytes
    pixels: np.ndarray | None = None


@dataclass(frozen=True)
class FolderPlan:
    """The classes of an ImageFolder layout and the files to read, in ingest order."""

    classes: list[str]
    entries: list[tuple[str, int, str, str]]  # (split, label, sample_id, relative path)


def _check_limit(value: int | None, option: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise InvalidInputError(f"{option} must be a positive int or None, got {value!r}")


def _group(paths: list[str], where: str) -> dict[str, dict[str, list[str]]]:
    groups: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for rel in paths:
        parts = PurePosixPath(rel).parts
        if any(p.startswith(".") or p == "__MACOSX" for p in parts) or parts[0] not in groups:
            continue
        if len(parts) != 3 or not parts[2].lower().endswith(IMAGE_SUFFIXES):
            raise InvalidInputError(
                f"unexpected file {rel} in {where}: expected <train|test>/<class>/<name> with a "
                f"{', '.join(IMAGE_SUFFIXES)} suffix"
            )
        groups[parts[0]].setdefault(parts[1], []).append(rel)
    return groups


def _check_stems(files: list[str], where: str) -> None:
    seen: dict[str, str] = {}
    for rel in files:
        stem = PurePosixPath(rel).stem
        if stem in seen:
            raise InvalidInputError(
                f"{where}: {seen[stem]} and {rel} give the same sample id; file stems must be unique within a class"
            )
        seen[stem] = rel


def plan_folder(paths: list[str], where: str, train_per_class: int | None,
                test_per_class: int | None) -> FolderPlan:
    """Turn the relative file paths of an ImageFolder tree into classes and ordered entries.

    Classes are the sorted folder names of ``train/``; each class keeps its first N files (sorted by name).

    Raises:
        InvalidInputError: no train images, a test class missing from train, an empty class, an unexpected file,
            two files with the same stem, or a bad limit.
    """
    _check_limit(train_per_class, "train_per_class")
    _check_limit(test_per_class, "test_per_class")
    groups = _group(paths, where)
    if not groups["train"]:
        raise InvalidInputError(f"{where} has no train/<class>/ images; expected train/<class>/<images> and test/")
    classes = sorted(groups["train"])
    extra = sorted(set(groups["test"]) - set(classes))
    if extra:
        raise InvalidInputError(
            f"{where}: class folder(s) test/{', test/'.join(extra)} have no train/ folder; train classes: "
            f"{', '.join(classes)}"
        )
    entries: list[tuple[str, int, str, str]] = []
    for split, limit in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(classes):
            files = sorted(groups[split].get(name, []), key=lambda rel: PurePosixPath(rel).name)
            _check_stems(files, where)
            files = files[:limit]
            entries.extend((split, label, f"{split}/{name}/{PurePosixPath(rel).stem}", rel) for rel in files)
    return FolderPlan(classes, entries)


def iter_plan(plan: FolderPlan, read: Callable[[str], bytes], where: str) -> Iterator[SourceImage]:
    """Read the planned files one by one."""
    for split, label, sample_id, rel in plan.entries:
        yield SourceImage(sample_id, label, split, f"{where}/{rel}" if where else rel, read(rel))


def folder_paths(root: Path) -> list[str]:
    """Relative POSIX paths of every file under ``root``."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def zip_paths(names: list[str]) -> tuple[str, list[str]]:
    """Strip one shared top folder (``cifar10/train/...``) when the zip has no ``train/`` at its root.

    Returns:
        ``(prefix, paths)``: the prefix to put back when reading, and the relative file paths.
    """
    files = [n for n in names if not n.endswith("/")]
    prefix = ""
    if not any(n.startswith("train/") for n in files):
        tops = {n.split("/", 1)[0] for n in files if "/" in n}
        if len(tops) == 1:
            prefix = tops.pop() + "/"
    return prefix, [n[len(prefix):] for n in files if n.startswith(prefix)]


def digits_images(test_fraction: float, seed: int) -> tuple[list[str], list[SourceImage]]:
    """scikit-learn's bundled digits as 1x8x8 uint8 images with a seeded stratified train/test split.

    Raises:
        InvalidInputError: ``test_fraction`` is not strictly between 0 and 1.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise InvalidInputError(f"test_fraction must be a number strictly between 0 and 1, got {test_fraction!r}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.round(bunch.images * 255.0 / 16.0).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    targets = bunch.target.astype(int)
    gen = generator(seed)
    test: set[int] = set()
    for label in range(10):
        members = np.flatnonzero(targets == label)
        order = torch.randperm(len(members), generator=gen).numpy()
        test.update(int(i) for i in members[order[: int(round(len(members) * test_fraction))]])
    images = []
    for n in range(len(targets)):
        split = "test" if n in test else "train"
        chw = np.ascontiguousarray(pixels[n][None, :, :])
        images.append(SourceImage(f"digits/{split}/{n}", int(targets[n]), split, f"digits[{n}]", chw.tobytes(), chw))
    images.sort(key=lambda item: (item.split != "train", item.sample_id))
    return [str(c) for c in range(10)], images


def load_owners(owners: Path | str | Mapping[str, str] | None) -> tuple[dict[str, str] | None, str]:
    """Read an owner mapping: a CSV with header ``sample_id,owner_id``, a JSON object, or a mapping.

    Returns:
        ``(mapping, where)``: the mapping (None when ``owners`` is None) and a name for it in messages.

    Raises:
        InvalidInputError: missing or unreadable file, wrong header, or empty ids.
    """
    if owners is None:
        return None, ""
    if isinstance(owners, Mapping):
        mapping, where = dict(owners), "owners mapping"
    else:
        path = Path(owners)
        where = f"owners file {path}"
        if not path.is_file():
            raise InvalidInputError(f"{where} does not exist; expected a CSV (sample_id,owner_id) or JSON object")
        mapping = _read_json_owners(path, where) if path.suffix.lower() == ".json" else _read_csv_owners(path, where)
    wrong = [k for k, v in mapping.items() if not isinstance(k, str) or not isinstance(v, str) or not k or not v]
    if wrong:
        raise InvalidInputError(f"{where}: sample and owner ids must be non-empty strings; bad entries for "
                                f"{', '.join(map(repr, wrong[:10]))}")
    return mapping, where


def check_owners(mapping: dict[str, str] | None, where: str, sample_ids: list[str]) -> None:
    """Reject an owner mapping that names samples the data does not hold, listing them.

    Raises:
        InvalidInputError: ``mapping`` has sample ids outside ``sample_ids``.
    """
    unknown = sorted(set(mapping or {}) - set(sample_ids))
    if unknown:
        shown = ", ".join(unknown[:20]) + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        raise InvalidInputError(f"{where} names {len(unknown)} sample id(s) not in the data: {shown}")


def _read_json_owners(path: Path, where: str) -> dict:
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"{where} is not valid JSON: {err}") from err
    if not isinstance(mapping, dict):
        raise InvalidInputError(
            f"{where} must hold a JSON object {{sample_id: owner_id}}, got {type(mapping).__name__}"
        )
    return mapping


def _read_csv_owners(path: Path, where: str) -> dict[str, str]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InvalidInputError(f"{where} is not a readable CSV: {err}") from err
    if not rows or [c.strip() for c in rows[0]] != ["sample_id", "owner_id"]:
        raise InvalidInputError(f"{where}: first row must be the header sample_id,owner_id, got {rows[:1]}")
    mapping: dict[str, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2:
            raise InvalidInputError(f"{where} line {line}: expected 2 columns (sample_id,owner_id), got {row}")
        sample_id, owner_id = row[0].strip(), row[1].strip()
        if sample_id in mapping:
            raise InvalidInputError(f"{where} line {line}: sample {sample_id!r} is listed twice")
        mapping[sample_id] = owner_id
    return mapping
