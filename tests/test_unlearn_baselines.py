"""The baseline methods on the tiny synthetic problem: they run, never touch the input, and are seeded."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from test_unlearn_tmu import problem
from test_unlearn_support import state_equal
from tmu_core.errors import InvalidInputError
from tmu_core.unlearn import UnlearnData, get_method
from tmu_core.unlearn.baselines import random_wrong_labels, recipe_config
from tmu_core.unlearn.common import copy_model, correct_of, losses_of, model_hash
from tmu_core.unlearn.salun import saliency_mask
from tmu_core.device import generator

DEVICE = torch.device("cpu")
QUICK = {
    "retrain": {"epochs": 3},
    "finetune": {"epochs": 1},
    "neg_grad": {"epochs": 2},
    "random_label": {"epochs": 1},
    "bad_teacher": {},
    "fisher": {"samples": 64},
    "scrub": {"epochs": 1, "max_epochs": 1},
    "neg_grad_plus": {"epochs": 2},
    "salun": {"epochs": 1},
    "l1_sparse": {"epochs": 1},
}


@pytest.fixture(scope="module")
def prob():
    return problem()


def _forget_accuracy(model, data):
    images, labels = data.tensors("forget")
    return 100.0 * correct_of(model, images, labels, DEVICE).float().mean().item()


def _retain_accuracy(model, data):
    images, labels = data.load(data.retain_ids)
    return 100.0 * correct_of(model, images, labels, DEVICE).float().mean().item()


def _forget_loss(model, data):
    images, labels = data.tensors("forget")
    return losses_of(model, images, labels, DEVICE).mean().item()


@pytest.mark.parametrize("name", sorted(QUICK))
def test_baseline_runs_and_leaves_the_input_alone(prob, name):
    data = prob.data(prob.forget_ids(0, 12))
    before = model_hash(prob.model)
    outcome = get_method(name, **QUICK[name]).unlearn(prob.model, prob.meta, data, DEVICE, None)
    assert model_hash(prob.model) == before
    assert outcome.model is not prob.model and outcome.predicted_hard_ids is None
    assert outcome.seconds > 0 and isinstance(outcome.details, dict)
    assert not state_equal(outcome.model, prob.model)


@pytest.mark.parametrize("name", ["neg_grad", "bad_teacher", "fisher", "finetune", "scrub", "neg_grad_plus", "salun",
                                  "l1_sparse"])
def test_baseline_same_seed_same_weights(prob, name):
    data = prob.data(prob.forget_ids(1, 10))
    first, second = (get_method(name, **QUICK[name]).unlearn(prob.model, prob.meta, data, DEVICE, None)
                     for _ in range(2))
    assert state_equal(first.model, second.model)
    other = get_method(name, **{**QUICK[name], "seed": 7}).unlearn(prob.model, prob.meta, data, DEVICE, None)
    assert not state_equal(first.model, other.model)


def test_neg_grad_lowers_forget_accuracy(prob):
    data = prob.data(prob.forget_ids(2, 20))
    outcome = get_method("neg_grad", epochs=5, retain_weight=0.0).unlearn(prob.model, prob.meta, data, DEVICE, None)
    assert _forget_accuracy(outcome.model, data) < _forget_accuracy(prob.model, data)


def test_scrub_max_steps_move_the_student_away_from_the_teacher_on_the_forget_set(prob):
    data = prob.data(prob.forget_ids(2, 20))
    images, _ = data.tensors("forget")
    with torch.no_grad():
        teacher = torch.softmax(prob.model.eval()(images.float() / 255), dim=1)

    def gap(outcome):
        with torch.no_grad():
            student = torch.softmax(outcome.model(images.float() / 255), dim=1)
        return (student - teacher).abs().sum(dim=1).mean().item()

    min_only = get_method("scrub", epochs=1, max_epochs=0).unlearn(prob.model, prob.meta, data, DEVICE, None)
    with_max = get_method("scrub", epochs=1, max_epochs=1, lr=0.01).unlearn(prob.model, prob.meta, data, DEVICE,
                                                                          None)
    assert with_max.details["max_steps"] > 0 and min_only.details["max_steps"] == 0
    assert gap(with_max) > gap(min_only)


def test_retrain_follows_the_recipe_and_its_seed(prob):
    data = prob.data(prob.forget_ids(3, 10))
    first = get_method("retrain", epochs=2, seed=3).unlearn(prob.model, prob.meta, data, DEVICE, None)
    second = get_method("retrain", epochs=2, seed=3).unlearn(prob.model, prob.meta, data, DEVICE, None)
    assert state_equal(first.model, second.model)
    assert first.details["epochs"] == 2 and first.details["seed"] == 3


def test_recipe_is_required_for_recipe_methods(prob):
    data = prob.data(prob.forget_ids(0, 5))
    with pytest.raises(InvalidInputError, match="meta.recipe"):
        get_method("finetune").unlearn(prob.model, None, data, DEVICE, None)
    assert recipe_config(prob.meta).epochs == prob.meta.recipe["epochs"]


def test_random_wrong_labels_never_keep_the_true_label():
    labels = torch.arange(10).repeat(20)
    wrong = random_wrong_labels(labels, 10, generator(0))
    assert bool((wrong != labels).all()) and int(wrong.min()) >= 0 and int(wrong.max()) <= 9
    with pytest.raises(InvalidInputError, match="at least 2 classes"):
        random_wrong_labels(labels, 1, generator(0))


# --- neg_grad_plus, salun, l1_sparse --------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), [
    ("neg_grad_plus", {"beta": 0.7, "lr": 0.05, "epochs": 20, "forget_batch": 10}),
    ("salun", {"lr": 0.05, "epochs": 10}),
    ("l1_sparse", {"gamma": 0.005, "lr": 0.05, "epochs": 10}),
])
def test_stronger_baselines_forget_and_keep_the_retained_set(prob, name, options):
    data = prob.data(prob.forget_ids(2, 20))
    assert _forget_accuracy(prob.model, data) == 100.0 and _retain_accuracy(prob.model, data) == 100.0
    outcome = get_method(name, **options).unlearn(prob.model, prob.meta, data, DEVICE, None)
    assert _forget_accuracy(outcome.model, data) < _forget_accuracy(prob.model, data)
    assert _retain_accuracy(outcome.model, data) >= 95.0
    assert outcome.details["steps"] > 0
    json.dumps(outcome.details)


def test_neg_grad_plus_cap_bounds_the_ascent(prob):
    data = prob.data(prob.forget_ids(2, 20))
    options = {"beta": 0.3, "lr": 0.05, "epochs": 10}
    capped = get_method("neg_grad_plus", **options).unlearn(prob.model, prob.meta, data, DEVICE, None)
    free = get_method("neg_grad_plus", **options, ascent_cap=None).unlearn(prob.model, prob.meta, data, DEVICE, None)
    assert capped.details["capped_samples"] > 0 and free.details["capped_samples"] == 0
    assert capped.details["ascent_cap_nats"] == pytest.approx(math.log(4)) and free.details["ascent_cap_nats"] is None
    assert _forget_loss(capped.model, data) < 0.5 * _forget_loss(free.model, data)
    assert _retain_accuracy(capped.model, data) >= _retain_accuracy(free.model, data)


def test_salun_moves_only_the_salient_weights(prob):
    data = prob.data(prob.forget_ids(2, 20))
    images, labels = data.tensors("forget")
    masks = saliency_mask(copy_model(prob.model, DEVICE), images, labels, 0.3, DEVICE)
    outcome = get_method("salun", mask_fraction=0.3, lr=0.05, epochs=3).unlearn(prob.model, prob.meta, data, DEVICE,
                                                                                None)
    total = sum(mask.numel() for mask in masks)
    assert outcome.details["masked_weights"] == sum(int(mask.sum()) for mask in masks) == round(0.3 * total)
    changed = 0
    for before, after, mask in zip(prob.model.parameters(), outcome.model.parameters(), masks):
        assert torch.equal(after.detach()[~mask], before.detach()[~mask])  # bit-identical outside the mask
        changed += int((after.detach()[mask] != before.detach()[mask]).sum())
    assert changed > 0.5 * outcome.details["masked_weights"]


def test_saliency_mask_ranks_globally_by_gradient_size(prob):
    data = prob.data(prob.forget_ids(2, 20))
    images, labels = data.tensors("forget")
    model = copy_model(prob.model, DEVICE)
    masks = saliency_mask(model, images, labels, 0.1, DEVICE)
    assert all(p.grad is None for p in model.parameters())
    torch.nn.functional.cross_entropy(model(images.float() / 255), labels, reduction="sum").backward()
    grads = [p.grad.abs() for p in model.parameters()]
    inside = torch.cat([g[m] for g, m in zip(grads, masks)])
    outside = torch.cat([g[~m] for g, m in zip(grads, masks)])
    assert float(inside.min()) >= float(outside.max()) - 1e-6
    assert sum(int(m.sum()) for m in masks) == round(0.1 * sum(m.numel() for m in masks))


def test_l1_sparse_ends_sparser_than_plain_finetuning(prob):
    data = prob.data(prob.forget_ids(2, 20))
    sparse = get_method("l1_sparse", gamma=0.005, lr=0.05, epochs=4, seed=3).unlearn(prob.model, prob.meta, data,
                                                                                   DEVICE, None)
    plain = get_method("l1_sparse", gamma=0.0, lr=0.05, epochs=4, seed=3).unlearn(prob.model, prob.meta, data,
                                                                                 DEVICE, None)
    assert sparse.details["l1_before"] == plain.details["l1_before"]
    assert sparse.details["l1_after"] < 0.9 * plain.details["l1_after"]
    assert _forget_loss(sparse.model, data) > _forget_loss(plain.model, data)
    assert _retain_accuracy(sparse.model, data) >= 95.0


@pytest.mark.parametrize("name", ["neg_grad_plus", "salun"])
def test_stronger_baselines_take_a_single_forget_sample(prob, name):
    data = prob.data(prob.forget_ids(2, 1))
    outcome = get_method(name, epochs=1).unlearn(prob.model, prob.meta, data, DEVICE, None)
    assert outcome.details["steps"] == 1 and not state_equal(outcome.model, prob.model)


@pytest.mark.parametrize(("name", "part"), [("neg_grad_plus", "retain"), ("salun", "retain"), ("l1_sparse", "retain"),
                                            ("neg_grad_plus", "forget"), ("salun", "forget")])
def test_stronger_baselines_refuse_an_empty_set(prob, name, part):
    forget = () if part == "forget" else prob.forget_ids(0, 5)
    retain = () if part == "retain" else prob.train_ids
    data = UnlearnData(prob.source, forget, retain, prob.twin_ids)
    with pytest.raises(InvalidInputError, match=f"the {part} set is empty"):
        get_method(name, **QUICK[name]).unlearn(prob.model, prob.meta, data, DEVICE, None)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("neg_grad_plus", {"beta": 1.5}, "neg_grad_plus: beta must be >= 0.0 and <= 1.0, got 1.5"),
        ("neg_grad_plus", {"beta": -0.1}, "neg_grad_plus: beta must be >= 0.0 and <= 1.0, got -0.1"),
        ("neg_grad_plus", {"ascent_cap": 0.0}, "neg_grad_plus: ascent_cap must be > 0.0, got 0.0"),
        ("neg_grad_plus", {"epochs": 0}, "neg_grad_plus: epochs must be >= 1, got 0"),
        ("neg_grad_plus", {"retain_batch": 1}, "neg_grad_plus: retain_batch must be >= 2, got 1"),
        ("neg_grad_plus", {"lr": 0.0}, "neg_grad_plus: lr must be > 0.0, got 0.0"),
        ("salun", {"mask_fraction": 0.0}, "salun: mask_fraction must be > 0.0 and <= 1.0, got 0.0"),
        ("salun", {"mask_fraction": 1.2}, "salun: mask_fraction must be > 0.0 and <= 1.0, got 1.2"),
        ("salun", {"forget_batch": 0}, "salun: forget_batch must be >= 1, got 0"),
        ("salun", {"seed": -1}, "salun: seed must be >= 0, got -1"),
        ("l1_sparse", {"gamma": -1e-4}, "l1_sparse: gamma must be >= 0.0, got -0.0001"),
        ("l1_sparse", {"batch_size": 1}, "l1_sparse: batch_size must be >= 2, got 1"),
        ("l1_sparse", {"epochs": 0}, "l1_sparse: epochs must be >= 1, got 0"),
    ],
)
def test_stronger_baselines_reject_bad_options(name, options, message):
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        get_method(name, **options)


def test_stronger_baselines_name_their_valid_options():
    with pytest.raises(InvalidInputError, match=r"unknown option\(s\) fraction for method 'salun'.*mask_fraction"):
        get_method("salun", fraction=0.5)
