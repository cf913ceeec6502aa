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
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from tmu_core.errors import InvalidInputError
from tmu_core.unlearn.data import UnlearnData

logger = logging.getLogger(__name__)


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
        return

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
    """Raise ``InvalidInputError`` unless ``value`` is a number and ``low <= value (<= high)``; ``low_open`` makes
    the low end strict."""
    bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        hint = " (JSON null, not None, turns an optional setting off)" if value == "None" else ""
        raise InvalidInputError(f"{owner}: {name} must be a number {bound}, got {value!r}{hint}")
    too_low = value <= low if low_open else value < low
    if too_low or (high is not None and value > high):
        raise InvalidInputError(f"{owner}: {name} must be {bound}, got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ``InvalidInputError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise InvalidInputError(f"{owner}: {name} must be one of {shown}, got {value!r}")
