"""Score models on one forget set: logits once per model, then every metric from tensor slices.

A run keeps all training and eval-split images in memory (:class:`MemorySource`), so each model is run once
over D_r + D_f and once over the eval split; D_f and D_r are row subsets of the training logits.

With the LiRA test (``Protocol.mia == "lira"``) the shadow models' population is the training set followed by the
eval split, in the order of :class:`EvalTensors`: :func:`population_confidence` gives a model's ``phi`` over it,
and a forget set's :class:`LiraTargets` name D_f and its non-members among those columns.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tmu_core.device import generator
from tmu_core.errors import InvalidInputError
from tmu_core.evaluate.lira import LiraResult, ShadowStats, likelihood_ratio, logit_confidence, membership_test
from tmu_core.evaluate.metrics import (
    accuracy,
    activation_distance,
    correct_mask,
    delta,
    generalization_label_accuracy,
    loss_threshold_attack,
    sample_losses,
)
from tmu_core.evaluate.results import MethodResult
from tmu_core.train import predict_logits

logger = logging.getLogger(__name__)


class MemorySource:
    """Decoded images and labels of some index ids, held in memory; a drop-in ``SampleSource``.

    Methods receive it as ``UnlearnData.index``: ``load`` and ``labels`` answer from memory; ``classes``,
    ``image_shape``, ``ids`` and ``fingerprint`` come from the index. It never changes the index.
    """

    def __init__(self, index: Any, ids: Sequence[str]) -> None:
        self.index = index
        self.classes = list(index.classes)
        self.image_shape = tuple(index.image_shape)
        self.preprocess = getattr(index, "preprocess", None)  # an IndexView's: recorded by the models trained here
        self._ids = list(ids)
        self._row = {sample: row for row, sample in enumerate(self._ids)}
        self._images = index.load(self._ids)  # (N, C, H, W) uint8
        self._labels = torch.as_tensor(index.labels(self._ids), dtype=torch.long).cpu()

    def rows(self, ids: Sequence[str]) -> torch.Tensor:
        """Row numbers of ``ids`` in memory.

        Raises:
            InvalidInputError: an id was not loaded.
        """
        missing = [sample for sample in ids if sample not in self._row]
        if missing:
            raise InvalidInputError(f"{len(missing)} id(s) are not in the evaluation set: {', '.join(missing[:5])}")
        return torch.tensor([self._row[sample] for sample in ids], dtype=torch.long)

    def load(self, ids: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """uint8 images (N, C, H, W) of ``ids`` in that order."""
        return self._images[self.rows(ids)].to(device)

    def labels(self, ids: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """int64 labels (N,) of ``ids`` in that order."""
        return self._labels[self.rows(ids)].to(device)

    def ids(self, split: str = "train", classes: list[int] | None = None) -> list[str]:
        """Live ids of the index (not only those in memory)."""
        return self.index.ids(split, classes=classes)

    def fingerprint(self, ids: Sequence[str]) -> str:
        """The index fingerprint of ``ids``."""
        return self.index.fingerprint(list(ids))


@dataclass(frozen=True)
class EvalTensors:
    """Labels of the training set and of the eval split, in the order the logits are computed; with
    ``wide_test``, the images and labels of the wide test set too."""

    train_ids: tuple[str, ...]
    eval_ids: tuple[str, ...]
    train_labels: torch.Tensor
    eval_labels: torch.Tensor
    wide_images: torch.Tensor | None = None
    wide_labels: torch.Tensor | None = None


@dataclass(frozen=True)
class Outputs:
    """A model's logits on the whole training set and on the eval split (CPU tensors), and its accuracy (%) on
    the wide test set when there is one."""

    train_logits: torch.Tensor
    eval_logits: torch.Tensor
    acc_wide: float | None = None


@dataclass(frozen=True)
class LiraTargets:
    """The samples one forget set's LiRA test ranks, and their shadow statistics.

    Attributes:
        member_rows: (N,) rows of D_f among the training logits (the members).
        nonmember_rows: (M,) rows of the non-members among the eval-split logits.
        stats: the shadow statistics of the members, then the non-members, in that order.
    """

    member_rows: torch.Tensor
    nonmember_rows: torch.Tensor
    stats: ShadowStats


@dataclass(frozen=True)
class ForgetSet:
    """One forget experiment: the forget ids and their rows among the training ids.

    ``forget_class`` is ``None`` and ``class_name`` the experiment's name (``random-1%-0``, ``owner-0``) for the
    forget shapes whose sets span classes; ``details`` describes such a draw and is added to every row.
    ``lira`` is set when the run scores every model with the LiRA test too.
    """

    seed: int
    forget_class: int | None
    class_name: str
    forget_ids: tuple[str, ...]
    retain_ids: tuple[str, ...]
    forget_rows: torch.Tensor
    retain_rows: torch.Tensor
    details: Mapping[str, Any] = field(default_factory=dict)
    lira: LiraTargets | None = None

    @property
    def title(self) -> str:
        """How logs and tables name the experiment: ``class 3 (cat)`` or ``random-1%-0``."""
        if self.forget_class is None:
            return self.class_name
        return f"class {self.forget_class} ({self.class_name})"


@dataclass(frozen=True)
class Scores:
    """What one model scores on one forget set, before comparing with the gold model."""

    acc_dtest: float
    acc_df: float
    acc_dr: float
    asr: float
    forget_logits: torch.Tensor
    forget_correct: torch.Tensor
    details: Mapping[str, Any] = field(default_factory=dict)
    lira: LiraResult | None = None
    acc_wide: float | None = None


def make_forget_set(tensors: EvalTensors, seed: int, forget_class: int | None, class_name: str,
                    forget_ids: Sequence[str], details: Mapping[str, Any] | None = None) -> ForgetSet:
    """Locate ``forget_ids`` among the training ids and derive D_r (the rest)."""
    forget = set(forget_ids)
    position = {sample: row for row, sample in enumerate(tensors.train_ids)}
    forget_rows = torch.tensor([position[sample] for sample in forget_ids], dtype=torch.long)
    retain = [sample for sample in tensors.train_ids if sample not in forget]
    retain_rows = torch.tensor([position[sample] for sample in retain], dtype=torch.long)
    return ForgetSet(seed, forget_class, class_name, tuple(forget_ids), tuple(retain), forget_rows, retain_rows,
                     dict(details or {}))


def model_outputs(model: nn.Module, source: MemorySource, tensors: EvalTensors, device: torch.device,
                  batch_size: int) -> Outputs:
    """Run ``model`` once over the training set and the eval split (and the wide test set, when there is one)."""
    train_logits = predict_logits(model, source.load(tensors.train_ids), device, batch_size)
    eval_logits = predict_logits(model, source.load(tensors.eval_ids), device, batch_size)
    acc_wide = None
    if tensors.wide_images is not None and tensors.wide_labels is not None:
        acc_wide = accuracy(predict_logits(model, tensors.wide_images, device, batch_size), tensors.wide_labels)
    return Outputs(train_logits, eval_logits, acc_wide)


def population_confidence(outputs: Outputs, tensors: EvalTensors) -> torch.Tensor:
    """(P,) a model's LiRA statistic over the shadows' population: the training set, then the eval split."""
    logits = torch.cat([outputs.train_logits, outputs.eval_logits])
    return logit_confidence(logits, torch.cat([tensors.train_labels, tensors.eval_labels]))


def lira_targets(stats: ShadowStats, tensors: EvalTensors, forget_rows: torch.Tensor, seed: int) -> LiraTargets:
    """D_f as members against as many eval-split samples as non-members (all of them when the split is smaller).

    The non-members are the first ones of a permutation of the eval split seeded with ``seed``, so every row of a
    forget set, and every forget set of a seed, ranks the same ones.

    Args:
        stats: the shadow statistics over the whole population (:func:`population_confidence`'s order).
        tensors: the run's ids and labels.
        forget_rows: (N,) rows of D_f among the training ids.
        seed: the protocol seed.
    """
    size = min(len(forget_rows), len(tensors.eval_ids))
    nonmember_rows = torch.randperm(len(tensors.eval_ids), generator=generator(seed))[:size]
    columns = torch.cat([forget_rows, len(tensors.train_ids) + nonmember_rows])
    return LiraTargets(forget_rows, nonmember_rows, stats.select(columns))


def lira_score(outputs: Outputs, tensors: EvalTensors, targets: LiraTargets) -> LiraResult:
    """The LiRA test of one model: its likelihood ratios on the members against those on the non-members."""
    members = logit_confidence(outputs.train_logits[targets.member_rows], tensors.train_labels[targets.member_rows])
    nonmembers = logit_confidence(outputs.eval_logits[targets.nonmember_rows],
                                  tensors.eval_labels[targets.nonmember_rows])
    ratios = likelihood_ratio(torch.cat([members, nonmembers]), targets.stats)
    return membership_test(ratios[: len(members)], ratios[len(members):])


def score(outputs: Outputs, tensors: EvalTensors, forget_set: ForgetSet, alpha: float) -> Scores:
    """Accuracies on the eval split, D_f and D_r, and the loss-threshold attack's success rate on D_f.

    The attack threshold is calibrated on this same model's losses on the eval split (non-members). When the
    forget set carries :class:`LiraTargets`, the LiRA test is run as well.
    """
    forget_logits = outputs.train_logits[forget_set.forget_rows]
    forget_labels = tensors.train_labels[forget_set.forget_rows]
    non_finite = int((~torch.isfinite(outputs.train_logits)).any(dim=1).sum()) + int(
        (~torch.isfinite(outputs.eval_logits)).any(dim=1).sum())
    if non_finite:
        logger.warning("%s seed=%d: %d sample(s) got NaN or infinite logits; their metrics are not meaningful",
                       forget_set.title, forget_set.seed, non_finite)
    attack = loss_threshold_attack(
        sample_losses(forget_logits, forget_labels), sample_losses(outputs.eval_logits, tensors.eval_labels), alpha
    )
    return Scores(
        acc_dtest=accuracy(outputs.eval_logits, tensors.eval_labels),
        acc_df=accuracy(forget_logits, forget_labels),
        acc_dr=accuracy(outputs.train_logits[forget_set.retain_rows], tensors.train_labels[forget_set.retain_rows]),
        asr=attack.success_rate,
        forget_logits=forget_logits,
        forget_correct=correct_mask(forget_logits, forget_labels),
        details={"mia_threshold": attack.threshold, "mia_false_positive_rate": attack.false_positive_rate,
                 "non_finite_outputs": non_finite},
        lira=lira_score(outputs, tensors, forget_set.lira) if forget_set.lira is not None else None,
        acc_wide=outputs.acc_wide,
    )


def hard_mask(forget_ids: Sequence[str], predicted_hard_ids: Sequence[str]) -> torch.Tensor:
    """(N,) bool over ``forget_ids``: ``True`` where the id was predicted hard."""
    hard = set(predicted_hard_ids)
    return torch.tensor([sample in hard for sample in forget_ids], dtype=torch.bool)


@dataclass(frozen=True)
class RowInfo:
    """What a row needs besides the scores: its label, kind, cost and optional easy/hard prediction."""

    label: str
    kind: str
    seconds: float
    prepare_seconds: float | None = None
    predicted_hard: torch.Tensor | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


def _lira_fields(scores: Scores, gold: Scores) -> dict[str, float | None]:
    """The row's LiRA numbers (all ``None`` without the test); the gap is the distance to the gold's AUC."""
    if scores.lira is None or gold.lira is None:
        return {}
    return {"lira_auc": scores.lira.auc, "lira_tpr1": scores.lira.tpr1, "lira_tpr5": scores.lira.tpr5,
            "lira_gap": abs(scores.lira.auc - gold.lira.auc)}


def make_row(info: RowInfo, scores: Scores, gold: Scores, forget_set: ForgetSet) -> MethodResult:
    """Compare a model's scores with the gold model's on the same forget set and build the table row."""
    acc_gl = None
    if info.predicted_hard is not None:
        acc_gl = generalization_label_accuracy(info.predicted_hard, gold.forget_correct)
    return MethodResult(
        method=info.label,
        kind=info.kind,
        forget_class=forget_set.forget_class,
        class_name=forget_set.class_name,
        seed=forget_set.seed,
        acc_dtest=scores.acc_dtest,
        acc_df=scores.acc_df,
        delta=delta(scores.acc_df, gold.acc_df),
        ad=activation_distance(scores.forget_logits, gold.forget_logits),
        asr=scores.asr,
        gold_asr=gold.asr,
        acc_dr=scores.acc_dr,
        acc_gl=acc_gl,
        seconds=info.seconds,
        prepare_seconds=info.prepare_seconds,
        **_lira_fields(scores, gold),
        acc_wide=scores.acc_wide,
        details={**forget_set.details, **scores.details, **info.details},
    )
