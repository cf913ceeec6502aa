"""Per-example membership test (LiRA): shadow models on complementary halves and a likelihood-ratio score.

The population attack of :mod:`tmu_core.evaluate.metrics` (attack P) calls a sample a member when the model's
loss on it is below one threshold shared by all samples, so easy samples look like members and hard ones do not,
whatever the model saw. LiRA (Carlini et al. 2022, "Membership inference attacks from first principles"), which
Hayes et al. (2024, "Inexact unlearning needs more careful evaluations") apply to unlearning, calibrates each
sample on its own: shadow models trained with and without it give the distribution of its score when IN and when
OUT, and a model under test is scored by how much likelier its output is under IN than under OUT.

- Shadows come in complementary pairs: pair ``i`` draws a random half of the population with its own seed
  (:func:`half_seed`); shadow ``2i`` trains on that half and shadow ``2i + 1`` on the rest, so every sample is IN
  for exactly half of the shadows and OUT for the other half.
- The statistic is the logit-scaled confidence of the true label, ``phi = log(p_y / (1 - p_y))``, computed from
  the logits as ``logit_y - logsumexp(other logits)``, so it stays exact where ``p_y`` rounds to 1.
- Each sample gets a Gaussian over its IN ``phi`` values and one over its OUT values: a mean per sample, and by
  default one variance per side shared by all samples (LiRA's "fixed variance" variant; the paper finds it better
  than a per-sample variance below about 64 shadows, where each side holds too few values for a variance of its
  own). From :data:`PER_EXAMPLE_VARIANCE_SHADOWS` shadows on, each sample gets its own variances.
- A model's score on a sample is ``log N(phi; mu_in, var_in) - log N(phi; mu_out, var_out)``: above 0 where the
  model looks like one that trained on it.
- The test ranks members against non-members by that score: the ROC AUC (0.5: no better than chance) and the true
  positive rate at 1% and 5% false-positive rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tmu_core.device import generator
from tmu_core.errors import InvalidInputError
from tmu_core.evaluate.metrics import _check_logits

MIA_KINDS = ("population", "lira")
MIN_SHADOWS = 4
PER_EXAMPLE_VARIANCE_SHADOWS = 64
TARGET_FPRS = (0.01, 0.05)
# A floor on fitted variances: shadows that agree exactly on a sample would otherwise give an infinite ratio.
_MIN_VARIANCE = 1e-6


def check_shadow_count(shadows: object) -> None:
    """Refuse a shadow count that cannot make complementary pairs with two IN and two OUT values per sample.

    Raises:
        InvalidInputError: ``shadows`` is not an even integer >= 4.
    """
    if isinstance(shadows, bool) or not isinstance(shadows, int) or shadows < MIN_SHADOWS or shadows % 2:
        raise InvalidInputError(
            f"lira_shadows must be an even integer >= {MIN_SHADOWS} (shadow models come in complementary pairs, "
            f"and each side needs two models per sample), got {shadows!r}")


def half_seed(seed: int, pair: int) -> int:
    """Seed of pair ``pair``'s random half for the protocol seed ``seed``: ``seed + 10000 * (pair + 1)``."""
    return seed + 10000 * (pair + 1)


def shadow_seeds(seed: int, shadows: int) -> tuple[int, ...]:
    """Training seed of each shadow: its pair's :func:`half_seed`, plus 1 for the complement's model."""
    return tuple(half_seed(seed, shadow // 2) + shadow % 2 for shadow in range(shadows))


def shadow_membership(population: int, shadows: int, seed: int) -> torch.Tensor:
    """Which samples each shadow trains on: complementary random halves, one pair at a time.

    Args:
        population: number of samples the shadows are drawn over.
        shadows: number of shadow models (an even integer >= 4).
        seed: the protocol seed; pair ``i`` draws its half with ``half_seed(seed, i)``.

    Returns:
        (shadows, population) bool tensor on the CPU, ``True`` where the shadow trains on the sample. Rows ``2i``
        and ``2i + 1`` are complements (``population // 2`` samples, then the rest), so every column holds
        ``shadows / 2`` ``True`` values.

    Raises:
        InvalidInputError: a bad shadow count, or fewer than 2 samples.
    """
    check_shadow_count(shadows)
    if population < 2:
        raise InvalidInputError(f"shadow models need a population of at least 2 samples, got {population}")
    rows = []
    for pair in range(shadows // 2):
        order = torch.randperm(population, generator=generator(half_seed(seed, pair)))
        half = torch.zeros(population, dtype=torch.bool)
        half[order[: population // 2]] = True
        rows += [half, ~half]
    return torch.stack(rows)


def logit_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """LiRA's statistic: the logit-scaled confidence ``log(p_y / (1 - p_y))`` of the true label.

    Args:
        logits: (N, K) class scores, K >= 2.
        labels: (N,) true class indices.

    Returns:
        (N,) float tensor ``logit_y - logsumexp(logits of the other classes)``, which equals the formula above
        without computing ``p_y`` (finite even where the softmax rounds ``p_y`` to 1).

    Raises:
        InvalidInputError: shapes do not match, there are no samples, or fewer than two classes.
    """
    _check_logits(logits, labels, "logit_confidence")
    if logits.shape[1] < 2:
        raise InvalidInputError(
            f"logit_confidence: needs at least 2 classes, got logits of shape {tuple(logits.shape)}")
    logits = logits.float()
    index = labels.to(logits.device).long().view(-1, 1)
    others = logits.scatter(1, index, float("-inf"))
    return logits.gather(1, index).squeeze(1) - torch.logsumexp(others, dim=1)


@dataclass(frozen=True)
class ShadowStats:
    """The Gaussians of ``phi`` per sample, when IN and when OUT, fitted over the shadow models.

    Attributes:
        mean_in: (P,) mean ``phi`` of each sample over the shadows that trained on it.
        mean_out: (P,) mean ``phi`` over the shadows that did not.
        var_in: (P,) variance when IN: one shared value repeated, or one per sample (``per_example_variance``).
        var_out: (P,) variance when OUT, likewise.
        per_example_variance: whether each sample has variances of its own.
        shadows: how many shadow models the fit used.
    """

    mean_in: torch.Tensor
    mean_out: torch.Tensor
    var_in: torch.Tensor
    var_out: torch.Tensor
    per_example_variance: bool
    shadows: int

    def select(self, columns: torch.Tensor) -> ShadowStats:
        """The statistics of the samples at ``columns`` (a (M,) long tensor), in that order."""
        return ShadowStats(self.mean_in[columns], self.mean_out[columns], self.var_in[columns],
                           self.var_out[columns], self.per_example_variance, self.shadows)


def _side(phi: torch.Tensor, mask: torch.Tensor, per_example: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(P,) means and variances of ``phi`` (S, P) over the shadows where ``mask`` holds."""
    weights = mask.float()
    counts = weights.sum(dim=0)  # (P,)
    means = (phi * weights).sum(dim=0) / counts
    squares = ((phi - means) ** 2 * weights).sum(dim=0)
    if per_example:
        variances = squares / (counts - 1)
    else:
        # Pooled within-sample variance: each sample's spread around its own mean, over all samples.
        variances = (squares.sum() / (counts - 1).sum()).expand_as(means)
    return means, variances.clamp_min(_MIN_VARIANCE)


def fit_shadow_stats(phi: torch.Tensor, membership: torch.Tensor,
                     per_example_variance: bool | None = None) -> ShadowStats:
    """Fit each sample's IN and OUT Gaussians to the shadows' ``phi``.

    Args:
        phi: (S, P) float, shadow ``s``'s :func:`logit_confidence` on sample ``p``.
        membership: (S, P) bool, ``True`` where shadow ``s`` trained on sample ``p`` (:func:`shadow_membership`).
        per_example_variance: one variance per sample and side; ``None`` chooses it from
            :data:`PER_EXAMPLE_VARIANCE_SHADOWS` shadows on, and a shared (fixed) variance below.

    Returns:
        Per-sample means and variances, on ``phi``'s device.

    Raises:
        InvalidInputError: the shapes differ, or a sample has fewer than 2 IN or 2 OUT shadows.
    """
    if phi.dim() != 2 or phi.shape != membership.shape:
        raise InvalidInputError(
            "fit_shadow_stats: expected phi and membership of the same (S, P) shape, "
            f"got {tuple(phi.shape)} and {tuple(membership.shape)}")
    membership = membership.to(phi.device).bool()
    fewest = int(min(membership.sum(dim=0).min(), (~membership).sum(dim=0).min()))
    if fewest < 2:
        raise InvalidInputError(
            f"fit_shadow_stats: every sample needs at least 2 IN and 2 OUT shadows, but one has {fewest}")
    shadows = phi.shape[0]
    if per_example_variance is None:
        per_example_variance = shadows >= PER_EXAMPLE_VARIANCE_SHADOWS
    phi = phi.float()
    mean_in, var_in = _side(phi, membership, per_example_variance)
    mean_out, var_out = _side(phi, ~membership, per_example_variance)
    return ShadowStats(mean_in, mean_out, var_in, var_out, per_example_variance, shadows)


def _log_normal(values: torch.Tensor, means: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    return -0.5 * (torch.log(2 * math.pi * variances) + (values - means) ** 2 / variances)


def likelihood_ratio(phi: torch.Tensor, stats: ShadowStats) -> torch.Tensor:
    """LiRA's score of a model: ``log N(phi; mu_in, var_in) - log N(phi; mu_out, var_out)`` per sample.

    Args:
        phi: (M,) the model's :func:`logit_confidence` on M samples.
        stats: those M samples' statistics, in the same order (``ShadowStats.select``).

    Returns:
        (M,) log likelihood ratios; higher means more member-like.

    Raises:
        InvalidInputError: ``phi`` is not (M,) with M matching the statistics.
    """
    if phi.dim() != 1 or phi.shape != stats.mean_in.shape:
        raise InvalidInputError(
            f"likelihood_ratio: expected phi of shape {tuple(stats.mean_in.shape)} to match the shadow "
            f"statistics, got {tuple(phi.shape)}")
    phi = phi.float().to(stats.mean_in.device)
    return _log_normal(phi, stats.mean_in, stats.var_in) - _log_normal(phi, stats.mean_out, stats.var_out)


@dataclass(frozen=True)
class LiraResult:
    """How well LiRA's score tells members from non-members for one model.

    Attributes:
        auc: ROC AUC in ``[0, 1]``; 0.5 is chance (the model looks as if it saw the members no more than the
            non-members), 1 separates them perfectly. NaN when a score is not finite.
        tpr1: true-positive rate (%) at 1% false-positive rate.
        tpr5: true-positive rate (%) at 5% false-positive rate.
        members: number of members ranked.
        nonmembers: number of non-members ranked.
    """

    auc: float
    tpr1: float
    tpr5: float
    members: int
    nonmembers: int


def membership_test(member_scores: torch.Tensor, nonmember_scores: torch.Tensor) -> LiraResult:
    """ROC AUC and TPR at :data:`TARGET_FPRS` of scores where members should rank above non-members.

    The TPR at a target FPR is the highest TPR of any threshold whose FPR is at most the target (no
    interpolation between ROC points), so it never credits an FPR the threshold does not reach. With M
    non-members the FPR moves in steps of 1/M: below 100 non-members TPR at 1% FPR is the TPR at 0 false
    positives, and with a few hundred it rests on two or three of them, so read it as coarse.

    Args:
        member_scores: (N,) scores of samples the model is asked about as members.
        nonmember_scores: (M,) scores of samples it never saw.

    Returns:
        AUC, TPR at 1% and 5% FPR (percent) and the counts; NaN rates when a score is NaN or infinite.

    Raises:
        InvalidInputError: a score tensor is empty or not 1-D.
    """
    from sklearn.metrics import roc_auc_score, roc_curve  # here, so importing tmu_core stays light

    for name, scores in (("member_scores", member_scores), ("nonmember_scores", nonmember_scores)):
        if scores.dim() != 1 or scores.numel() == 0:
            raise InvalidInputError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    counts = (member_scores.numel(), nonmember_scores.numel())
    scores = torch.cat([member_scores.float().cpu(), nonmember_scores.float().cpu()])
    if not bool(torch.isfinite(scores).all()):
        return LiraResult(math.nan, math.nan, math.nan, *counts)
    truth = [1] * counts[0] + [0] * counts[1]
    values = scores.double().numpy()
    fpr, tpr, _ = roc_curve(truth, values, drop_intermediate=False)
    rates = [100.0 * float(tpr[fpr <= target + 1e-12].max()) for target in TARGET_FPRS]
    return LiraResult(float(roc_auc_score(truth, values)), *rates, *counts)
