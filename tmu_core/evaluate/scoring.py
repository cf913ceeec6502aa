"""Score models on one forget set: logits once per model, then every metric from tensor slices.

A run keeps all training and eval-split images in memory (:class:`MemorySource`), so each model is run once
over D_r + D_f and once over the eval split; D_f and D_r are row subsets of the training logits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

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
    """Labels of the training set and of the eval split, in the order the logits are computed."""

    train_ids: tuple[str, ...]
    eval_ids: tuple[str, ...]
    train_labels: torch.Tensor
    eval_labels: torch.Tensor


@dataclass(frozen=True)
class Outputs:
    """A model's logits on the whole training set and on the eval split (CPU tensors)."""

    train_logits: torch.Tensor
    eval_logits: torch.Tensor


@dataclass(frozen=True)
class ForgetSet:
    """One forget experiment: the forget ids and their rows among the training ids.

    ``forget_class`` is ``None`` and ``class_name`` the experiment's name (``random-1%-0``, ``owner-0``) for the
    forget shapes whose sets span classes; ``details`` describes such a draw and is added to every row.
    """

    seed: int
    forget_class: int | None
    class_name: str
    forget_ids: tuple[str, ...]
    retain_ids: tuple[str, ...]
    forget_rows: torch.Tensor
    retain_rows: torch.Tensor
    details: Mapping[str, Any] = field(default_factory=dict)

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
    """Run ``model`` once over the training set and the eval split."""
    train_logits = predict_logits(model, source.load(tensors.train_ids), device, batch_size)
    eval_logits = predict_logits(model, source.load(tensors.eval_ids), device, batch_size)
    return Outputs(train_logits, eval_logits)


def score(outputs: Outputs, tensors: EvalTensors, forget_set: ForgetSet, alpha: float) -> Scores:
    """Accuracies on the eval split, D_f and D_r, and the loss-threshold attack's success rate on D_f.

    The attack threshold is calibrated on this same model's losses on the eval split (non-members).
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
        details={**forget_set.details, **scores.details, **info.details},
    )
