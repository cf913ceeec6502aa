"""Frozen result types of an evaluation run, and the averaging of per-experiment rows into mean rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ROW_KINDS = ("original", "gold", "floor", "method")


@dataclass(frozen=True)
class MethodResult:
    """One row of the table: one model scored against the gold model of one forget set.

    Attributes:
        method: row label (``"original"``, ``"gold"``, ``"gold-floor"`` or a method variant such as ``"tmu"``).
        kind: one of ``original``, ``gold``, ``floor`` (the gold retrained with another seed), ``method``.
        forget_class: the class the forget set was drawn from; ``None`` on a mean row and for the forget shapes
            whose sets span classes (``random``, ``owner``).
        class_name: that class's name, the experiment's name for those shapes (``random-1%-0``, ``owner-0``),
            or ``"mean"``.
        seed: the seed of the original model and of the forget-set draw; ``None`` on a mean row.
        acc_dtest: accuracy (%) on the eval split of the test set, which no method ever sees.
        acc_df: accuracy (%) on the forget set D_f.
        delta: ``|acc_df - gold acc_df|`` in points.
        ad: activation distance to the gold model on D_f (mean L2 between softmax outputs).
        asr: membership-attack success rate (%) on D_f, threshold calibrated on the eval split.
        gold_asr: the same attack's success rate against the gold model on D_f.
        acc_dr: accuracy (%) on the retained training set D_r.
        acc_gl: accuracy (%) of the method's easy/hard predictions against the gold's correctness on D_f;
            ``None`` for models that predict no such labels. On the floor row: how often the two golds agree.
        seconds: wall time of the unlearning request, or of the training for original/gold/floor rows.
        prepare_seconds: wall time of the method's per-model preparation (not part of ``seconds``).
        lira_auc: ROC AUC in ``[0, 1]`` of the per-example LiRA test telling D_f from as many eval-split samples
            (0.5: D_f looks as unseen as those); ``None`` unless the run used ``mia="lira"``.
        lira_tpr1: that test's true-positive rate (%) at 1% false-positive rate (coarse on a few hundred samples).
        lira_tpr5: its true-positive rate (%) at 5% false-positive rate.
        lira_gap: ``|lira_auc - gold lira_auc|`` on the same forget set (0 on the gold row).
        acc_wide: accuracy (%) on every test image of the source but the twin part (``wide_test``), else None.
        runs: how many (seed, experiment) rows a mean row averages; 1 otherwise.
        details: what the method reported about itself (JSON-compatible).
    """

    method: str
    kind: str
    forget_class: int | None
    class_name: str
    seed: int | None
    acc_dtest: float
    acc_df: float
    delta: float
    ad: float
    asr: float
    gold_asr: float
    acc_dr: float
    acc_gl: float | None
    seconds: float
    prepare_seconds: float | None = None
    lira_auc: float | None = None
    lira_tpr1: float | None = None
    lira_tpr5: float | None = None
    lira_gap: float | None = None
    acc_wide: float | None = None
    runs: int = 1
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ShadowSummary:
    """The LiRA shadow models of one seed: how many, how many came from the cache, what they cost.

    Attributes:
        count: shadow models (complementary pairs over the training set and the eval split).
        cached: how many of them this run read from the cache.
        seconds: their summed training wall time (as first measured, also when read from the cache).
        per_example_variance: whether the fit gave each sample its own variances (else one per IN/OUT side).
    """

    count: int
    cached: int
    seconds: float
    per_example_variance: bool


@dataclass(frozen=True)
class OriginalSummary:
    """The original model of one seed: how well it fits its training set, and what it cost.

    Attributes:
        seed: training seed.
        train_accuracy: accuracy (%) on the full training set (the fit the protocol asks for, >= ~95%).
        eval_accuracy: accuracy (%) on the eval split.
        seconds: training wall time (the time it took when first trained, also when read from the cache).
        cached: whether this run read it from the cache.
        checkpoint: path of the cached checkpoint.
        shadows: the seed's LiRA shadow models; ``None`` unless the run used ``mia="lira"``.
    """

    seed: int
    train_accuracy: float
    eval_accuracy: float
    seconds: float
    cached: bool
    checkpoint: str
    shadows: ShadowSummary | None = None


@dataclass(frozen=True)
class SplitSummary:
    """Sizes of the splits a run used (the forget set size is per experiment, averaged where sizes differ; ``wide``
    is the ``wide_test`` set's, 0 without it)."""

    train: int
    twin: int
    eval: int
    forget: int
    wide: int = 0


@dataclass(frozen=True)
class ProtocolResult:
    """Everything one protocol run measured.

    Attributes:
        protocol: the protocol, as JSON-compatible data.
        device: the device the run used.
        splits: split sizes.
        originals: one summary per seed.
        rows: one row per (seed, experiment, model), in run order.
        means: one row per model label, averaged over all (seed, experiment) rows.
        wall_seconds: wall time of the whole run.
        files: names of the written files (``json``, ``csv``, ``png``) mapped to their paths.
    """

    protocol: Mapping[str, Any]
    device: str
    splits: SplitSummary
    originals: tuple[OriginalSummary, ...]
    rows: tuple[MethodResult, ...]
    means: tuple[MethodResult, ...]
    wall_seconds: float
    files: Mapping[str, str] = field(default_factory=dict)


_AVERAGED = ("acc_dtest", "acc_df", "delta", "ad", "asr", "gold_asr", "acc_dr", "seconds")
# Averaged over the rows that have them; None when none has.
_AVERAGED_OPTIONAL = ("acc_gl", "prepare_seconds", "lira_auc", "lira_tpr1", "lira_tpr5", "lira_gap", "acc_wide")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def mean_rows(rows: Sequence[MethodResult]) -> tuple[MethodResult, ...]:
    """Average rows with the same label over all (seed, experiment) pairs, keeping first-seen order.

    Args:
        rows: per-experiment rows.

    Returns:
        One mean row per label with ``forget_class=None``, ``class_name="mean"`` and ``runs`` set.
    """
    groups: dict[str, list[MethodResult]] = {}
    for row in rows:
        groups.setdefault(row.method, []).append(row)
    means = []
    for label, group in groups.items():
        values = {name: _mean([getattr(row, name) for row in group]) for name in _AVERAGED}
        for name in _AVERAGED_OPTIONAL:
            present = [getattr(row, name) for row in group if getattr(row, name) is not None]
            values[name] = _mean(present) if present else None
        means.append(
            MethodResult(
                method=label,
                kind=group[0].kind,
                forget_class=None,
                class_name="mean",
                seed=None,
                runs=len(group),
                **values,
            )
        )
    return tuple(means)
