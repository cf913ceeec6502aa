"""The data an unlearning method works on: forget, retain and twin ids over a source of pixels and labels.

The small parts (D_f, D_test) load whole and stay cached; work over the retained set reads it a batch at a time
(``UnlearnData.batches`` in order, ``UnlearnData.rows`` for random batches), so memory does not grow with the
training set.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tmu_core.errors import InvalidInputError, UnknownIdsError
from tmu_core.unlearn.common import batch_for

logger = logging.getLogger(__name__)

PARTS = ("forget", "retain", "twin")


class SampleSource(Protocol):
    """What unlearning needs from a training index: pixels and labels by sample id.

    A :class:`tmu_core.index.TrainingIndex`, an ``IndexView`` of one, or any object with these methods. Passes
    over a whole set read it with ``iter_batches`` when the source has it (else ``load`` a batch at a time);
    ``image_shape`` (C, H, W), when the source has it, sizes those batches before the first read.
    """

    def load(self, ids: list[str]) -> torch.Tensor:
        """uint8 images (N, C, H, W) in the order of ``ids``."""

    def labels(self, ids: list[str]) -> torch.Tensor:
        """int64 labels (N,) in the order of ``ids``."""

    def iter_batches(self, ids: list[str], batch_size: int,
                     device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(uint8 images (B, C, H, W), int64 labels (B,))`` over ``ids`` in order (optional)."""


class TensorSource:
    """A :class:`SampleSource` over tensors already in memory (for tensors that never went into an index).

    Args:
        ids: one id per row.
        images: uint8 (N, C, H, W).
        labels: int64 (N,).

    Raises:
        InvalidInputError: lengths differ, ids repeat, or the images are not uint8 (N, C, H, W).
    """

    def __init__(self, ids: Sequence[str], images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise InvalidInputError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if not (len(ids) == images.shape[0] == labels.shape[0]):
            raise InvalidInputError(
                f"ids, images and labels must have one row each, got {len(ids)}, {images.shape[0]}, {labels.shape[0]}"
            )
        self._row = {str(sample): row for row, sample in enumerate(ids)}
        if len(self._row) != len(ids):
            raise InvalidInputError("ids must be unique")
        self._images, self._labels = images, labels.long()
        self.image_shape = tuple(images.shape[1:])

    def _rows(self, ids: Sequence[str]) -> torch.Tensor:
        missing = [sample for sample in ids if sample not in self._row]
        if missing:
            raise UnknownIdsError(missing)
        return torch.tensor([self._row[sample] for sample in ids], dtype=torch.long)

    def load(self, ids: list[str]) -> torch.Tensor:
        """uint8 images (N, C, H, W) of ``ids``, in order."""
        return self._images[self._rows(ids)]

    def labels(self, ids: list[str]) -> torch.Tensor:
        """int64 labels (N,) of ``ids``, in order."""
        return self._labels[self._rows(ids)]

    def iter_batches(self, ids: list[str], batch_size: int,
                     device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, labels)`` of ``ids`` in order, ``batch_size`` at a time, on ``device``."""
        rows = self._rows(ids)
        for start in range(0, rows.numel(), batch_size):
            batch = rows[start:start + batch_size]
            yield self._images[batch].to(device), self._labels[batch].to(device)


def _shown(ids: Sequence[str], limit: int = 5) -> str:
    head = ", ".join(sorted(ids)[:limit])
    return head + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


@dataclass(frozen=True)
class UnlearnData:
    """Which samples to forget, keep and use for the twin problem, and where their pixels live.

    The small parts (D_f and D_test) load whole and stay cached (:meth:`tensors`). Work over the retained set
    reads it a batch at a time (:meth:`batches` for a pass in order, :meth:`rows` for random batches), so the
    memory it takes does not grow with the training set.

    Attributes:
        index: a :class:`tmu_core.index.TrainingIndex`, an ``IndexView`` of one, or any :class:`SampleSource`.
        forget_ids: D_f, the samples to forget (may be empty for ``prepare``).
        retain_ids: D_r, the training samples to keep.
        twin_ids: D_test, held-out samples (never trained on) that define TMU's twin problem.

    Raises:
        InvalidInputError: a sample appears twice, or in two of the three sets.
    """

    index: Any
    forget_ids: tuple[str, ...]
    retain_ids: tuple[str, ...]
    twin_ids: tuple[str, ...] = ()
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _positions: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _shape: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("forget_ids", "retain_ids", "twin_ids"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise InvalidInputError(f"{name} must be a list of sample ids, got the string {value!r}")
            ids = tuple(str(i) for i in value)
            dupes = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
            if dupes:
                raise InvalidInputError(f"{name} lists {len(dupes)} id(s) more than once: {_shown(dupes)}")
            object.__setattr__(self, name, ids)
        pairs = (("forget_ids", "retain_ids"), ("forget_ids", "twin_ids"), ("retain_ids", "twin_ids"))
        for first, second in pairs:
            both = set(getattr(self, first)) & set(getattr(self, second))
            if both:
                raise InvalidInputError(
                    f"{len(both)} id(s) are in both {first} and {second} (the sets must be disjoint): {_shown(list(both))}"
                )

    @property
    def training_ids(self) -> tuple[str, ...]:
        """D_r + D_f: every sample the original model was trained on, sorted."""
        return tuple(sorted(self.retain_ids + self.forget_ids))

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of every image read: the source's ``image_shape``, else that of one sample read."""
        if not self._shape:
            shape = getattr(self.index, "image_shape", None)
            if shape is None:
                first = next((ids[0] for ids in (self.forget_ids, self.twin_ids, self.retain_ids) if ids), None)
                if first is None:
                    raise InvalidInputError("no sample ids: the forget, retain and twin sets are all empty")
                shape = self.images([first]).shape[1:]
            self._shape.extend(int(v) for v in shape)
        return tuple(self._shape)

    def ids(self, part: str) -> tuple[str, ...]:
        """The ids of ``"forget"``, ``"retain"`` or ``"twin"``."""
        if part not in PARTS:
            raise InvalidInputError(f"unknown data part {part!r}; expected one of {', '.join(PARTS)}")
        return getattr(self, f"{part}_ids")

    def nonempty(self, part: str) -> tuple[str, ...]:
        """The ids of a part that must not be empty.

        Raises:
            InvalidInputError: unknown part, or the part is empty.
        """
        ids = self.ids(part)
        if not ids:
            raise InvalidInputError(f"the {part} set is empty; it needs at least one sample id")
        return ids

    def tensors(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (N, C, H, W) and int64 labels (N,) of one part, loaded once and cached.

        For the small parts (``"forget"``, ``"twin"``); the retained set is read with :meth:`batches` or
        :meth:`rows` instead, so that it is never in memory at once.

        Args:
            part: ``"forget"``, ``"retain"`` or ``"twin"``.

        Raises:
            InvalidInputError: unknown part, or the part is empty.
        """
        ids = self.nonempty(part)
        if part not in self._cache:
            self._cache[part] = self.load(list(ids))
            self._positions[part] = {sample: row for row, sample in enumerate(ids)}
            logger.debug("loaded %s set: %d samples", part, len(ids))
        return self._cache[part]

    def _cached_rows(self, ids: list[str]) -> tuple[str, torch.Tensor] | None:
        """The cached part holding every one of ``ids``, and their rows in it (None when no part does)."""
        for part in self._cache:
            position = self._positions[part]
            if all(sample in position for sample in ids):
                return part, torch.tensor([position[sample] for sample in ids], dtype=torch.long)
        return None

    def load(self, ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images and int64 labels of any ids (not cached); served from a cached part when possible."""
        return self.images(ids), self.labels_of(ids)

    def images(self, ids: Sequence[str]) -> torch.Tensor:
        """uint8 images (N, C, H, W) of any ids, in order (not cached); from a cached part when possible."""
        ids = list(ids)
        cached = self._cached_rows(ids)
        if cached is not None:
            return self._cache[cached[0]][0][cached[1]]
        return self.index.load(ids)

    def labels_of(self, ids: Sequence[str]) -> torch.Tensor:
        """int64 labels (N,) of any ids, in order, without reading their images."""
        ids = list(ids)
        cached = self._cached_rows(ids)
        if cached is not None:
            return self._cache[cached[0]][1][cached[1]]
        return torch.as_tensor(self.index.labels(ids), dtype=torch.long).cpu()

    def batches(self, ids: Sequence[str], batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 images (B, C, H, W) and int64 labels (B,) of ``ids``, in order, one batch in memory at a time.

        Reads through the source's ``iter_batches`` (``load`` a batch at a time for a source without it, or
        from memory for ids of a cached part).

        Args:
            ids: the samples, in the order wanted.
            batch_size: images per batch; None: :func:`tmu_core.unlearn.common.batch_for` of the image size.
        """
        ids = list(ids)
        size = batch_size or batch_for(self.image_shape)
        reader = getattr(self.index, "iter_batches", None)
        if reader is None or self._cached_rows(ids) is not None:
            for start in range(0, len(ids), size):
                yield self.load(ids[start:start + size])
            return
        for images, labels in reader(ids, size, "cpu"):
            yield images, labels.long()

    def rows(self, ids: Sequence[str]) -> LazyImages:
        """The images of ``ids`` for random access by row, read only when a row is asked for."""
        return LazyImages(self, ids)


class LazyImages:
    """uint8 images (N, C, H, W) of some sample ids, read from the source only for the rows asked for.

    It stands where code indexes an image tensor by rows (``images[rows]``, ``images[a:b]``, ``images.shape``),
    so a loop over random batches of the retained set holds one batch at a time, whatever N is. Rows are read
    on the CPU (``device``).

    Attributes:
        ids: the samples, one a row.
        shape: (N, C, H, W).
    """

    device = torch.device("cpu")

    def __init__(self, data: UnlearnData, ids: Sequence[str]) -> None:
        self.ids = tuple(ids)
        self._data = data
        self.shape = torch.Size((len(self.ids), *data.image_shape))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """uint8 images of ``rows`` (a slice, or a LongTensor of row numbers), in that order."""
        if isinstance(rows, slice):
            picked = list(self.ids[rows])
        else:
            picked = [self.ids[row] for row in torch.as_tensor(rows).reshape(-1).tolist()]
        return self._data.images(picked)
