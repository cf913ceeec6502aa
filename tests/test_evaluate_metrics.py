"""Metric functions on constructed tensors: known answers by construction, not by recorded output."""

from __future__ import annotations

import math

import pytest
import torch

from tmu_core.device import generator
from tmu_core.errors import InvalidInputError
from tmu_core.evaluate.metrics import (
    accuracy,
    activation_distance,
    correct_mask,
    delta,
    generalization_label_accuracy,
    loss_threshold_attack,
    sample_losses,
)


def _one_hot_logits(predicted: list[int], num_classes: int = 4, scale: float = 10.0) -> torch.Tensor:
    return scale * torch.nn.functional.one_hot(torch.tensor(predicted), num_classes).float()


def test_accuracy_counts_argmax_matches():
    logits = _one_hot_logits([0, 1, 2, 3])
    labels = torch.tensor([0, 1, 0, 0])
    assert correct_mask(logits, labels).tolist() == [True, True, False, False]
    assert accuracy(logits, labels) == pytest.approx(50.0)


def test_accuracy_rejects_mismatched_shapes():
    with pytest.raises(InvalidInputError, match="labels must be"):
        accuracy(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="logits must be"):
        accuracy(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="at least one sample"):
        accuracy(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))


def test_delta_is_absolute_gap():
    assert delta(90.0, 86.0) == pytest.approx(4.0)
    assert delta(10.0, 86.0) == pytest.approx(76.0)
    assert delta(50.0, 50.0) == 0.0


def test_activation_distance_of_a_model_to_itself_is_zero():
    logits = torch.randn(32, 10, generator=generator(0))
    assert activation_distance(logits, logits.clone()) == pytest.approx(0.0, abs=1e-7)


def test_activation_distance_of_opposite_confident_predictions_is_sqrt2():
    # Two near one-hot softmax outputs on different classes are sqrt(2) apart.
    first = _one_hot_logits([0, 1], scale=50.0)
    second = _one_hot_logits([1, 0], scale=50.0)
    assert activation_distance(first, second) == pytest.approx(math.sqrt(2.0), rel=1e-4)


def test_activation_distance_ignores_a_constant_shift_of_logits():
    logits = torch.randn(8, 5, generator=generator(1))
    assert activation_distance(logits, logits + 3.0) == pytest.approx(0.0, abs=1e-6)


def test_activation_distance_rejects_shape_mismatch():
    with pytest.raises(InvalidInputError, match="same shape"):
        activation_distance(torch.zeros(4, 3), torch.zeros(4, 2))


def test_attack_separates_low_loss_members_from_high_loss_nonmembers():
    g = generator(2)
    members = torch.rand(200, generator=g) * 0.1  # losses in [0, 0.1)
    nonmembers = 1.0 + torch.rand(500, generator=g)  # losses in [1, 2)
    result = loss_threshold_attack(members, nonmembers, alpha=0.5)
    assert result.success_rate == pytest.approx(100.0)
    assert result.false_positive_rate == pytest.approx(50.0, abs=1.0)
    assert 1.0 <= result.threshold < 2.0


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.5])
def test_attack_on_identical_distributions_succeeds_at_about_alpha(alpha):
    g = generator(3)
    members = torch.rand(20000, generator=g).exp()
    nonmembers = torch.rand(20000, generator=g).exp()
    result = loss_threshold_attack(members, nonmembers, alpha=alpha)
    assert result.success_rate == pytest.approx(100.0 * alpha, abs=1.5)
    assert result.false_positive_rate == pytest.approx(100.0 * alpha, abs=0.5)


def test_attack_on_members_with_higher_loss_than_nonmembers_fails():
    members = torch.full((50,), 5.0)
    nonmembers = torch.linspace(0.0, 1.0, 101)
    assert loss_threshold_attack(members, nonmembers, alpha=0.5).success_rate == 0.0


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.2, 1.5])
def test_attack_rejects_alpha_outside_open_unit_interval(alpha):
    with pytest.raises(InvalidInputError, match="alpha must be in"):
        loss_threshold_attack(torch.ones(3), torch.ones(3), alpha=alpha)


def test_attack_rejects_empty_losses():
    with pytest.raises(InvalidInputError, match="nonmember_losses"):
        loss_threshold_attack(torch.ones(3), torch.ones(0))


def test_sample_losses_are_low_for_confident_correct_and_high_for_confident_wrong():
    logits = _one_hot_logits([0, 1], scale=20.0)
    losses = sample_losses(logits, torch.tensor([0, 0]))
    assert losses[0].item() < 1e-6
    assert losses[1].item() == pytest.approx(20.0, rel=1e-3)


def test_generalization_label_accuracy_compares_easy_with_gold_correct():
    gold_correct = torch.tensor([True, True, False, False])
    # Perfect predictor: hard exactly where gold is wrong.
    assert generalization_label_accuracy(~gold_correct, gold_correct) == pytest.approx(100.0)
    # Calling everything hard is right only on the gold's mistakes.
    assert generalization_label_accuracy(torch.ones(4, dtype=torch.bool), gold_correct) == pytest.approx(50.0)
    predicted_hard = torch.tensor([False, True, True, True])
    assert generalization_label_accuracy(predicted_hard, gold_correct) == pytest.approx(75.0)


def test_generalization_label_accuracy_rejects_length_mismatch():
    with pytest.raises(InvalidInputError, match="same length"):
        generalization_label_accuracy(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
