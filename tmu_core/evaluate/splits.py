"""Seeded, class-stratified choice of the twin/eval halves of the test set and of forget sets.

The evaluation only ever works on ids: it never calls ``index.forget``, so the index stays unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol as TypingProtocol

import torch

from tmu_core.device import generator
from tmu_core.errors import InvalidInputError


class IdSource(TypingProtocol):
    """The part of ``TrainingIndex`` the splits need."""

    classes: list[str]

    def ids(self, split: str = "train", classes: list[int] | None = None) -> list[str]: ...


@dataclass(frozen=True)
class TestSplit:
    """The two disjoint halves of the test set.

    Attributes:
        twin_ids: held-out ids that TMU's twin problem uses (``UnlearnData.twin_ids``).
        eval_ids: ids no method ever sees: ACC_Dtest and the membership attack's non-members.
    """

    twin_ids: tuple[str, ...]
    eval_ids: tuple[str, ...]


def _shuffled(ids: Sequence[str], seed: int) -> list[str]:
    order = torch.randperm(len(ids), generator=generator(seed)).tolist()
    return [ids[i] for i in order]


def split_test(index: IdSource, twin_fraction: float, seed: int) -> TestSplit:
    """Split each class's test ids into a twin part and an eval part.

    Args:
        index: the training index.
        twin_fraction: share of each class's test ids given to the twin part, in ``(0, 1)``.
        seed: seed of the shuffle.

    Returns:
        Sorted, disjoint twin and eval ids; every class contributes to both.

    Raises:
        InvalidInputError: the fraction is outside ``(0, 1)`` or a class has fewer than 2 test samples.
    """
    if not 0.0 < twin_fraction < 1.0:
        raise InvalidInputError(f"twin_fraction must be in (0, 1), got {twin_fraction}")
    twin: list[str] = []
    held: list[str] = []
    for label, name in enumerate(index.classes):
        ids = index.ids("test", classes=[label])
        if len(ids) < 2:
            raise InvalidInputError(
                f"class {label} ({name}) has {len(ids)} test sample(s); the twin/eval split needs at least 2"
            )
        shuffled = _shuffled(ids, seed * 7919 + label)
        cut = min(max(1, round(len(ids) * twin_fraction)), len(ids) - 1)
        twin += shuffled[:cut]
        held += shuffled[cut:]
    return TestSplit(tuple(sorted(twin)), tuple(sorted(held)))


def pick_forget_ids(index: IdSource, forget_class: int, size: int, seed: int) -> tuple[str, ...]:
    """Draw ``size`` training ids of one class, seeded by (seed, class).

    Args:
        index: the training index.
        forget_class: class index to draw from.
        size: number of samples; the class must keep at least one retained sample.
        seed: the protocol seed.

    Returns:
        The forget ids, sorted.

    Raises:
        InvalidInputError: unknown class, or ``size`` not in ``[1, class size - 1]``.
    """
    if not 0 <= forget_class < len(index.classes):
        raise InvalidInputError(
            f"forget class {forget_class} does not exist; valid: 0..{len(index.classes) - 1} ({', '.join(index.classes)})"
        )
    ids = index.ids("train", classes=[forget_class])
    if not 1 <= size <= len(ids) - 1:
        raise InvalidInputError(
            f"forget size {size} for class {forget_class} ({index.classes[forget_class]}): the class has "
            f"{len(ids)} training samples; accepted 1..{len(ids) - 1} so that some of the class is retained"
        )
    return tuple(sorted(_shuffled(ids, 1_000_003 * seed + forget_class)[:size]))
