"""Run an evaluation protocol end to end: original, gold and floor models, every method, every metric.

For each seed: train (or read from the cache) the original model on all training ids; prepare each method
once for it (timed apart from the requests). For each experiment (a forget class, or a random or owner draw;
see the protocol's forget shape): take the forget ids, train (or read) the gold model on D_r and a second gold
with another seed (the floor), run each method's forget request and score every model against the gold. Gold
and floor models are cached under the fingerprint of D_r, so each forget set has its own. The index is only
read: the run works on ids.

With ``mia="lira"`` each seed also trains (or reads) ``lira_shadows`` shadow models after the original, on
complementary random halves of the training set and the eval split (:mod:`tmu_core.evaluate.lira`); they are
run once, and every row then gets the LiRA test of D_f against as many eval-split samples. The shadows see half
of the eval split so that the non-members have IN statistics too; the models under test never see it.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tmu_core.evaluate.cache import TrainedModel, open_index, open_wide_index, trained_model
from tmu_core.evaluate.lira import ShadowStats, fit_shadow_stats, shadow_membership, shadow_seeds
from tmu_core.evaluate.metrics import accuracy
from tmu_core.evaluate.protocols import MethodSpec, Protocol
from tmu_core.evaluate.report import write_outputs
from tmu_core.evaluate.results import (MethodResult, OriginalSummary, ProtocolResult, ShadowSummary, SplitSummary,
                                       mean_rows)
from tmu_core.evaluate.scoring import (
    EvalTensors,
    ForgetSet,
    MemorySource,
    Outputs,
    RowInfo,
    Scores,
    hard_mask,
    lira_targets,
    make_forget_set,
    make_row,
    model_outputs,
    population_confidence,
    score,
)
from tmu_core.evaluate.splits import ForgetDraw, TestSplit, draw_forget_sets, split_test
from tmu_core.unlearn import UnlearnData, UnlearnMethod, get_method

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Run:
    protocol: Protocol
    source: MemorySource
    split: TestSplit
    draws: Mapping[int, tuple[ForgetDraw, ...]]
    tensors: EvalTensors
    device: torch.device
    cache_dir: Path
    workdir: Path
    bar: Any


@dataclass(frozen=True)
class _Prepared:
    spec: MethodSpec
    method: UnlearnMethod
    seconds: float
    workdir: Path


def _timed(device: torch.device, fn: Any, *args: Any) -> tuple[Any, float]:
    """Call ``fn(*args)`` and return its result and wall time, waiting for queued CUDA work to finish."""
    started = time.perf_counter()
    value = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - started


def _step(run: _Run, text: str) -> None:
    run.bar.set_description(text)
    logger.info("%s", text)


def _outputs(run: _Run, model: torch.nn.Module) -> Outputs:
    return model_outputs(model, run.source, run.tensors, run.device, run.protocol.eval_batch_size)


def _train(run: _Run, ids: tuple[str, ...], seed: int, role: str) -> TrainedModel:
    cfg = replace(run.protocol.train, seed=seed)
    model = trained_model(run.source, ids, run.protocol.arch, cfg, run.protocol.source, run.cache_dir,
                          run.device, role)
    run.bar.update(1)
    return model


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", label)


def _prepare_methods(run: _Run, original: TrainedModel, seed: int) -> list[_Prepared]:
    """Prepare every method once for this original model (per model version, independent of D_f)."""
    train_ids = run.tensors.train_ids
    data = UnlearnData(run.source, (), train_ids, run.split.twin_ids)
    prepared = []
    for spec in run.protocol.methods:
        _step(run, f"seed {seed}: prepare {spec.label}")
        method = get_method(spec.name, **dict(spec.options))
        workdir = run.workdir / f"seed{seed}" / _safe(spec.label)
        workdir.mkdir(parents=True, exist_ok=True)
        _, seconds = _timed(run.device, method.prepare, original.model, original.meta, data, run.device, workdir)
        prepared.append(_Prepared(spec, method, seconds, workdir))
        run.bar.update(1)
    return prepared


def _compact(details: Mapping[str, Any]) -> dict[str, Any]:
    """Keep numbers, strings and short lists of what a method reports (results.json stays readable)."""
    kept: dict[str, Any] = {}
    for key, value in details.items():
        if isinstance(value, (bool, int, float, str)) or value is None:
            kept[key] = value
        elif isinstance(value, (list, tuple)) and len(value) <= 20:
            kept[key] = list(value)
        elif isinstance(value, Mapping):
            kept[key] = _compact(value)
    return kept


def _reference_rows(run: _Run, forget_set: ForgetSet, original: TrainedModel, original_scores: Scores,
                    gold: TrainedModel, gold_scores: Scores) -> Iterator[MethodResult]:
    yield make_row(RowInfo("original", "original", original.seconds), original_scores, gold_scores, forget_set)
    yield make_row(RowInfo("gold", "gold", gold.seconds), gold_scores, gold_scores, forget_set)
    yield _floor_row(run, forget_set, gold_scores)


def _floor_row(run: _Run, forget_set: ForgetSet, gold_scores: Scores) -> MethodResult:
    """Train (or read) the gold of ``forget_set`` with another seed and score it against the gold: the floor."""
    floor_seed = forget_set.seed + run.protocol.floor_seed_offset
    _step(run, f"seed {forget_set.seed} {forget_set.title}: floor gold (seed {floor_seed})")
    floor = _train(run, forget_set.retain_ids, floor_seed, "floor")
    floor_scores = score(_outputs(run, floor.model), run.tensors, forget_set, run.protocol.mia_alpha)
    # Predicting "hard" where the floor gold errs measures how far two golds agree per sample.
    info = RowInfo("gold-floor", "floor", floor.seconds, predicted_hard=~floor_scores.forget_correct,
                   details={"seed": floor_seed})
    return make_row(info, floor_scores, gold_scores, forget_set)


def _is_gold_retrain(run: _Run, spec: MethodSpec, seed: int) -> bool:
    """``retrain`` with the protocol's recipe and seed trains exactly the gold model (same ids, recipe, seed)."""
    if spec.name != "retrain":
        return False
    options = dict(spec.options)
    return options.get("seed") in (None, seed) and options.get("epochs") in (None, run.protocol.train.epochs)


def _method_row(run: _Run, item: _Prepared, original: TrainedModel, data: UnlearnData, forget_set: ForgetSet,
                gold: tuple[TrainedModel, Scores]) -> MethodResult:
    _step(run, f"seed {forget_set.seed} {forget_set.title}: {item.spec.label}")
    gold_model, gold_scores = gold
    if _is_gold_retrain(run, item.spec, forget_set.seed):
        # Training it again would repeat the gold's run; its cost is the gold's measured training time.
        run.bar.update(1)
        info = RowInfo(item.spec.label, "method", gold_model.seconds, item.seconds,
                       details={"same_run_as": "gold", "gold_cached": gold_model.cached})
        return make_row(info, gold_scores, gold_scores, forget_set)
    outcome, seconds = _timed(run.device, item.method.unlearn, original.model, original.meta, data, run.device,
                              item.workdir)
    scores = score(_outputs(run, outcome.model), run.tensors, forget_set, run.protocol.mia_alpha)
    hard = None
    if outcome.predicted_hard_ids is not None:
        hard = hard_mask(forget_set.forget_ids, outcome.predicted_hard_ids)
    details = {"reported_seconds": outcome.seconds, **_compact(outcome.details)}
    info = RowInfo(item.spec.label, "method", seconds, item.seconds, hard, details)
    run.bar.update(1)
    return make_row(info, scores, gold_scores, forget_set)


def _shadows(run: _Run, seed: int) -> tuple[ShadowStats, ShadowSummary]:
    """Train (or read) the seed's LiRA shadows, run each once, and fit every sample's IN and OUT Gaussians."""
    population = (*run.tensors.train_ids, *run.tensors.eval_ids)  # the order of population_confidence
    count = run.protocol.lira_shadows
    membership = shadow_membership(len(population), count, seed)
    phis, cached, seconds = [], 0, 0.0
    for shadow, (inside, shadow_seed) in enumerate(zip(membership.tolist(), shadow_seeds(seed, count))):
        _step(run, f"seed {seed}: LiRA shadow {shadow + 1}/{count}")
        ids = tuple(sample for sample, member in zip(population, inside) if member)
        trained = _train(run, ids, shadow_seed, "shadow")
        phis.append(population_confidence(_outputs(run, trained.model), run.tensors))
        cached, seconds = cached + trained.cached, seconds + trained.seconds
    phi = torch.stack(phis)  # (S, P)
    if not bool(torch.isfinite(phi).all()):
        logger.warning("seed=%d: LiRA shadows gave NaN or infinite outputs; the LiRA numbers are not meaningful", seed)
    stats = fit_shadow_stats(phi, membership)
    return stats, ShadowSummary(count, cached, seconds, stats.per_example_variance)


def _seed_shadows(run: _Run, seed: int) -> tuple[ShadowStats | None, ShadowSummary | None]:
    """The seed's shadow statistics and summary when the protocol runs the LiRA test; ``(None, None)`` otherwise."""
    if run.protocol.mia != "lira":
        return None, None
    return _shadows(run, seed)


def _with_lira(run: _Run, forget_set: ForgetSet, shadows: ShadowStats | None) -> ForgetSet:
    """``forget_set`` with its LiRA targets, so that ``score`` runs the test on every model; unchanged without it."""
    if shadows is None:
        return forget_set
    return replace(forget_set, lira=lira_targets(shadows, run.tensors, forget_set.forget_rows, forget_set.seed))


def _shadow_steps(protocol: Protocol) -> int:
    """Progress-bar steps of one seed's shadows."""
    return protocol.lira_shadows if protocol.mia == "lira" else 0


def _run_forget_set(run: _Run, seed: int, draw: ForgetDraw, original: TrainedModel, original_outputs: Outputs,
                    prepared: list[_Prepared], shadows: ShadowStats | None) -> list[MethodResult]:
    protocol = run.protocol
    forget_set = make_forget_set(run.tensors, seed, draw.forget_class, draw.name, draw.forget_ids, draw.details)
    forget_set = _with_lira(run, forget_set, shadows)
    _step(run, f"seed {seed} {forget_set.title}: gold")
    gold = _train(run, forget_set.retain_ids, seed, "gold")
    gold_scores = score(_outputs(run, gold.model), run.tensors, forget_set, protocol.mia_alpha)
    original_scores = score(original_outputs, run.tensors, forget_set, protocol.mia_alpha)
    rows = list(_reference_rows(run, forget_set, original, original_scores, gold, gold_scores))
    data = UnlearnData(run.source, forget_set.forget_ids, forget_set.retain_ids, run.split.twin_ids)
    for item in prepared:
        rows.append(_method_row(run, item, original, data, forget_set, (gold, gold_scores)))
    return rows


def _original(run: _Run, seed: int) -> tuple[TrainedModel, Outputs, OriginalSummary, ShadowStats | None]:
    """Train (or read) the seed's original model and, with the LiRA test, its shadows; summarise its fit."""
    _step(run, f"seed {seed}: original model")
    original = _train(run, run.tensors.train_ids, seed, "original")
    original_outputs = _outputs(run, original.model)
    stats, shadow_summary = _seed_shadows(run, seed)
    summary = OriginalSummary(
        seed=seed,
        train_accuracy=accuracy(original_outputs.train_logits, run.tensors.train_labels),
        eval_accuracy=accuracy(original_outputs.eval_logits, run.tensors.eval_labels),
        seconds=original.seconds,
        cached=original.cached,
        checkpoint=str(original.path),
        shadows=shadow_summary,
    )
    if summary.train_accuracy < 95.0:
        logger.warning("original model seed=%d fits only %.1f%% of its training set (target >= 95%%); "
                       "forgetting is barely measurable below that", seed, summary.train_accuracy)
    return original, original_outputs, summary, stats


def _run_seed(run: _Run, seed: int) -> tuple[OriginalSummary, list[MethodResult]]:
    original, original_outputs, summary, stats = _original(run, seed)
    prepared = _prepare_methods(run, original, seed)
    rows = []
    for draw in run.draws[seed]:
        rows += _run_forget_set(run, seed, draw, original, original_outputs, prepared, stats)
    return summary, rows


def _tensors(source: MemorySource, split: TestSplit, wide: tuple[torch.Tensor, torch.Tensor] | None) -> EvalTensors:
    train_ids = tuple(source.ids("train"))
    return EvalTensors(train_ids, split.eval_ids, source.labels(train_ids), source.labels(split.eval_ids),
                       *(wide or (None, None)))


def _wide_set(protocol: Protocol, cache_dir: Path, split: TestSplit, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of every test image of the zip but the twin part, read as the protocol's models read."""
    preprocess = protocol.source.preprocess(channels)
    with open_wide_index(protocol.source, cache_dir) as wide:
        twin = set(split.twin_ids)
        ids = [sample for sample in wide.ids("test") if sample not in twin]
        reader = wide if preprocess is None else wide.view(preprocess)
        return reader.load(ids), torch.as_tensor(wide.labels(ids), dtype=torch.long).cpu()


def _draws(protocol: Protocol, index: Any, seed: int) -> tuple[ForgetDraw, ...]:
    """The forget sets of one seed in the protocol's shape (fails before any training when they do not fit)."""
    return draw_forget_sets(index, protocol.forget_shape, seed, classes=protocol.forget_classes,
                            size=protocol.forget_size, fraction=protocol.forget_fraction, owners=protocol.owners,
                            experiments=protocol.experiment_count)


def _steps(protocol: Protocol) -> int:
    per_class = 2 + len(protocol.methods)
    return len(protocol.seeds) * (1 + _shadow_steps(protocol) + len(protocol.methods)
                                  + protocol.experiment_count * per_class)


def _forget_size(draws: Mapping[int, tuple[ForgetDraw, ...]]) -> int:
    """Samples per forget set, averaged (rounded) over all of them where they differ (owner shape)."""
    sizes = [len(draw.forget_ids) for seed_draws in draws.values() for draw in seed_draws]
    return round(sum(sizes) / len(sizes))


@contextmanager
def open_run(protocol: Protocol, cache_dir: Path, device: torch.device,
             draws: Callable[[Any, int], tuple[ForgetDraw, ...]], steps: int, progress: bool) -> Iterator[_Run]:
    """Open the index, draw every seed's forget sets (before any training, so bad sizes fail fast), load the
    training set and the test split into memory and show a progress bar of ``steps``; clean up on exit."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    index = open_index(protocol.source, cache_dir)
    workdir = Path(tempfile.mkdtemp(prefix="evaluate-", dir=cache_dir))
    try:
        seed_draws = {seed: draws(index, seed) for seed in protocol.seeds}
        split = split_test(index, protocol.twin_fraction, protocol.split_seed)
        channels = index.image_shape[0] if index.image_shape else 3
        preprocess = protocol.source.preprocess(channels)
        reader = index if preprocess is None else index.view(preprocess)
        source = MemorySource(reader, [*index.ids("train"), *split.twin_ids, *split.eval_ids])
        wide = _wide_set(protocol, cache_dir, split, channels) if protocol.wide_test else None
        with tqdm(total=steps, disable=not progress, unit="step") as bar:
            yield _Run(protocol, source, split, seed_draws, _tensors(source, split, wide), device, cache_dir, workdir,
                       bar)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        index.close()


def split_summary(run: _Run, forget: int) -> SplitSummary:
    """The sizes of a run's splits, with ``forget`` the size of its forget sets."""
    wide = run.tensors.wide_labels
    return SplitSummary(len(run.tensors.train_ids), len(run.split.twin_ids), len(run.split.eval_ids), forget,
                        0 if wide is None else int(wide.numel()))


def run_protocol(protocol: Protocol, out_dir: Path, device: torch.device, cache_dir: Path | None = None,
                 progress: bool = True) -> ProtocolResult:
    """Run ``protocol`` and write ``results.json``, ``results.csv``, ``results.png`` and ``results.txt``.

    Args:
        protocol: what to run.
        out_dir: folder for the result files (created).
        device: where to train, unlearn and score.
        cache_dir: folder for the index and trained models shared between runs (default ``out_dir/cache``).
        progress: show a progress bar on stderr.

    Returns:
        The per-experiment rows, the mean rows, the original models' fit and the paths of the written files.

    Raises:
        InvalidInputError: the data is missing, a forget set (class, size, fraction, owners) does not fit the
            data, or a method rejects its options.
    """
    started = time.perf_counter()
    with open_run(protocol, cache_dir if cache_dir is not None else Path(out_dir) / "cache", device,
                  lambda index, seed: _draws(protocol, index, seed), _steps(protocol), progress) as run:
        results = [_run_seed(run, seed) for seed in protocol.seeds]
    rows = tuple(row for _, seed_rows in results for row in seed_rows)
    result = ProtocolResult(
        protocol=protocol.to_dict(),
        device=str(device),
        splits=split_summary(run, _forget_size(run.draws)),
        originals=tuple(summary for summary, _ in results),
        rows=rows,
        means=mean_rows(rows),
        wall_seconds=time.perf_counter() - started,
    )
    return write_outputs(result, Path(out_dir))
