"""Twin/eval split of the test set and forget-set draws: stratified, disjoint, seeded, validated."""

from __future__ import annotations

import pytest

from tmu_core.errors import InvalidInputError
from tmu_core.evaluate.splits import pick_forget_ids, split_test


class _Ids:
    """Ids laid out like an index: ``<split>/c<label>/<n>``."""

    def __init__(self, train_per_class: int, test_per_class: int, classes: int = 3) -> None:
        self.classes = [f"c{label}" for label in range(classes)]
        self._counts = {"train": train_per_class, "test": test_per_class}

    def ids(self, split: str = "train", classes: list[int] | None = None) -> list[str]:
        labels = range(len(self.classes)) if classes is None else classes
        return sorted(f"{split}/c{label}/{n:03d}" for label in labels for n in range(self._counts[split]))


def test_split_is_stratified_disjoint_and_complete():
    source = _Ids(train_per_class=10, test_per_class=20)
    split = split_test(source, twin_fraction=0.5, seed=0)
    assert set(split.twin_ids).isdisjoint(split.eval_ids)
    assert sorted(split.twin_ids + split.eval_ids) == source.ids("test")
    for label in range(3):
        assert sum(f"/c{label}/" in sample for sample in split.twin_ids) == 10


def test_split_depends_on_the_seed_only():
    source = _Ids(10, 20)
    assert split_test(source, 0.5, seed=1) == split_test(source, 0.5, seed=1)
    assert split_test(source, 0.5, seed=1) != split_test(source, 0.5, seed=2)


def test_split_keeps_at_least_one_sample_on_each_side():
    split = split_test(_Ids(10, 2), twin_fraction=0.9, seed=0)
    assert len(split.twin_ids) == 3 and len(split.eval_ids) == 3


def test_split_rejects_bad_fraction_and_tiny_classes():
    with pytest.raises(InvalidInputError, match="twin_fraction"):
        split_test(_Ids(10, 20), twin_fraction=1.0, seed=0)
    with pytest.raises(InvalidInputError, match="needs at least 2"):
        split_test(_Ids(10, 1), twin_fraction=0.5, seed=0)


def test_forget_ids_come_from_one_class_and_are_seeded():
    source = _Ids(train_per_class=50, test_per_class=4)
    first = pick_forget_ids(source, forget_class=2, size=10, seed=0)
    assert len(first) == 10 and len(set(first)) == 10
    assert all(sample.startswith("train/c2/") for sample in first)
    assert first == pick_forget_ids(source, 2, 10, seed=0)
    assert first != pick_forget_ids(source, 2, 10, seed=1)


def test_forget_ids_reject_unknown_class_and_oversized_sets():
    source = _Ids(train_per_class=50, test_per_class=4)
    with pytest.raises(InvalidInputError, match="forget class 3 does not exist; valid: 0..2"):
        pick_forget_ids(source, 3, 10, 0)
    with pytest.raises(InvalidInputError, match="accepted 1..49"):
        pick_forget_ids(source, 0, 50, 0)
