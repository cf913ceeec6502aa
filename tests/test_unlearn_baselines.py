"""The baseline methods on the tiny synthetic problem: they run, never touch the input, and are seeded."""

from __future__ import annotations

import pytest
import torch

from test_unlearn_tmu import problem
from test_unlearn_support import state_equal
from tmu_core.errors import InvalidInputError
from tmu_core.unlearn import get_method
from tmu_core.unlearn.baselines import random_wrong_labels, recipe_config
from tmu_core.unlearn.common import correct_of, model_hash
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
}


@pytest.fixture(scope="module")
def prob():
    return problem()


def _forget_accuracy(model, data):
    images, labels = data.tensors("forget")
    return 100.0 * correct_of(model, images, labels, DEVICE).float().mean().item()


@pytest.mark.parametrize("name", sorted(QUICK))
def test_baseline_runs_and_leaves_the_input_alone(prob, name):
    data = prob.data(prob.forget_ids(0, 12))
    before = model_hash(prob.model)
    outcome = get_method(name, **QUICK[name]).unlearn(prob.model, prob.meta, data, DEVICE, None)
    assert model_hash(prob.model) == before
    assert outcome.model is not prob.model and outcome.predicted_hard_ids is None
    assert outcome.seconds > 0 and isinstance(outcome.details, dict)
    assert not state_equal(outcome.model, prob.model)


@pytest.mark.parametrize("name", ["neg_grad", "bad_teacher", "fisher", "finetune", "scrub"])
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
