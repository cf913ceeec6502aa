"""K forget requests in a row, each applied to the previous request's model, scored against the gold of the union.

The service never unlearns twice from the same model: each forget job starts from the version the previous
one made, after that version's artifacts were prepared (``prepare_next``, an incremental update of TMU's
state from its parent's). This protocol does the same with the library alone, per method:

1. prepare the method for the original model (as for any protocol run);
2. for step k = 1..K: forget the k-th draw from the model of step k-1, then prepare the new model (TMU:
   ``prepare_from`` the parent's state; the other methods: ``prepare`` again), which the next step starts from.

After every step the model is scored against a gold model retrained without the union of steps 1..k (cached
by the fingerprint of its D_r), so Delta, ACC_Dtest and the attack drift are read per step (with ``mia="lira"``
the LiRA test too, of the union, against the seed's shadows). A second gold with
another seed (the floor) is trained every ``floor_every`` steps and at the last. The draws are the protocol's
forget shape with K experiments: disjoint owner batches, or random draws less what earlier steps forgot.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tmu_core.errors import InvalidInputError
from tmu_core.evaluate.harness import (
    _compact,
    _draws,
    _floor_row,
    _is_gold_retrain,
    _original,
    _outputs,
    _Run,
    _safe,
    _shadow_steps,
    _step,
    _timed,
    _train,
    _with_lira,
    open_run,
    split_summary,
)
from tmu_core.evaluate.lira import ShadowStats
from tmu_core.evaluate.protocols import MethodSpec, Protocol
from tmu_core.evaluate.report import format_table, write_outputs
from tmu_core.evaluate.results import MethodResult, OriginalSummary, ProtocolResult, mean_rows
from tmu_core.evaluate.scoring import ForgetSet, RowInfo, Scores, hard_mask, make_forget_set, make_row, score
from tmu_core.evaluate.splits import ForgetDraw
from tmu_core.unlearn import UnlearnData, get_method

SEQUENTIAL_SHAPES = ("random", "owner")


@dataclass(frozen=True)
class _Step:
    number: int
    ids: tuple[str, ...]  # forgotten by this request
    forget_set: ForgetSet  # the union of steps 1..number, and the D_r left after it
    gold: Scores


def union_steps(draws: Sequence[ForgetDraw]) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Each draw less what earlier draws took, and the union so far: ``[(step ids, union ids), ...]``.

    Raises:
        InvalidInputError: a draw adds nothing new (all of it was forgotten before).
    """
    seen: set[str] = set()
    steps = []
    for number, draw in enumerate(draws, start=1):
        new = tuple(sample for sample in draw.forget_ids if sample not in seen)
        if not new:
            raise InvalidInputError(f"sequential request {number} ({draw.name}) holds only samples forgotten before")
        seen.update(new)
        steps.append((new, tuple(sorted(seen))))
    return steps


def _check(protocol: Protocol, requests: int, floor_every: int) -> None:
    if protocol.forget_shape not in SEQUENTIAL_SHAPES:
        raise InvalidInputError(
            f"sequential requests are drawn as {' or '.join(SEQUENTIAL_SHAPES)} forget sets, not "
            f"{protocol.forget_shape}; accepted: --forget-shape {' or --forget-shape '.join(SEQUENTIAL_SHAPES)}")
    if requests < 1 or floor_every < 1:
        raise InvalidInputError(f"requests ({requests}) and floor_every ({floor_every}) must be at least 1")


def _gold_steps(run: _Run, seed: int, draws: Sequence[ForgetDraw], original_outputs: Any,
                floor_every: int, shadows: ShadowStats | None = None) -> tuple[list[_Step], list[MethodResult]]:
    """Train (or read) the gold of every union and the floors; rows of the original, gold and floor models."""
    protocol, rows, steps = run.protocol, [], []
    for number, (ids, union) in enumerate(union_steps(draws), start=1):
        details = {"step": number, "step_samples": len(ids), "union_samples": len(union),
                   **{k: v for k, v in draws[number - 1].details.items() if k in ("owners", "owner_sizes")}}
        forget_set = make_forget_set(run.tensors, seed, None, f"step-{number}", union, details)
        classes = len(set(run.tensors.train_labels[forget_set.forget_rows].tolist()))
        forget_set = replace(forget_set, details={**details, "forget_samples": len(union), "classes_spanned": classes})
        forget_set = _with_lira(run, forget_set, shadows)
        _step(run, f"seed {seed} step {number}: gold of {len(union)} forgotten")
        gold = _train(run, forget_set.retain_ids, seed, "gold")
        gold_scores = score(_outputs(run, gold.model), run.tensors, forget_set, protocol.mia_alpha)
        original_scores = score(original_outputs, run.tensors, forget_set, protocol.mia_alpha)
        rows.append(make_row(RowInfo("original", "original", 0.0), original_scores, gold_scores, forget_set))
        rows.append(make_row(RowInfo("gold", "gold", gold.seconds), gold_scores, gold_scores, forget_set))
        if number % floor_every == 0 or number == len(draws):
            rows.append(_floor_row(run, forget_set, gold_scores))
        steps.append(_Step(number, ids, forget_set, gold_scores))
    return steps, rows


def _prepare(run: _Run, method: Any, parent: Any, model: torch.nn.Module, meta: Any, data: UnlearnData,
             workdir: Path, origin: str) -> tuple[str, float]:
    """Prepare ``model``'s state as a forget job's ``prepare_next`` does: from the parent's when the method can
    (``parent`` None: built from scratch)."""
    if hasattr(method, "prepare_from"):
        return _timed(run.device, method.prepare_from, parent, model, meta, data, run.device, workdir, origin)
    _, seconds = _timed(run.device, method.prepare, model, meta, data, run.device, workdir)
    return "prepare", seconds


def _method_rows(run: _Run, spec: MethodSpec, original: Any, steps: Sequence[_Step],
                 gold_seconds: Mapping[int, float]) -> list[MethodResult]:
    """Apply the K requests one after another with one method; a row per step against that step's gold."""
    seed, twin_ids = steps[0].forget_set.seed, run.split.twin_ids
    if _is_gold_retrain(run, spec, seed):
        # Retraining each union with the gold's recipe and seed is the gold; its cost is the gold's time.
        return [make_row(RowInfo(spec.label, "method", gold_seconds[step.number], 0.0,
                                 details={"same_run_as": "gold"}), step.gold, step.gold, step.forget_set)
                for step in steps]
    method = get_method(spec.name, **dict(spec.options))
    workdir = run.workdir / f"seed{seed}" / f"sequential-{_safe(spec.label)}"
    workdir.mkdir(parents=True, exist_ok=True)
    model, meta = original.model, original.meta
    _step(run, f"seed {seed}: prepare {spec.label}")
    how, prepare_seconds = _prepare(run, method, None, model, meta,
                                    UnlearnData(run.source, (), run.tensors.train_ids, twin_ids), workdir, "original")
    rows = []
    for step in steps:
        _step(run, f"seed {seed} step {step.number}: {spec.label}")
        data = UnlearnData(run.source, step.ids, step.forget_set.retain_ids, twin_ids)
        outcome, seconds = _timed(run.device, method.unlearn, model, meta, data, run.device, workdir)
        model = outcome.model
        scores = score(_outputs(run, model), run.tensors, step.forget_set, run.protocol.mia_alpha)
        hard = None
        if outcome.predicted_hard_ids is not None:
            hard = hard_mask(step.forget_set.forget_ids, outcome.predicted_hard_ids)
        details = {"reported_seconds": outcome.seconds, **_compact(outcome.details), "prepared_before": how}
        rows.append(make_row(RowInfo(spec.label, "method", seconds, prepare_seconds, hard, details), scores,
                             step.gold, step.forget_set))
        run.bar.update(1)
        if step.number < len(steps):
            # The next request starts from this model, prepared for the D_r left after this step.
            parent = getattr(method, "prepared", None)
            how, prepare_seconds = _prepare(
                run, method, parent, model, meta, UnlearnData(run.source, (), step.forget_set.retain_ids, twin_ids),
                workdir, f"step-{step.number}")
    return rows


def _run_seed(run: _Run, seed: int, floor_every: int) -> tuple[OriginalSummary, list[MethodResult]]:
    original, outputs, summary, shadows = _original(run, seed)
    steps, rows = _gold_steps(run, seed, run.draws[seed], outputs, floor_every, shadows)
    gold_seconds = {row.details["step"]: row.seconds for row in rows if row.kind == "gold"}
    for spec in run.protocol.methods:
        rows += _method_rows(run, spec, original, steps, gold_seconds)
    return summary, rows


def run_sequential(protocol: Protocol, requests: int, out_dir: Path, device: torch.device,
                   cache_dir: Path | None = None, floor_every: int | None = None,
                   progress: bool = True) -> ProtocolResult:
    """Run ``requests`` forget requests in a row per method and seed; write the result files and the drift table.

    Args:
        protocol: the recipe; its forget shape (``random`` or ``owner``) draws each request.
        requests: K, the number of requests in a row.
        out_dir: folder for ``results.json/.csv/.png/.txt`` (the text starts with the drift table).
        device: where to train, unlearn and score.
        cache_dir: the model cache shared between runs (default ``out_dir/cache``).
        floor_every: train the floor gold every this many steps, and at the last (default: at the last only).
        progress: show a progress bar on stderr.

    Returns:
        One row per (seed, step, model); ``class_name`` is ``step-k`` and ``details["step"]`` k. Mean rows
        average the K steps.

    Raises:
        InvalidInputError: the class forget shape, K or floor_every below 1, or draws that do not fit the data.
    """
    floor_every = requests if floor_every is None else floor_every
    _check(protocol, requests, floor_every)
    protocol = replace(protocol, experiments=requests)
    started = time.perf_counter()
    floors = len({*range(floor_every, requests + 1, floor_every), requests})
    per_seed = 1 + _shadow_steps(protocol) + requests + floors + len(protocol.methods) * requests
    bar_steps = len(protocol.seeds) * per_seed
    with open_run(protocol, cache_dir if cache_dir is not None else Path(out_dir) / "cache", device,
                  lambda index, seed: _draws(protocol, index, seed), bar_steps, progress) as run:
        results = [_run_seed(run, seed, floor_every) for seed in protocol.seeds]
    rows = tuple(row for _, seed_rows in results for row in seed_rows)
    last = max(row.details["union_samples"] for row in rows)
    result = ProtocolResult(
        protocol={**protocol.to_dict(), "sequential": requests, "floor_every": floor_every},
        device=str(device),
        splits=split_summary(run, last),
        originals=tuple(summary for summary, _ in results),
        rows=rows,
        means=mean_rows(rows),
        wall_seconds=time.perf_counter() - started,
    )
    result = write_outputs(result, Path(out_dir))
    Path(result.files["txt"]).write_text(format_drift(result) + "\n\n" + format_table(result) + "\n")
    return result


def _by_step(rows: Sequence[MethodResult], seed: int) -> dict[int, dict[str, MethodResult]]:
    steps: dict[int, dict[str, MethodResult]] = {}
    for row in rows:
        if row.seed == seed:
            steps.setdefault(row.details["step"], {})[row.method] = row
    return steps


def format_drift(result: ProtocolResult) -> str:
    """Per seed: Delta on the union, ACC_Dtest's gap to the gold and the attack after each step, per method;
    then each method's total time over the K steps against the K retrains'."""
    labels = list(dict.fromkeys(row.method for row in result.rows if row.kind == "method"))
    lines = []
    for summary in result.originals:
        steps = _by_step(result.rows, summary.seed)
        lines.append(f"seed {summary.seed}: {len(steps)} sequential requests, Delta / ACC_Dtest - gold's / MIA "
                     f"on the union forgotten so far")
        lines.append(f"{'step':>4} {'n':>5} {'gold Dt':>7} {'floor':>6}  " + "  ".join(f"{label:>18}" for label in labels))
        for number, by_label in sorted(steps.items()):
            gold = by_label["gold"]
            floor = by_label.get("gold-floor")
            cells = []
            for label in labels:
                row = by_label.get(label)
                cells.append(" " * 18 if row is None else
                             f"{row.delta:5.1f} /{row.acc_dtest - gold.acc_dtest:+5.1f} /{row.asr:4.0f}")
            floor_text = f"{floor.delta:6.1f}" if floor is not None else " " * 6
            lines.append(f"{number:>4} {gold.details['union_samples']:>5} {gold.acc_dtest:7.1f} {floor_text}  "
                         + "  ".join(cells))
        retrains = sum(row.seconds for row in result.rows if row.seed == summary.seed and row.kind == "gold")
        lines.append(f"time over {len(steps)} requests (request + next preparation) against {len(steps)} "
                     f"retrains ({retrains:.0f} s):")
        for label in labels:
            mine = [row for row in result.rows if row.seed == summary.seed and row.method == label]
            spent = sum(row.seconds + (row.prepare_seconds or 0.0) for row in mine)
            lines.append(f"  {label:<24} {spent:8.1f} s  {100 * spent / retrains:5.1f}%")
    return "\n".join(lines)
