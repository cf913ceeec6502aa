"""Twin/eval split of the test set and forget-set draws in every shape: stratified, disjoint, seeded, validated."""

from __future__ import annotations

import pytest

from tmu_core.errors import InvalidInputError
from tmu_core.evaluate.splits import (
    OWNER_MAX_SAMPLES,
    draw_forget_sets,
    owner_batches,
    owner_map,
    pick_forget_ids,
    pick_random_ids,
    split_test,
)


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


def _label(sample):
    return sample.split("/")[1]


def test_class_shape_gives_what_the_class_draw_gave_before():
    source = _Ids(train_per_class=50, test_per_class=4)
    draws = draw_forget_sets(source, "class", 0, classes=[2, 0], size=5)
    assert [(d.name, d.forget_class, d.details) for d in draws] == [("c2", 2, {}), ("c0", 0, {})]
    assert [d.forget_ids for d in draws] == [pick_forget_ids(source, 2, 5, 0), pick_forget_ids(source, 0, 5, 0)]
    # Pinned ids of the class draw, so cached gold models and published numbers stay valid.
    assert draws[0].forget_ids == ("train/c2/025", "train/c2/031", "train/c2/032", "train/c2/037", "train/c2/048")
    assert pick_forget_ids(source, 0, 5, 3) == (
        "train/c0/007", "train/c0/010", "train/c0/034", "train/c0/038", "train/c0/044")


@pytest.mark.parametrize(("shape", "options"), [
    ("class", {"classes": [1, 4], "size": 10}),
    ("random", {"fraction": 0.05, "experiments": 2}),
    ("owner", {"owners": 3, "experiments": 2}),
])
def test_every_shape_draws_seeded_training_ids(shape, options):
    source = _Ids(train_per_class=40, test_per_class=6, classes=5)
    train, test = set(source.ids("train")), set(source.ids("test"))
    draws = draw_forget_sets(source, shape, 0, **options)
    assert len(draws) == 2
    for draw in draws:
        assert draw.forget_ids and set(draw.forget_ids) <= train and test.isdisjoint(draw.forget_ids)
        assert list(draw.forget_ids) == sorted(set(draw.forget_ids))
    assert draws == draw_forget_sets(source, shape, 0, **options)
    other = draw_forget_sets(source, shape, 1, **options)
    assert [d.forget_ids for d in other] != [d.forget_ids for d in draws]


def test_random_shape_spans_classes_at_the_fraction():
    source = _Ids(train_per_class=100, test_per_class=4, classes=10)
    draws = draw_forget_sets(source, "random", 0, fraction=0.01, experiments=3)
    assert [d.name for d in draws] == ["random-1%-0", "random-1%-1", "random-1%-2"]
    assert all(d.forget_class is None and len(d.forget_ids) == 10 for d in draws)
    assert len({d.forget_ids for d in draws}) == 3
    for draw in draws:
        spanned = len({_label(sample) for sample in draw.forget_ids})
        assert spanned >= 3 and draw.details["classes_spanned"] == spanned
        assert draw.details["forget_shape"] == "random" and draw.details["forget_samples"] == 10
    assert len(pick_random_ids(source, 0.1, 0, 0)) == 100
    assert draw_forget_sets(source, "random", 0, fraction=0.1)[0].name == "random-10%-0"


def test_owner_map_partitions_the_training_set_into_owners_of_1_to_20():
    source = _Ids(train_per_class=200, test_per_class=4, classes=5)
    owners = owner_map(source, seed=0)
    members = [sample for ids in owners.values() for sample in ids]
    assert sorted(members) == source.ids("train")
    sizes = [len(ids) for ids in owners.values()]
    assert min(sizes) == 1 and max(sizes) <= OWNER_MAX_SAMPLES
    assert sizes.count(1) > sizes.count(10) and len(set(sizes)) >= 8  # a spread, most owners small
    assert any(len({_label(sample) for sample in ids}) > 1 for ids in owners.values())
    assert owners == owner_map(source, seed=0) and owners != owner_map(source, seed=1)


def test_owner_shape_forgets_the_union_of_a_batch_of_owners():
    source = _Ids(train_per_class=100, test_per_class=4, classes=5)
    owners = owner_map(source, seed=2)
    single = draw_forget_sets(source, "owner", 2, experiments=2)
    assert [d.name for d in single] == ["owner-0", "owner-1"]
    assert single[0].forget_ids == owners[single[0].details["owners"][0]]
    batches = draw_forget_sets(source, "owner", 2, owners=4, experiments=3)
    assert [d.name for d in batches] == ["owners4-0", "owners4-1", "owners4-2"]
    for draw in batches:
        names = draw.details["owners"]
        assert len(names) == 4
        assert draw.forget_ids == tuple(sorted(sample for name in names for sample in owners[name]))
        assert draw.details["owner_sizes"] == [len(owners[name]) for name in names]
    chosen = [name for draw in batches for name in draw.details["owners"]]
    assert len(set(chosen)) == len(chosen)  # experiments take disjoint owners


def test_shapes_reject_bad_values_naming_what_is_accepted():
    source = _Ids(train_per_class=20, test_per_class=4)
    with pytest.raises(InvalidInputError, match="unknown forget shape 'blob'; accepted: class, random, owner"):
        draw_forget_sets(source, "blob", 0)
    with pytest.raises(InvalidInputError, match=r"forget fraction must be in \(0, 1\)"):
        pick_random_ids(source, 1.0, 0, 0)
    with pytest.raises(InvalidInputError, match="gives 0 to forget; accepted: a fraction that gives 1..59"):
        pick_random_ids(source, 0.001, 0, 0)
    with pytest.raises(InvalidInputError, match="accepted: owners x experiments <= "):
        owner_batches(owner_map(source, 0), per_batch=50, batches=2, seed=0)
