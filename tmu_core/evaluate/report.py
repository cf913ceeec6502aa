"""Render a :class:`ProtocolResult` as the paper-style text table, JSON, CSV and a PNG figure."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tmu_core.evaluate.results import MethodResult, ProtocolResult
from tmu_core.evaluate.splits import OWNER_MAX_SAMPLES

logger = logging.getLogger(__name__)

CSV_COLUMNS = (
    "method", "kind", "forget_class", "class_name", "seed", "acc_dtest", "acc_df", "delta", "ad",
    "asr", "gold_asr", "acc_dr", "acc_gl", "seconds", "prepare_seconds", "runs",
    "lira_auc", "lira_tpr1", "lira_tpr5", "lira_gap", "acc_wide",
)
_HEADER = (
    f"{'method':<26}{'ACC_Dtest':>10}{'ACC_Df':>8}{'Delta':>7}{'AD':>7}{'ASR':>7}{'ASRgold':>8}"
    f"{'ACC_Dr':>8}{'ACC_gl':>8}{'seconds':>9}{'prep_s':>8}"
)
_LIRA_HEADER = f"{'LiRA':>7}{'LiRAgap':>8}"
_WIDE_HEADER = f"{'ACC_wide':>9}"


def _opt(value: float | None, width: int, digits: int = 1) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def format_row(row: MethodResult, lira: bool = False, wide: bool = False) -> str:
    """One fixed-width table line for a row; ``lira`` adds its LiRA AUC and gap to the gold's AUC, ``wide`` its
    accuracy on the wide test set."""
    line = (
        f"{row.method:<26}{row.acc_dtest:>10.2f}{row.acc_df:>8.1f}{row.delta:>7.1f}{row.ad:>7.3f}"
        f"{row.asr:>7.1f}{row.gold_asr:>8.1f}{row.acc_dr:>8.1f}{_opt(row.acc_gl, 8)}"
        f"{row.seconds:>9.1f}{_opt(row.prepare_seconds, 8)}"
    )
    if lira:
        line += f"{_opt(row.lira_auc, 7, 3)}{_opt(row.lira_gap, 8, 3)}"
    if wide:
        line += _opt(row.acc_wide, 9, 2)
    return line


def _uses_lira(result: ProtocolResult) -> bool:
    """Whether the run scored the LiRA test (results written before it existed did not)."""
    return result.protocol.get("mia", "population") == "lira"


def _uses_wide(result: ProtocolResult) -> bool:
    """Whether the run scored the wide test set."""
    return bool(result.protocol.get("wide_test", False))


def _section(title: str, rows: Sequence[MethodResult], lira: bool, wide: bool) -> list[str]:
    header = _HEADER + (_LIRA_HEADER if lira else "") + (_WIDE_HEADER if wide else "")
    return [title, header, *(format_row(row, lira, wide) for row in rows), ""]


def _lira_lines(result: ProtocolResult) -> list[str]:
    """What the LiRA columns mean and what the shadows cost, when the run used the test."""
    if not _uses_lira(result):
        return []
    lines = [
        f"LiRA = AUC of the per-example likelihood-ratio test ({result.protocol['lira_shadows']} shadow models a "
        "seed) telling D_f from as many eval-split samples (0.5: D_f looks unseen); LiRAgap = |LiRA - gold LiRA|; "
        "TPR at 1% and 5% FPR in results.csv and results.json",
    ]
    for original in result.originals:
        shadows = original.shadows
        if shadows is not None:
            variance = "per-sample" if shadows.per_example_variance else "fixed"
            lines.append(f"LiRA shadows seed {original.seed}: {shadows.count} trained in {shadows.seconds:.0f} s "
                         f"({shadows.cached} cached), {variance} variance")
    return lines


def _forget_text(proto: Mapping[str, Any], forget: int) -> str:
    """What each experiment forgets, by forget shape (results written before shapes existed are ``class``)."""
    shape = proto.get("forget_shape", "class")
    experiments = proto.get("experiments") or len(proto["forget_classes"])
    if proto.get("sequential"):
        each = f"{proto['forget_fraction'] * 100:g}% of the training set" if shape == "random" else (
            f"{proto['owners']} owner(s) of a synthetic owner map")
        return (f"{proto['sequential']} sequential requests of {each} each, each on the previous request's model; "
                f"{forget} samples forgotten after the last")
    if shape == "random":
        return (f"forget {forget} random training samples ({proto['forget_fraction'] * 100:g}% of the training "
                f"set) in each of {experiments} experiment(s)")
    if shape == "owner":
        return (f"forget {proto['owners']} owner(s) of a synthetic owner map (1..{OWNER_MAX_SAMPLES} samples an "
                f"owner; {forget} samples on average) in each of {experiments} experiment(s)")
    return f"forget {forget} samples from each of classes {', '.join(str(c) for c in proto['forget_classes'])}"


def _preamble(result: ProtocolResult) -> list[str]:
    proto, splits = result.protocol, result.splits
    lines = [
        f"protocol {proto['name']}: arch {proto['arch']}, {_forget_text(proto, splits.forget)}, "
        f"seeds {', '.join(str(s) for s in proto['seeds'])}, "
        f"device {result.device}, wall {result.wall_seconds:.0f} s",
        f"splits: train {splits.train}; test split into twin {splits.twin} (only TMU's twin problem sees it) and "
        f"eval {splits.eval} (never seen by any method), split seed {proto.get('split_seed', 0)}",
        *([f"ACC_wide = accuracy on the {splits.wide} test images of the zip outside the twin part (the eval split "
           "among them): the same comparison with far less sampling noise"] if _uses_wide(result) else []),
        "ACC_Dtest = accuracy on the eval split; ASR = loss-threshold attack on D_f, threshold = "
        f"{proto['mia_alpha']:.2f}-quantile of the model's own losses on the eval split; ASRgold = same attack on the gold",
        "ACC_Df on the forget set; ACC_Dr on the retained training set; Delta = |ACC_Df - gold ACC_Df|; "
        "AD = mean L2 between softmax outputs and the gold's on D_f",
        "gold-floor = gold retrained with another seed (its Delta is the noise floor; its ACC_gl is the two golds' "
        "agreement on D_f correctness); seconds = request time (training time for original/gold rows), "
        "prep_s = per-model preparation",
    ]
    for original in result.originals:
        lines.append(
            f"original seed {original.seed}: train accuracy {original.train_accuracy:.1f}% "
            f"(target >= 95), eval accuracy {original.eval_accuracy:.2f}%, trained in {original.seconds:.0f} s"
            f"{' (cached)' if original.cached else ''}"
        )
    return lines + _lira_lines(result) + [""]


def _experiment_key(row: MethodResult) -> tuple[int | None, int | None, str]:
    """(seed, forget class, class or experiment name): one forget set of one seed."""
    return row.seed, row.forget_class, row.class_name


def _experiments(rows: Sequence[MethodResult]) -> dict[tuple[int | None, int | None, str], list[MethodResult]]:
    sections: dict[tuple[int | None, int | None, str], list[MethodResult]] = {}
    for row in rows:
        sections.setdefault(_experiment_key(row), []).append(row)
    return sections


def _section_title(forget_class: int | None, name: str, seed: int | None, rows: Sequence[MethodResult]) -> str:
    if forget_class is not None:
        return f"class {forget_class} ({name}), seed {seed}"
    details = rows[0].details
    spread = f"{details.get('forget_samples')} samples from {details.get('classes_spanned')} classes"
    return f"{name}: {spread}, seed {seed}"


def format_table(result: ProtocolResult) -> str:
    """The paper-style table: a section per (seed, experiment) and the mean over all of them.

    Args:
        result: a finished protocol run.

    Returns:
        Multi-line text, ready to print.
    """
    lines, lira, wide = _preamble(result), _uses_lira(result), _uses_wide(result)
    sections = _experiments(result.rows)
    for (seed, forget_class, name), rows in sections.items():
        lines += _section(_section_title(forget_class, name, seed, rows), rows, lira, wide)
    lines += _section(f"mean over {len(sections)} forget set(s)", list(result.means), lira, wide)
    return "\n".join(lines)


def _finite(value: Any) -> Any:
    """NaN and infinities become ``None`` (JSON has no literal for them); containers are walked."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_json(result: ProtocolResult, path: Path) -> None:
    """Write the whole result (protocol, splits, originals, rows, means) as indented, strict JSON.

    A metric that is not a finite number (for example the activation distance of a model whose logits
    went NaN) is written as ``null``.
    """
    data = _finite(asdict(result))
    path.write_text(json.dumps(data, indent=2, default=str, allow_nan=False) + "\n")


def write_csv(result: ProtocolResult, path: Path) -> None:
    """Write one CSV line per row and per mean row, with the columns of :data:`CSV_COLUMNS`."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in (*result.rows, *result.means):
            values = asdict(row)
            writer.writerow({name: "" if values[name] is None else values[name] for name in CSV_COLUMNS})


def _delta_panel(ax: Any, result: ProtocolResult, labels: list[str]) -> None:
    sets = sorted({_experiment_key(row) for row in result.rows}, key=str)
    width = 0.8 / (len(sets) + 1)
    for position, (seed, forget_class, class_name) in enumerate(sets):
        by_label = {r.method: r.delta for r in result.rows if _experiment_key(r) == (seed, forget_class, class_name)}
        xs = [i + position * width for i in range(len(labels))]
        ax.bar(xs, [by_label.get(label, 0.0) for label in labels], width, label=f"{class_name} (s{seed})")
    mean_delta = {row.method: row.delta for row in result.means}
    xs = [i + len(sets) * width for i in range(len(labels))]
    ax.bar(xs, [mean_delta[label] for label in labels], width, label="mean", color="black")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=40, ha="right")
    ax.set_ylabel("Delta = |ACC_Df - gold ACC_Df| (points)")
    spans = any(row.forget_class is None for row in result.rows)
    ax.set_title(f"Alignment gap per method and forget {'set' if spans else 'class'}")
    ax.legend(fontsize=7)


def _accuracy_panel(ax: Any, result: ProtocolResult, labels: list[str]) -> None:
    for label in labels:
        points = [(gold_acc(result, r), r.acc_df) for r in result.rows if r.method == label]
        ax.scatter([p[0] for p in points], [p[1] for p in points], label=label, s=30)
    ax.plot([0, 100], [0, 100], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("gold ACC_Df (%)")
    ax.set_ylabel("method ACC_Df (%)")
    ax.set_title("ACC_Df against the gold's (diagonal = aligned)")
    ax.legend(fontsize=7)


def write_figure(result: ProtocolResult, path: Path) -> None:
    """Two panels: Delta per method and forget class (with the floor), and ACC_Df of each method vs the gold's.

    Uses matplotlib's Agg backend, so it needs no display.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row.method for row in result.means if row.kind != "gold"]
    fig, (ax_delta, ax_acc) = plt.subplots(1, 2, figsize=(13, 5))
    _delta_panel(ax_delta, result, labels)
    _accuracy_panel(ax_acc, result, labels)
    fig.suptitle(f"protocol {result.protocol['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def gold_acc(result: ProtocolResult, row: MethodResult) -> float:
    """The gold model's ACC_Df for the forget set of ``row``."""
    for candidate in result.rows:
        if candidate.kind == "gold" and _experiment_key(candidate) == _experiment_key(row):
            return candidate.acc_df
    return float("nan")


def write_outputs(result: ProtocolResult, out_dir: Path) -> ProtocolResult:
    """Write ``results.json``, ``results.csv``, ``results.png`` and the table as ``results.txt`` into ``out_dir``.

    Returns:
        ``result`` with ``files`` set to the written paths by kind (``json``, ``csv``, ``png``, ``txt``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"results.{kind}" for kind in ("json", "csv", "png", "txt")}
    result = replace(result, files={kind: str(p) for kind, p in paths.items()})
    write_csv(result, paths["csv"])
    write_figure(result, paths["png"])
    write_json(result, paths["json"])
    paths["txt"].write_text(format_table(result) + "\n")
    logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return result
