"""Unlearning reads the retained set a batch at a time, with the values of the in-memory computation.

A guarding source wraps the pixels and counts how many training images one read materialises; it refuses a
read of more than one batch of them. Preparation and every method run through it over a training set larger
than one batch.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch
from test_service_support import FAST_TMU, make_index, make_workspace
from test_unlearn_baselines import QUICK as BASELINE_QUICK
from test_unlearn_support import make_problem, state_equal

from tmu_core.device import generator
from tmu_core.errors import InvalidInputError
from tmu_core.train import TrainConfig, channel_stats, fit
from tmu_core.unlearn import TensorSource, UnlearnData, get_method
from tmu_core.unlearn import features as features_module
from tmu_core.unlearn.common import batch_for, features_of, inference_batch
from tmu_core.unlearn.features import distance_chunks, distance_feature
from tmu_core.unlearn.recipe import fit_rows, pixel_stats

DEVICE = torch.device("cpu")
FAST = {"twin_epochs": 3, "clf_epochs": 10, "max_steps": 5}
# One pass or step of each baseline; fisher samples more than one batch of D_r.
QUICK = {**BASELINE_QUICK, "retrain": {"epochs": 2}, "neg_grad": {"epochs": 1}, "fisher": {"samples": 300}}

class TooManyImages(AssertionError):
    """A read asked for more training images at once than the guard allows."""


class GuardedSource:
    """A sample source that counts the watched images one read materialises, and refuses more than ``limit``.

    It offers only what unlearning may use of an index: ``load``, ``iter_batches``, ``labels``, ``lookup``
    and ``image_shape``.
    """

    def __init__(self, inner, watched, limit: int) -> None:
        self.inner, self.watched, self.limit = inner, frozenset(watched), limit
        self.largest = 0
        self.reads = 0
        self.image_shape = getattr(inner, "image_shape", None)

    def _count(self, ids) -> None:
        count = sum(sample in self.watched for sample in ids)
        if count > self.limit:
            raise TooManyImages(f"one read of {count} training images; at most {self.limit} allowed")
        self.largest = max(self.largest, count)
        self.reads += 1

    def load(self, ids, device="cpu"):
        self._count(ids)
        return self.inner.load(list(ids))

    def iter_batches(self, ids, batch_size, device="cpu"):
        ids = list(ids)
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            self._count(chunk)
            yield self.inner.load(chunk), self.inner.labels(chunk)

    def labels(self, ids, device="cpu"):
        return self.inner.labels(list(ids))

    def lookup(self, ids):
        return self.inner.lookup(list(ids))


@functools.lru_cache(maxsize=1)
def big_problem():
    """600 training images of 8x8: one batch of 8x8 images is 256, so the training set takes three."""
    return make_problem(per_class=150, twin_per_class=25, epochs=12)


@pytest.fixture(scope="module")
def prob():
    return big_problem()


def _batch(prob) -> int:
    return batch_for(prob.source.load([prob.train_ids[0]]).shape)


def _in_memory(prob, forget=()) -> UnlearnData:
    """The same data with D_r loaded whole into memory first: the computation before streaming."""
    data = prob.data(forget)
    data.tensors("retain")
    return data


def test_the_guard_refuses_what_loading_the_retained_set_whole_does(prob):
    guard = GuardedSource(prob.source, prob.train_ids, limit=_batch(prob))
    assert len(prob.train_ids) > 2 * guard.limit
    with pytest.raises(TooManyImages):
        UnlearnData(guard, (), prob.train_ids, prob.twin_ids).tensors("retain")


def test_tmu_prepare_reads_one_batch_of_the_training_set_at_a_time(prob):
    guard = GuardedSource(prob.source, prob.train_ids, limit=_batch(prob))
    method = get_method("tmu", **FAST)
    method.prepare(prob.model, prob.meta, UnlearnData(guard, (), prob.train_ids, prob.twin_ids), DEVICE)
    assert 0 < guard.largest <= guard.limit < len(prob.train_ids)
    streamed = method._memory
    whole = features_of(prob.model, prob.source.load(list(prob.train_ids)), DEVICE)
    assert torch.equal(streamed.train_features, whole)

    reference = get_method("tmu", **FAST)
    reference.prepare(prob.model, prob.meta, _in_memory(prob), DEVICE)
    expected = reference._memory
    assert streamed.train_ids == expected.train_ids and streamed.cf_ids == expected.cf_ids
    assert all(torch.equal(streamed.twin_columns[k], expected.twin_columns[k]) for k in expected.twin_columns)
    for name in ("twin_state", "cf_state"):
        mine, theirs = getattr(streamed, name), getattr(expected, name)
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert state_equal(streamed.classifier, expected.classifier)


@pytest.mark.parametrize("options", [{}, {"cf_per_request": True, "twin_retain_mix": 1.0}])
def test_a_tmu_request_reads_one_batch_of_the_retained_set_at_a_time(prob, options):
    forget = prob.forget_ids(1, 20)
    retain = tuple(i for i in prob.train_ids if i not in set(forget))
    guard = GuardedSource(prob.source, retain, limit=_batch(prob))
    data = UnlearnData(guard, forget, retain, prob.twin_ids)
    outcome = get_method("tmu", **FAST, **options).unlearn(prob.model, prob.meta, data, DEVICE, None)
    assert 0 < guard.largest <= guard.limit
    expected = get_method("tmu", **FAST, **options).unlearn(prob.model, prob.meta, _in_memory(prob, forget),
                                                            DEVICE, None)
    assert state_equal(outcome.model, expected.model)
    assert outcome.predicted_hard_ids == expected.predicted_hard_ids


@pytest.mark.parametrize("name", sorted(QUICK))
def test_baselines_read_one_batch_of_the_retained_set_at_a_time(prob, name):
    forget = prob.forget_ids(2, 20)
    retain = tuple(i for i in prob.train_ids if i not in set(forget))
    guard = GuardedSource(prob.source, retain, limit=_batch(prob))
    outcome = get_method(name, **QUICK[name]).unlearn(prob.model, prob.meta, UnlearnData(guard, forget, retain,
                                                                                          prob.twin_ids), DEVICE)
    assert 0 < guard.largest <= guard.limit < len(retain)
    expected = get_method(name, **QUICK[name]).unlearn(prob.model, prob.meta, _in_memory(prob, forget), DEVICE)
    assert state_equal(outcome.model, expected.model)


@pytest.mark.parametrize("name", ["scrub", "fisher", "bad_teacher", "finetune", "neg_grad"])
def test_baselines_still_refuse_an_empty_retained_set(prob, name):
    data = UnlearnData(prob.source, prob.forget_ids(0, 5), (), prob.twin_ids)
    with pytest.raises(InvalidInputError, match="the retain set is empty"):
        get_method(name, **QUICK[name]).unlearn(prob.model, prob.meta, data, DEVICE)


def test_service_preparation_reads_the_index_one_batch_at_a_time(tmp_path):
    """``artifacts.prepare`` (what a job and ``prepare_version`` run) over a real index through its view."""
    from tmu_core.forget.artifacts import plan_data, prepare
    from tmu_core.preprocess import Preprocess
    from tmu_core.train import train_model

    with make_index(make_workspace(tmp_path), tmp_path, train=70, test=10) as index:
        train_ids = index.ids("train")
        cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, augment=False, seed=0)
        trained = train_model(index, train_ids, "small_cnn", cfg, DEVICE)
        view = index.view(Preprocess.from_meta(trained.meta))
        guard = GuardedSource(view, train_ids, limit=batch_for(view.image_shape))
        assert len(train_ids) > guard.limit
        method = get_method("tmu", **FAST_TMU)
        prepare(method, trained.model, trained.meta, guard, plan_data(index, 0.5, 0, train_ids), DEVICE,
                tmp_path / "artifacts")
        assert 0 < guard.largest <= guard.limit
        whole = features_of(trained.model, view.load(train_ids), DEVICE)
    assert method._memory.train_ids == tuple(train_ids)
    assert torch.equal(method._memory.train_features, whole)


# --- the batch-size rule -------------------------------------------------------------------------------


def test_batch_size_follows_the_pixel_count():
    assert batch_for((3, 32, 32)) == 256 and batch_for((1, 8, 8)) == 256
    assert batch_for((3, 64, 64)) == 64 and batch_for((3, 224, 224)) == 8
    assert batch_for((1, 64, 64)) == batch_for((3, 64, 64))  # activations follow H x W, not the channels
    assert inference_batch(torch.zeros(2, 3, 96, 96, dtype=torch.uint8)) == batch_for((3, 96, 96)) == 28


def test_reads_take_the_batch_of_the_image_size():
    images = torch.randint(0, 256, (60, 3, 96, 96), generator=generator(0), dtype=torch.uint8)
    ids = [f"s{i}" for i in range(60)]
    source = TensorSource(ids, images, torch.arange(60) % 3)
    sizes = [batch.shape[0] for batch, _ in UnlearnData(source, (), ids).batches(ids)]
    assert sizes == [28, 28, 4]


class _LoadOnly:
    """A source with ``load`` and ``labels`` only (like an in-memory evaluation source)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def load(self, ids):
        self.calls.append(len(ids))
        return self.inner.load(ids)

    def labels(self, ids):
        return self.inner.labels(ids)


def test_batches_rows_and_labels_read_only_what_they_need():
    images = torch.randint(0, 256, (10, 1, 4, 4), generator=generator(1), dtype=torch.uint8)
    ids = [f"s{i}" for i in range(10)]
    source = _LoadOnly(TensorSource(ids, images, torch.arange(10) % 2))
    data = UnlearnData(source, ("s0", "s1"), tuple(ids[2:]))
    batches = list(data.batches(ids[2:], batch_size=3))
    assert [b.shape[0] for b, _ in batches] == [3, 3, 2] and source.calls[-3:] == [3, 3, 2]
    assert torch.equal(torch.cat([b for b, _ in batches]), images[2:])
    assert data.labels_of(["s3", "s0"]).tolist() == [1, 0] and len(source.calls) == 3  # labels read no image
    rows = data.rows(ids[2:])
    assert rows.shape == (8, 1, 4, 4) and len(source.calls) == 4  # one sample read for the shape, no row yet
    assert torch.equal(rows[torch.tensor([5, 0])], images[[7, 2]]) and torch.equal(rows[1:3], images[3:5])
    data.tensors("forget")
    calls = len(source.calls)
    assert torch.equal(torch.cat([b for b, _ in data.batches(["s1", "s0"])]), images[[1, 0]])
    assert len(source.calls) == calls  # a cached part is served from memory


# --- training and statistics over rows -----------------------------------------------------------------


@pytest.mark.parametrize("augment", [False, True])
def test_fit_rows_gives_the_weights_of_fit(prob, augment):
    from tmu_core.models import build_model

    ids = list(prob.train_ids)
    cfg = replace(TrainConfig(**{**prob.meta.recipe, "epochs": 2}), augment=augment, seed=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        first = build_model("small_cnn", 4, 3, 8, prob.meta.mean, prob.meta.std)
    second = build_model("small_cnn", 4, 3, 8, prob.meta.mean, prob.meta.std)
    second.load_state_dict(first.state_dict())
    history = fit(first, prob.source.load(ids), prob.source.labels(ids), cfg, DEVICE)
    data = UnlearnData(prob.source, (), tuple(ids))
    accuracy = fit_rows(second, data.rows(ids), data.labels_of(ids), cfg, DEVICE)
    assert state_equal(first, second)
    assert accuracy == pytest.approx(history.train_acc[-1])


def test_pixel_stats_match_channel_stats_and_ignore_the_batch_size(prob):
    ids = list(prob.train_ids)
    data = UnlearnData(prob.source, (), tuple(ids))
    by_7, by_256 = pixel_stats(data.batches(ids, 7)), pixel_stats(data.batches(ids, 256))
    assert by_7 == by_256
    expected = channel_stats(prob.source.load(ids))
    for got, want in zip(by_7, expected):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                                   rtol=1e-12, atol=0.0)
    with pytest.raises(InvalidInputError, match="zero images"):
        pixel_stats(iter(()))


# --- DF's nearest-neighbour search ---------------------------------------------------------------------


def test_distance_blocks_follow_the_sizes_and_the_feature_width():
    budget = 1 << 20
    for n_query, n_reference, dim in ((100, 50_000, 128), (5_000, 50_000, 128), (5_000, 50_000, 2048), (3, 2, 64)):
        q, r = distance_chunks(n_query, n_reference, dim, budget)
        assert 1 <= q <= n_query and 1 <= r <= n_reference
        assert 2 * q * r + (q + r) * (dim + 2) <= budget
    assert distance_chunks(100, 50_000, 128, budget)[0] == 100  # a small query side is taken whole
    assert distance_chunks(5_000, 50_000, 2048, budget)[0] < distance_chunks(5_000, 50_000, 128, budget)[0]
    assert distance_chunks(3, 2, 64, budget) == (3, 2)


def test_distance_feature_stays_within_its_block_budget(monkeypatch):
    budget, dim = 40_000, 16
    monkeypatch.setattr(features_module, "DISTANCE_BLOCK_FLOATS", budget, raising=False)
    blocks = []
    real_cdist = torch.cdist

    def recording_cdist(a, b, *args, **kwargs):
        blocks.append((a.shape[0], b.shape[0]))
        return real_cdist(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "cdist", recording_cdist)
    gen = generator(4)
    query, reference = torch.randn(300, dim, generator=gen), torch.randn(2_000, dim, generator=gen)
    got = distance_feature(query, torch.zeros(300), reference, torch.zeros(2_000), top_n=5)
    assert len(blocks) > 1
    assert all(2 * q * r + (q + r) * (dim + 2) <= budget for q, r in blocks)
    monkeypatch.setattr(torch, "cdist", real_cdist)
    torch.testing.assert_close(got, torch.cdist(query, reference).sort(dim=1).values[:, :5])
