"""The interface every unlearning method follows, and the method registry.

A method is a class registered under a lowercase name with :func:`register_method`. It takes its options as
one frozen dataclass (``options_type``) and offers two calls:

- ``prepare(model, meta, data, device, workdir)``: per-model-version work that does not depend on which
  samples will be forgotten (a no-op for most baselines; TMU builds its twin problem here);
- ``unlearn(model, meta, data, device, workdir) -> UnlearnOutcome``: one forget request. It never mutates
  the model it is given; the outcome holds a new one.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from tmu_core.errors import InvalidInputError, UnknownIdsError

logger = logging.getLogger(__name__)

PARTS = ("forget", "retain", "twin")


class SampleSource(Protocol):
    """What unlearning needs from a training index: pixels and labels by sample id."""

    def load(self, ids: list[str]) -> torch.Tensor:
        """uint8 images (N, C, H, W) in the order of ``ids``."""

    def labels(self, ids: list[str]) -> torch.Tensor:
        """int64 labels (N,) in the order of ``ids``."""


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


def _shown(ids: Sequence[str], limit: int = 5) -> str:
    head = ", ".join(sorted(ids)[:limit])
    return head + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


@dataclass(frozen=True)
class UnlearnData:
    """Which samples to forget, keep and use for the twin problem, and where their pixels live.

    Attributes:
        index: a :class:`tmu_core.index.TrainingIndex` (or any object with ``load`` and ``labels``).
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

    def ids(self, part: str) -> tuple[str, ...]:
        """The ids of ``"forget"``, ``"retain"`` or ``"twin"``."""
        if part not in PARTS:
            raise InvalidInputError(f"unknown data part {part!r}; expected one of {', '.join(PARTS)}")
        return getattr(self, f"{part}_ids")

    def tensors(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (N, C, H, W) and int64 labels (N,) of one part, loaded once and cached.

        Args:
            part: ``"forget"``, ``"retain"`` or ``"twin"``.

        Raises:
            InvalidInputError: unknown part, or the part is empty.
        """
        ids = self.ids(part)
        if not ids:
            raise InvalidInputError(f"the {part} set is empty; it needs at least one sample id")
        if part not in self._cache:
            self._cache[part] = self.load(list(ids))
            logger.debug("loaded %s set: %d samples", part, len(ids))
        return self._cache[part]

    def load(self, ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images and int64 labels of any ids (not cached); served from a cached part when possible."""
        ids = list(ids)
        for part, (images, labels) in self._cache.items():
            position = {sample: row for row, sample in enumerate(self.ids(part))}
            if all(sample in position for sample in ids):
                rows = torch.tensor([position[sample] for sample in ids], dtype=torch.long)
                return images[rows], labels[rows]
        images = self.index.load(ids)
        labels = torch.as_tensor(self.index.labels(ids), dtype=torch.long)
        return images, labels


@dataclass(frozen=True)
class UnlearnOutcome:
    """The result of one forget request.

    Attributes:
        model: the unlearned model (a new object; the input model is left as it was).
        details: numbers and lists describing the run (JSON-serialisable).
        seconds: wall time of the request.
        predicted_hard_ids: forget ids the method predicted to be "hard" (misclassified by a gold model),
            or None for methods that make no such prediction.
    """

    model: nn.Module
    details: dict
    seconds: float
    predicted_hard_ids: list[str] | None = None


class UnlearnMethod(abc.ABC):
    """Base class of a registered unlearning method.

    Subclasses set ``options_type`` to a frozen dataclass that validates itself in ``__post_init__``.
    """

    name: ClassVar[str] = ""
    options_type: ClassVar[type] = object

    def __init__(self, options: Any | None = None) -> None:
        self.options = options if options is not None else self.options_type()

    def prepare(
        self, model: nn.Module, meta: Any, data: UnlearnData, device: torch.device, workdir: Path | None = None
    ) -> None:
        """Per-model-version work done before any forget request; nothing by default.

        Args:
            model: the served model M_o.
            meta: its :class:`tmu_core.train.CheckpointMeta`.
            data: the training samples (retain + forget) and the twin ids.
            device: where to compute.
            workdir: folder for files that survive the process (None: keep in memory only).
        """
        return None

    @abc.abstractmethod
    def unlearn(
        self, model: nn.Module, meta: Any, data: UnlearnData, device: torch.device, workdir: Path | None = None
    ) -> UnlearnOutcome:
        """Forget ``data.forget_ids`` from ``model``; never mutates ``model``.

        Args:
            model: the model to unlearn from (M_o).
            meta: its checkpoint metadata (architecture and training recipe).
            data: forget, retain and twin ids plus the sample source.
            device: where to compute.
            workdir: folder of prepared artifacts (None: in memory only).

        Returns:
            The unlearned model, details and timings.
        """


_METHODS: dict[str, type[UnlearnMethod]] = {}


def register_method(name: str) -> Callable[[type[UnlearnMethod]], type[UnlearnMethod]]:
    """Class decorator that registers an :class:`UnlearnMethod` under a lowercase name.

    Raises:
        InvalidInputError: the name is not lowercase or is already taken.
    """

    def decorate(cls: type[UnlearnMethod]) -> type[UnlearnMethod]:
        if name != name.lower() or not name:
            raise InvalidInputError(f"method names are lowercase and non-empty, got {name!r}")
        if name in _METHODS:
            raise InvalidInputError(f"unlearning method {name!r} is already registered")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorate


def list_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_METHODS)


def get_method(name: str, **options: Any) -> UnlearnMethod:
    """Build a registered method with its options.

    Args:
        name: a name from :func:`list_methods`.
        **options: fields of the method's options dataclass.

    Raises:
        InvalidInputError: unknown method, unknown option, or an option value out of range.
    """
    if name not in _METHODS:
        raise InvalidInputError(f"unknown unlearning method {name!r}; valid methods: {', '.join(list_methods())}")
    cls = _METHODS[name]
    valid = [f.name for f in dataclasses.fields(cls.options_type) if f.init]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise InvalidInputError(
            f"unknown option(s) {', '.join(unknown)} for method {name!r}; valid options: {', '.join(sorted(valid))}"
        )
    return cls(cls.options_type(**options))


def parse_method_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> ``(name, {key: value})``.

    Values are read as JSON when they parse (``0.01``, ``true``, ``["df","cf"]``), else kept as strings; commas
    inside ``[...]`` belong to the value. The name and keys are not checked here: ``get_method`` checks them.

    Raises:
        InvalidInputError: no method name, or an item without ``=``.
    """
    name, _, rest = text.strip().partition(":")
    if not name.strip():
        raise InvalidInputError(f"method spec {text!r} has no method name; expected name[:key=value,...], "
                                "e.g. tmu:noise_std=0 or fisher:alpha=0.03")
    items, depth, current = [], 0, ""
    for char in rest:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    options: dict[str, Any] = {}
    for item in filter(None, (i.strip() for i in items)):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidInputError(f"method spec {text!r}: {item!r} is not key=value")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return name.strip(), options


def check_range(owner: str, name: str, value: float, low: float, high: float | None = None, *, low_open: bool = False) -> None:
    """Raise ``InvalidInputError`` unless ``low <= value (<= high)``; ``low_open`` makes the low end strict."""
    too_low = value <= low if low_open else value < low
    if too_low or (high is not None and value > high):
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise InvalidInputError(f"{owner}: {name} must be {bound}, got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ``InvalidInputError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise InvalidInputError(f"{owner}: {name} must be one of {shown}, got {value!r}")
