"""An exact retrain of a model on its retained samples, swapped in as a new ``exact`` version.

A ``retrain`` job (queued by the drift budget, :mod:`tmu_core.forget.drift`, or by ``tmu-admin retrain``) runs
in a job worker at low CPU priority: ``train`` -> ``evaluate`` -> ``save`` -> ``package`` -> ``register`` ->
``commit``, then the same forward steps as a forget job (:mod:`tmu_core.forget.commit`).

Training takes as long as the model's original training, so it does not hold the model's lock: forget requests
that arrive meanwhile are unlearned by their own jobs as usual (or, past the policy's ``hold_at``, wait for it).
``train`` trains a fresh network with the model's recorded recipe (``meta.recipe``) on the serving version's
membership at the round's start, less the samples of forget jobs still queued then (their jobs find nothing left to
unlearn once the exact version serves). Then the job takes
the model's lock and looks at what serves now: if any sample it trained on has been forgotten since (its pixels
may even have been wiped during the round), the round is thrown away and the next one trains without them. The
last round (``DriftPolicy.max_rounds``) trains holding the lock, so it cannot be overtaken. The version that lands
is trained on exactly its membership: the serving version's, with every sample forgotten before the commit out.

A failure or a killed worker before the commit leaves what serves as it was (the same undo as a forget job's).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

from tmu_core.config import Workspace
from tmu_core.errors import InvalidInputError
from tmu_core.forget import commit, undo
from tmu_core.forget.drift import exact_drift
from tmu_core.forget.pipeline import RETRAIN_STEPS, PipelineConfig, Saved, _forward, _package, _register, _Run
from tmu_core.state.jobs import Job
from tmu_core.state.store import StateStore
from tmu_core.state.versions import VersionRecord

logger = logging.getLogger(__name__)

NICE = 10  # a retrain yields the CPU to forget jobs and serving


@dataclass(frozen=True)
class Trained:
    """One round's outcome: the version it started from, the ids it trained on and the new network."""

    source: VersionRecord
    ids: tuple[str, ...]
    model: Any
    meta: Any
    details: dict[str, Any]


def _membership(run: _Run, index: Any, queued: bool = False) -> tuple[VersionRecord, tuple[str, ...]]:
    """The serving version and the ids a retrain of it trains on: its membership minus owed samples (and, with
    ``queued``, minus the samples of the model's queued forget jobs, which the exact version then covers)."""
    source = run.store.versions.require_serving(run.job.model)
    members = run.store.versions.members(run.job.model, source.version)
    trained = set(index.ids("train")) if members is None else members
    waiting: set[str] = set()
    if queued:
        for job in run.store.jobs.list(model=run.job.model, state="queued", limit=10_000):
            waiting.update(job.sample_ids)
    return source, tuple(sorted(trained - run.store.versions.owed(run.job.model) - waiting))


def _train(run: _Run) -> Trained:
    from tmu_core.preprocess import Preprocess
    from tmu_core.train import load_checkpoint
    from tmu_core.unlearn import UnlearnData, get_method
    from tmu_core.unlearn.baselines import recipe_config

    source, ids = _membership(run, run.index, queued=True)
    model, meta = load_checkpoint(source.checkpoint, run.device)
    try:
        recipe_config(meta)
    except InvalidInputError as err:
        raise InvalidInputError(f"model {run.job.model!r} v{source.version} records no training recipe to retrain "
                                f"with ({err}); an imported model needs one (tmu-admin train)") from err
    method = get_method("retrain", **run.job.options.get("method_options", {}))
    data = UnlearnData(run.index.view(Preprocess.from_meta(meta)), (), ids, ())
    outcome = method.unlearn(model, meta, data, run.device)
    return Trained(source, ids, outcome.model, meta, outcome.details)


def _stale(run: _Run, ids: tuple[str, ...]) -> set[str]:
    """Ids a round trained on that the model must not be trained on any more (forgotten since)."""
    _, now = _membership(run, run.index)
    return set(ids) - set(now)


def _evaluate(run: _Run, current: VersionRecord, trained: Trained) -> dict[str, Any]:
    """ACC on D_test (the jobs' eval split) of the version serving now and of the retrained network."""
    from tmu_core.evaluate.metrics import accuracy
    from tmu_core.forget.artifacts import plan_data
    from tmu_core.preprocess import Preprocess
    from tmu_core.train import load_checkpoint, predict_logits

    plan = plan_data(run.index, run.config.twin_fraction, run.config.seed, trained.ids)
    view = run.index.view(Preprocess.from_meta(trained.meta))
    images, labels = view.load(list(plan.eval_ids)), view.labels(list(plan.eval_ids))
    before, _ = load_checkpoint(current.checkpoint, run.device)
    return {"acc_test_before": accuracy(predict_logits(before, images, run.device), labels),
            "acc_test_after": accuracy(predict_logits(trained.model, images, run.device), labels),
            "test_size": len(plan.eval_ids), "trained_on": len(trained.ids)}


def _save(run: _Run, target: int, trained: Trained, rounds: int) -> Saved:
    from tmu_core.train import save_checkpoint
    from tmu_core.unlearn.baselines import recipe_config

    cfg = recipe_config(trained.meta)
    cfg = replace(cfg, seed=trained.details.get("seed", cfg.seed), epochs=trained.details.get("epochs", cfg.epochs))
    norm = {name: tuple(getattr(trained.model, name).flatten().tolist()) for name in ("mean", "std")
            if hasattr(trained.model, name)}  # the retrained network's own pixel statistics of D_r
    meta = replace(trained.meta, recipe={"retrain": {"job": run.job.id, "rounds": rounds}, "train": asdict(cfg)},
                   **norm,
                   index_fingerprint=run.index.fingerprint(list(trained.ids)), train_size=len(trained.ids),
                   parent=f"{run.job.model}:v{trained.source.version}",
                   created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    folder = run.workspace.version_dir(run.job.model, target)
    return Saved(save_checkpoint(folder / "checkpoint.pt", trained.model, meta), meta)


def _round(run: _Run, locks: contextlib.ExitStack, last: bool) -> Trained | None:
    """Train once; return with the model's lock held, or None (lock released) when the round went stale."""
    from tmu_core.state.locks import model_lock

    if last:
        locks.enter_context(model_lock(run.workspace, run.job.model, blocking=True, holder=run.job.id))
    _, ids = _membership(run, run.index, queued=True)
    try:
        trained = run.step("train", lambda: _train(run))
    except Exception:
        if not last and _stale(run, ids):  # a sample was forgotten (and wiped) under the round: train again
            logger.warning("job=%s: a training sample was forgotten during the round; training again", run.job.id)
            return None
        raise
    if not last:
        locks.enter_context(model_lock(run.workspace, run.job.model, blocking=True, holder=run.job.id))
    stale = _stale(run, trained.ids)
    if stale and not last:
        logger.info("job=%s: %d samples were forgotten while it trained; training again", run.job.id, len(stale))
        locks.close()
        return None
    if stale:  # the last round held the lock: nothing can have been forgotten
        raise RuntimeError(f"{len(stale)} samples were forgotten while the model's lock was held")
    return trained


def _retrain_to_commit(run: _Run, locks: contextlib.ExitStack) -> bool:
    """Rounds until one is not overtaken by a forget, then the steps up to the commit (under the model's lock)."""
    rounds, trained = 0, None
    while trained is None:
        rounds += 1
        trained = _round(run, locks, last=rounds >= run.config.drift.max_rounds)
    current = run.store.versions.require_serving(run.job.model)
    target = run.store.versions.reserve(run.job.model, run.job.id)
    undo.remove_version_files(run.workspace, run.store.versions, run.job.model, target)
    run.store.jobs.set_fields(run.job.id, from_version=current.version, to_version=target)
    metrics = run.step("evaluate", lambda: _evaluate(run, current, trained))
    saved = run.step("save", lambda: _save(run, target, trained, rounds))
    loaded = _Target(current, target)
    package = run.step("package", lambda: _package(run, loaded, saved))
    run.step("register", lambda: _register(run, loaded, package))
    drift = exact_drift(target, metrics["acc_test_after"], datetime.now(timezone.utc).isoformat())
    result = _result(run, current, target, trained, metrics, rounds, package)
    plan = commit.CommitPlan(model=run.job.model, source=current.version, target=target, archive=package.archive,
                             checkpoint=saved.checkpoint, onnx=package.onnx, members=trained.ids,
                             forgotten=tuple(sorted(run.store.versions.owed(run.job.model))),
                             request_ids=(run.job.id,), kind="exact", drift=drift)
    run.step("commit", lambda: commit.commit_job(run.store, run.store.jobs.get(run.job.id), plan, result,
                                                 run.config.retry))
    return True


@dataclass(frozen=True)
class _Target:
    """What the forget pipeline's package and register steps read: the source version and the target number."""

    source: VersionRecord
    target: int


def _result(run: _Run, current: VersionRecord, target: int, trained: Trained, metrics: dict[str, Any],
            rounds: int, package: Any) -> dict[str, Any]:
    from tmu_core.forget.report import seconds_since

    job = run.store.jobs.get(run.job.id)
    return {
        "job_id": job.id, "kind": "retrain", "model": job.model, "from_version": current.version,
        "to_version": target, "request_ids": [job.id], "method": "retrain", "samples": 0,
        "trained_on": len(trained.ids), "rounds": rounds, "reason": job.options.get("reason"),
        "metrics": metrics, "timings": {**run.timings, "queued_to_commit": round(seconds_since(job.created_at), 3)},
        "unlearn_details": trained.details, "device": str(run.device),
        "onnx_max_abs_diff": getattr(package.onnx_check, "max_abs_diff", None),
        "forgetting": {"kind": "exact", "method": "retrain", "exact_base": target,
                       "replaces": current.version, "replaces_kind": current.kind},
    }


def run_retrain(workspace: Workspace, job_id: str, config: PipelineConfig) -> Job:
    """Run one claimed (``running``) retrain job to the end, in this process.

    Returns:
        The job as stored at the end (see :func:`tmu_core.forget.pipeline.run_job`).
    """
    from tmu_core.device import seed_everything
    from tmu_core.forget.pipeline import _attempt, prepare_next
    from tmu_core.state.locks import model_lock

    store = StateStore.open(workspace)
    job = store.jobs.get(job_id)
    if job.state != "running" or job.kind != "retrain":
        raise InvalidInputError(f"job {job_id} is a {job.state} {job.kind} job; only a running retrain job can be run")
    seed_everything(config.seed)
    if commit.is_committed(store, job):
        with model_lock(workspace, job.model, blocking=True, holder=job.id):
            return _forward(workspace, job_id, config, resumed=True)
    with contextlib.suppress(OSError):
        os.nice(NICE)
    from tmu_core.index import TrainingIndex

    run = _Run(workspace, job, config, steps=RETRAIN_STEPS)
    with contextlib.ExitStack() as locks, TrainingIndex.open(workspace.index_dir) as index:
        run.index = index
        committed = _attempt(run, lambda: _retrain_to_commit(run, locks))
        if committed:
            job = _forward(workspace, job_id, config)
    if committed and job.state == "succeeded" and config.prepare_next:
        prepare_next(workspace, job, config)
    return store.jobs.get(job_id)
