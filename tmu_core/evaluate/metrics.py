"""Alignment metrics of an unlearned model against the gold model, as functions over tensors.

Conventions: accuracies, attack success rates and ``ACC_gl`` are percentages in ``[0, 100]`` (as in the
paper's tables); the activation distance is in the units of the softmax outputs (``[0, sqrt(2)]``).

The membership inference attack is the population loss-threshold attack of Ye et al. (2022), attack P:
the threshold is the ``alpha``-quantile of the model's loss on samples that are known non-members, so that
``alpha`` is the attack's false-positive rate on the non-member population; a sample is called a member
when its loss falls below the threshold. The attack success rate on the forget set is the fraction of its
samples called members.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tmu_core.errors import InvalidInputError


@dataclass(frozen=True)
class AttackResult:
    """Outcome of the loss-threshold membership inference attack.

    Attributes:
        threshold: loss below which a sample is called a member.
        success_rate: percentage of the target samples called members (the ASR).
        false_positive_rate: percentage of the calibration non-members called members (about ``alpha``).
        alpha: the quantile of the non-member losses used as the threshold.
    """

    threshold: float
    success_rate: float
    false_positive_rate: float
    alpha: float


def _check_logits(logits: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    if logits.dim() != 2:
        raise InvalidInputError(f"{what}: logits must be (N, K), got shape {tuple(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise InvalidInputError(
            f"{what}: labels must be (N,) with N = {logits.shape[0]} to match the logits, got shape {tuple(labels.shape)}"
        )
    if logits.shape[0] == 0:
        raise InvalidInputError(f"{what}: needs at least one sample, got 0")


def correct_mask(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Which samples the model classifies correctly.

    Args:
        logits: (N, K) class scores.
        labels: (N,) true class indices.

    Returns:
        (N,) bool tensor, ``True`` where the arg-max class equals the label.

    Raises:
        InvalidInputError: shapes do not match or there are no samples.
    """
    _check_logits(logits, labels, "correct_mask")
    return logits.argmax(dim=1) == labels.to(logits.device)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent.

    Args:
        logits: (N, K) class scores.
        labels: (N,) true class indices.

    Returns:
        Percentage of correctly classified samples.

    Raises:
        InvalidInputError: shapes do not match or there are no samples.
    """
    return 100.0 * correct_mask(logits, labels).float().mean().item()


def delta(acc_df: float, gold_acc_df: float) -> float:
    """The paper's alignment gap ``Delta = |ACC_Df - ACC_Df(gold)|`` (percentage points)."""
    return abs(float(acc_df) - float(gold_acc_df))


def activation_distance(logits: torch.Tensor, gold_logits: torch.Tensor) -> float:
    """Mean L2 distance between the softmax outputs of two models on the same samples (the paper's AD).

    Args:
        logits: (N, K) logits of the model under test.
        gold_logits: (N, K) logits of the gold model on the same samples, in the same order.

    Returns:
        The mean over samples of ``||softmax(logits) - softmax(gold_logits)||_2``; 0 for identical outputs.

    Raises:
        InvalidInputError: the two tensors differ in shape or are empty.
    """
    if logits.shape != gold_logits.shape or logits.dim() != 2 or logits.shape[0] == 0:
        raise InvalidInputError(
            "activation_distance: expected two non-empty (N, K) logits tensors of the same shape, "
            f"got {tuple(logits.shape)} and {tuple(gold_logits.shape)}"
        )
    probs = F.softmax(logits.float(), dim=1)
    gold_probs = F.softmax(gold_logits.float().to(logits.device), dim=1)
    return torch.linalg.vector_norm(probs - gold_probs, dim=1).mean().item()


def sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy losses.

    Args:
        logits: (N, K) class scores.
        labels: (N,) true class indices.

    Returns:
        (N,) float tensor of losses.

    Raises:
        InvalidInputError: shapes do not match or there are no samples.
    """
    _check_logits(logits, labels, "sample_losses")
    return F.cross_entropy(logits.float(), labels.to(logits.device), reduction="none")


def loss_threshold_attack(
    target_losses: torch.Tensor, nonmember_losses: torch.Tensor, alpha: float = 0.5
) -> AttackResult:
    """Population loss-threshold membership inference attack calibrated on non-members.

    Args:
        target_losses: (N,) losses of the samples whose membership is attacked (the forget set).
        nonmember_losses: (M,) losses of samples known not to be in the training set (the eval split).
        alpha: the non-member quantile used as the threshold, in ``(0, 1)``; it is the false-positive
            rate the attack accepts on non-members.

    Returns:
        The threshold, the success rate on the targets and the false-positive rate on the non-members.

    Raises:
        InvalidInputError: ``alpha`` is outside ``(0, 1)`` or a loss tensor is empty or not 1-D.
    """
    if not 0.0 < alpha < 1.0:
        raise InvalidInputError(f"alpha must be in (0, 1), got {alpha}")
    for name, losses in (("target_losses", target_losses), ("nonmember_losses", nonmember_losses)):
        if losses.dim() != 1 or losses.numel() == 0:
            raise InvalidInputError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(losses.shape)}")
    nonmember = nonmember_losses.float()
    threshold = torch.quantile(nonmember, alpha).item()
    success = (target_losses.float() < threshold).float().mean().item()
    false_positive = (nonmember < threshold).float().mean().item()
    return AttackResult(threshold, 100.0 * success, 100.0 * false_positive, alpha)


def generalization_label_accuracy(predicted_hard: torch.Tensor, gold_correct: torch.Tensor) -> float:
    """``ACC_gl``: how often a method's easy/hard prediction matches the gold model's correctness.

    A sample is "easy" when the gold model classifies it correctly and "hard" otherwise.

    Args:
        predicted_hard: (N,) bool, ``True`` where the method predicted "hard".
        gold_correct: (N,) bool, ``True`` where the gold model is correct, same sample order.

    Returns:
        Percentage of samples whose predicted label matches the gold label.

    Raises:
        InvalidInputError: the two masks differ in length or are empty.
    """
    if predicted_hard.dim() != 1 or predicted_hard.shape != gold_correct.shape or predicted_hard.numel() == 0:
        raise InvalidInputError(
            "generalization_label_accuracy: expected two non-empty (N,) masks of the same length, "
            f"got {tuple(predicted_hard.shape)} and {tuple(gold_correct.shape)}"
        )
    predicted_easy = ~predicted_hard.bool()
    return 100.0 * (predicted_easy == gold_correct.bool().to(predicted_easy.device)).float().mean().item()
