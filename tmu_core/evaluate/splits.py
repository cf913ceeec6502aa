"""Seeded, class-stratified choice of the twin/eval halves of the test set, and seeded forget sets in three shapes.

Forget shapes: ``class`` (samples of one class), ``random`` (a fraction of the training set over all classes) and
``owner`` (the samples of one owner or a batch of owners of a synthetic owner map). The evaluation only ever works
on ids: it never calls ``index.forget``, so the index stays unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
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


FORGET_SHAPES = ("class", "random", "owner")
OWNER_MAX_SAMPLES = 20
OWNER_SIZE_DECAY = 0.8  # P(an owner has k samples) is proportional to 0.8 ** (k - 1), k in 1..20: mean about 4.8


@dataclass(frozen=True)
class ForgetDraw:
    """One experiment's forget set, as a forget shape drew it.

    Attributes:
        name: the experiment's name in rows and tables: the class name for the ``class`` shape (as before), else
            the shape, its size and the experiment number: ``random-1%-0``, ``owner-0``, ``owners5-0``.
        forget_class: the class of a ``class`` draw; ``None`` for the shapes whose sets span classes.
        forget_ids: the forget ids, sorted training ids.
        details: what was drawn (shape, samples, classes spanned, owners), added to every row of the experiment;
            empty for the ``class`` shape, whose rows keep their form.
    """

    name: str
    forget_class: int | None
    forget_ids: tuple[str, ...]
    details: Mapping[str, Any] = field(default_factory=dict)


def _classes_spanned(index: IdSource, ids: Sequence[str]) -> int:
    chosen = set(ids)
    return sum(1 for label in range(len(index.classes)) if chosen.intersection(index.ids("train", classes=[label])))


def pick_random_ids(index: IdSource, fraction: float, seed: int, experiment: int) -> tuple[str, ...]:
    """Draw ``round(fraction * N)`` training ids uniformly over all classes, seeded by (seed, experiment).

    Args:
        index: the training index.
        fraction: share of the training set to forget, in ``(0, 1)`` (SalUn's protocol uses 0.01 and 0.1).
        seed: the protocol seed.
        experiment: the experiment number within the seed.

    Returns:
        The forget ids, sorted; at least one, and at least one training sample is retained.

    Raises:
        InvalidInputError: the fraction is outside ``(0, 1)`` or leaves no sample to forget or to retain.
    """
    if not 0.0 < fraction < 1.0:
        raise InvalidInputError(f"forget fraction must be in (0, 1), e.g. 0.01 for 1%, got {fraction}")
    ids = index.ids("train")
    size = round(len(ids) * fraction)
    if not 1 <= size <= len(ids) - 1:
        raise InvalidInputError(
            f"forget fraction {fraction} of {len(ids)} training samples gives {size} to forget; "
            f"accepted: a fraction that gives 1..{len(ids) - 1}"
        )
    return tuple(sorted(_shuffled(ids, 2_000_003 * seed + experiment)[:size]))


def _owner_sizes(count: int, seed: int, max_samples: int) -> list[int]:
    """Owner sizes in ``1..max_samples`` from a truncated geometric spread, summing to ``count``."""
    weights = torch.tensor([OWNER_SIZE_DECAY ** k for k in range(max_samples)])
    # ``count`` draws of at least 1 each: the running sum always reaches ``count``.
    draws = (torch.multinomial(weights, count, replacement=True, generator=generator(seed)) + 1).tolist()
    sizes, total = [], 0
    for size in draws:
        if total + size >= count:
            sizes.append(count - total)
            break
        sizes.append(size)
        total += size
    return sizes


def owner_map(index: IdSource, seed: int, max_samples: int = OWNER_MAX_SAMPLES) -> dict[str, tuple[str, ...]]:
    """A synthetic owner of every training id: owners of 1 to ``max_samples`` samples, drawn at random.

    Sizes follow a truncated geometric spread (most owners hold a few samples, some up to ``max_samples``) and
    each owner's samples are drawn at random from the whole training set, so an owner spans classes.

    Args:
        index: the training index.
        seed: the protocol seed (one map per seed).
        max_samples: the largest owner.

    Returns:
        Owner names (``owner-00000``, ...) mapped to their sorted ids; the owners partition the training set.
    """
    ids = _shuffled(index.ids("train"), 3_000_017 * seed + 1)
    owners, start = {}, 0
    for number, size in enumerate(_owner_sizes(len(ids), 3_000_017 * seed + 2, max_samples)):
        owners[f"owner-{number:05d}"] = tuple(sorted(ids[start:start + size]))
        start += size
    return owners


def owner_batches(owners: Mapping[str, Sequence[str]], per_batch: int, batches: int,
                  seed: int) -> list[tuple[str, ...]]:
    """Disjoint batches of ``per_batch`` owners each, drawn at random (the job queue merges requests so).

    Raises:
        InvalidInputError: there are fewer than ``per_batch * batches`` owners.
    """
    names = list(owners)
    if per_batch * batches > len(names):
        raise InvalidInputError(
            f"{batches} experiment(s) of {per_batch} owner(s) need {per_batch * batches} owners; the training set "
            f"has {len(names)}; accepted: owners x experiments <= {len(names)}"
        )
    order = _shuffled(names, 3_000_017 * seed + 3)
    return [tuple(sorted(order[i * per_batch:(i + 1) * per_batch])) for i in range(batches)]


def _class_draw(index: IdSource, forget_class: int, size: int, seed: int) -> ForgetDraw:
    ids = pick_forget_ids(index, forget_class, size, seed)
    return ForgetDraw(index.classes[forget_class], forget_class, ids)


def _random_draws(index: IdSource, fraction: float, experiments: int, seed: int) -> list[ForgetDraw]:
    draws = []
    for experiment in range(experiments):
        ids = pick_random_ids(index, fraction, seed, experiment)
        details = {"forget_shape": "random", "forget_fraction": fraction, "forget_samples": len(ids),
                   "classes_spanned": _classes_spanned(index, ids)}
        draws.append(ForgetDraw(f"random-{fraction * 100:g}%-{experiment}", None, ids, details))
    return draws


def _owner_draws(index: IdSource, per_batch: int, experiments: int, seed: int) -> list[ForgetDraw]:
    owners = owner_map(index, seed)
    prefix = "owner" if per_batch == 1 else f"owners{per_batch}"
    draws = []
    for experiment, batch in enumerate(owner_batches(owners, per_batch, experiments, seed)):
        ids = tuple(sorted(sample for name in batch for sample in owners[name]))
        details = {"forget_shape": "owner", "owners": list(batch), "owner_sizes": [len(owners[n]) for n in batch],
                   "forget_samples": len(ids), "classes_spanned": _classes_spanned(index, ids)}
        draws.append(ForgetDraw(f"{prefix}-{experiment}", None, ids, details))
    return draws


def draw_forget_sets(index: IdSource, shape: str, seed: int, *, classes: Sequence[int] = (), size: int = 1,
                     fraction: float = 0.01, owners: int = 1, experiments: int = 1) -> tuple[ForgetDraw, ...]:
    """The forget sets of one seed, one per experiment, in the given shape.

    - ``class``: ``size`` samples of one class, one experiment per entry of ``classes`` (:func:`pick_forget_ids`).
    - ``random``: ``fraction`` of the training set drawn over all classes, ``experiments`` draws.
    - ``owner``: ``owners`` owners of a synthetic owner map (:func:`owner_map`) per experiment, ``experiments``
      disjoint batches.

    Raises:
        InvalidInputError: an unknown shape, or sizes that do not fit the data.
    """
    if shape == "class":
        return tuple(_class_draw(index, forget_class, size, seed) for forget_class in classes)
    if shape == "random":
        return tuple(_random_draws(index, fraction, experiments, seed))
    if shape == "owner":
        return tuple(_owner_draws(index, owners, experiments, seed))
    raise InvalidInputError(f"unknown forget shape {shape!r}; accepted: {', '.join(FORGET_SHAPES)}")
