"""An exact retrain of a model on its retained samples, swapped in as a new version.

A ``retrain`` job (queued by the drift budget, :mod:`tmu_core.forget.drift`, or by ``tmu-admin retrain``) runs
in a job worker at low CPU priority: ``train`` -> (``prepare`` -> ``catch_up``) -> ``evaluate`` -> ``save`` ->
``package`` -> ``register`` -> ``commit``, then the forward steps of a forget job (:mod:`tmu_core.forget.commit`).

``train`` takes as long as the model's original training, so it does not hold the model's lock: forget requests
that arrive meanwhile are unlearned by their own jobs as usual (or, past the policy's ``hold_at``, wait for it).
It trains a fresh network with the model's recorded recipe (``meta.recipe``) on the serving version's
membership, less owed samples and the samples of forget jobs still queued (their jobs find nothing left to
unlearn once the new version serves).

Then the job takes the model's lock and looks at what serves now. If nothing it trained on has been forgotten
since, the network is an ``exact`` version. Otherwise ``catch_up`` unlearns those samples from the network in
memory with the method of the forget jobs that took them, and the version that lands is ``approximate``: a
lineage of its own whose drift counts from the retrained network's ACC_Dtest. The method's state for the new
network is built by ``prepare`` before the lock when samples were forgotten by then, in memory only. The
samples' pixels are still in the index: while a model's retrain runs, the wipe leaves what that model forgot
alone (:func:`tmu_core.forget.wipe.sweep`). No checkpoint of a network trained on a forgotten sample is ever
written, no forget request waits for a training, and the version that lands holds exactly its membership.

Low priority means two things. The worker runs at ``nice`` 10, and its training pauses between steps while a
forget job runs or prepares its next version on this host (:class:`YieldToForgets`): two jobs sharing a few cores
slow each other far more than their shares say, since each step of one waits for the other's threads. A forget
request arriving during a retrain is served as fast as one without it; the retrain takes the gaps.

A failure or a killed worker before the commit leaves what serves as it was (the same undo as a forget job's).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

from tmu_core.config import Workspace
from tmu_core.errors import InvalidInputError
from tmu_core.forget import commit, undo
from tmu_core.forget.drift import eval_key, exact_drift, right_of, with_error
from tmu_core.forget.pipeline import RETRAIN_STEPS, PipelineConfig, Saved, _forward, _package, _register, _Run
from tmu_core.state.jobs import Job
from tmu_core.state.store import StateStore
from tmu_core.state.versions import VersionRecord

logger = logging.getLogger(__name__)

NICE = 10  # a retrain yields the CPU to forget jobs and serving


class YieldToForgets:
    """A retrain's pause (:func:`tmu_core.train.loops.yielding`): before a training step, wait while a forget job
    uses the CPU (:meth:`tmu_core.state.jobs.JobStore.busy_forgets`, its worker alive on this host).

    Asks the state database at most every ``poll_s`` seconds. A pause lasts at most ``max_pause_s``; then the
    training runs at least ``run_s`` before it pauses again, so a retrain still progresses under an endless
    stream of requests. ``paused_s`` sums the pauses (the job's report shows it as the ``yielded`` timing).
    """

    def __init__(self, store: StateStore, poll_s: float = 0.5, max_pause_s: float = 600.0, run_s: float = 60.0) -> None:
        self.store, self.poll_s, self.max_pause_s, self.run_s = store, poll_s, max_pause_s, run_s
        self.paused_s = 0.0
        self._next_check = 0.0

    def busy(self) -> bool:
        from tmu_core.forget.dispatcher import pid_runs_job

        return any(pid_runs_job(job.worker_pid, job.id) for job in self.store.jobs.busy_forgets())

    def __call__(self) -> None:
        started = time.monotonic()
        if started < self._next_check:
            return
        while self.busy() and time.monotonic() - started < self.max_pause_s:
            time.sleep(self.poll_s)
        ended = time.monotonic()
        self.paused_s += ended - started
        self._next_check = ended + (self.run_s if ended - started >= self.max_pause_s else self.poll_s)


@dataclass(frozen=True)
class Trained:
    """The network to commit: the version it started from, the ids it holds, the weights, and how it was made
    (``caught_up``: what the catch-up unlearned from the retrained network; None for an exact network)."""

    source: VersionRecord
    ids: tuple[str, ...]
    model: Any
    meta: Any
    details: dict[str, Any]
    caught_up: dict[str, Any] | None = None


def _membership(run: _Run, index: Any, source: VersionRecord, queued: bool = False) -> tuple[str, ...]:
    """The ids a retrain of ``source`` trains on: its membership minus owed samples (and, with ``queued``, minus
    the samples of the model's queued forget jobs, which the new version then covers)."""
    members = run.store.versions.members(run.job.model, source.version)
    trained = set(index.ids("train")) if members is None else members
    waiting: set[str] = set()
    if queued:
        for job in run.store.jobs.list(model=run.job.model, state="queued", limit=10_000):
            waiting.update(job.sample_ids)
    return tuple(sorted(trained - run.store.versions.owed(run.job.model) - waiting))


def _train(run: _Run) -> Trained:
    from tmu_core.preprocess import Preprocess
    from tmu_core.train import load_checkpoint
    from tmu_core.unlearn import UnlearnData, get_method
    from tmu_core.unlearn.baselines import recipe_config

    source = run.store.versions.require_serving(run.job.model)
    ids = _membership(run, run.index, source, queued=True)
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
    """Ids the network was trained on that the model must not be trained on any more (forgotten since)."""
    now = _membership(run, run.index, run.store.versions.require_serving(run.job.model))
    return set(ids) - set(now)


def _catch_up_method(run: _Run, stale: set[str]) -> tuple[str, dict[str, Any], list[str]]:
    """The method and options of the latest forget job that took any of ``stale`` (TMU's defaults when none
    did: owed samples a rollback made), and the ids of those jobs."""
    jobs = [job for job in run.store.jobs.list(model=run.job.model, state="succeeded", limit=10_000)
            if job.kind == "forget" and stale & set(job.sample_ids)]
    name, options = jobs[0].method() if jobs else ("tmu", {})
    return name, options, sorted(job.id for job in jobs)


@dataclass
class _CatchUp:
    """A forget method with its state prepared, in memory only, for the retrained network (``key``: the method's
    name and options, as :func:`_catch_up_method` chose them)."""

    key: tuple[str, str]
    method: Any
    plan: Any
    view: Any
    prepare_s: float


def _prepare_catch_up(run: _Run, trained: Trained, stale: set[str], ready: _CatchUp | None = None) -> _CatchUp:
    """The catch-up's method for ``stale``, its state prepared for the retrained network (``ready`` when that one
    already is for the same method). In memory only: the state holds features of samples being forgotten."""
    import json
    import time

    from tmu_core.forget.artifacts import plan_data
    from tmu_core.preprocess import Preprocess
    from tmu_core.unlearn import UnlearnData, get_method

    name, options, _ = _catch_up_method(run, stale)
    key = (name, json.dumps(options, sort_keys=True))
    if ready is not None and ready.key == key:
        return ready
    started = time.perf_counter()
    method = get_method(name, **options)
    plan = plan_data(run.index, run.config.twin_fraction, run.config.seed, trained.ids)
    view = run.index.view(Preprocess.from_meta(trained.meta))
    method.prepare(trained.model, trained.meta, UnlearnData(view, (), plan.train_ids, plan.twin_ids), run.device)
    return _CatchUp(key, method, plan, view, time.perf_counter() - started)


def _catch_up(run: _Run, trained: Trained, stale: set[str], ready: _CatchUp | None) -> Trained:
    """Unlearn ``stale`` from the retrained network in memory, with the forget jobs' method."""
    import time

    from tmu_core.unlearn import UnlearnData

    started = time.perf_counter()
    state = _prepare_catch_up(run, trained, stale, ready)
    name, options, jobs = _catch_up_method(run, stale)
    forget = tuple(sorted(stale))
    retain = tuple(i for i in state.plan.train_ids if i not in stale)
    data = UnlearnData(state.view, forget, retain, state.plan.twin_ids)
    outcome = state.method.unlearn(trained.model, trained.meta, data, run.device)
    caught_up = {"method": name, "options": options, "samples": len(forget), "forget_jobs": jobs,
                 "predicted_hard": None if outcome.predicted_hard_ids is None else len(outcome.predicted_hard_ids),
                 "prepared_before_lock": state is ready, "prepare_s": round(state.prepare_s, 3),
                 "seconds": round(time.perf_counter() - started, 3)}
    logger.info("job=%s: %d samples were forgotten while it trained; caught up with %s", run.job.id, len(forget), name)
    return replace(trained, ids=retain, model=outcome.model, caught_up=caught_up)


def _evaluate(run: _Run, current: VersionRecord, trained: Trained,
              retrained: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """ACC on D_test (the jobs' eval split) of the version serving now, of the retrained network and of the one
    to commit (the same network unless it was caught up); and for the drift record, which images the last two got
    right (:func:`~tmu_core.forget.drift.right_of`) and the split's :func:`~tmu_core.forget.drift.eval_key`."""
    from tmu_core.evaluate.metrics import accuracy
    from tmu_core.forget.artifacts import plan_data
    from tmu_core.preprocess import Preprocess
    from tmu_core.train import load_checkpoint, predict_logits

    plan = plan_data(run.index, run.config.twin_fraction, run.config.seed, trained.ids)
    view = run.index.view(Preprocess.from_meta(trained.meta))
    images, labels = view.load(list(plan.eval_ids)), view.labels(list(plan.eval_ids))
    before, _ = load_checkpoint(current.checkpoint, run.device)
    after = predict_logits(trained.model, images, run.device)
    metrics = {"acc_test_before": accuracy(predict_logits(before, images, run.device), labels),
               "acc_test_after": accuracy(after, labels), "test_size": len(plan.eval_ids),
               "trained_on": len(trained.ids)}
    right = {"key": eval_key(plan.eval_ids), "after": right_of(after, labels)}
    right["retrained"] = right["after"]
    if trained.caught_up is not None:
        exact = predict_logits(retrained, images, run.device)
        metrics["acc_test_retrained"] = accuracy(exact, labels)
        right["retrained"] = right_of(exact, labels)
    return metrics, right


def _save(run: _Run, target: int, trained: Trained) -> Saved:
    from tmu_core.train import save_checkpoint
    from tmu_core.unlearn.baselines import recipe_config

    cfg = recipe_config(trained.meta)
    cfg = replace(cfg, seed=trained.details.get("seed", cfg.seed), epochs=trained.details.get("epochs", cfg.epochs))
    norm = {name: tuple(getattr(trained.model, name).flatten().tolist()) for name in ("mean", "std")
            if hasattr(trained.model, name)}  # the retrained network's own pixel statistics of D_r
    recipe: dict[str, Any] = {"retrain": {"job": run.job.id}, "train": asdict(cfg)}
    if trained.caught_up is not None:
        recipe["retrain"]["caught_up"] = {k: trained.caught_up[k] for k in ("method", "options", "samples")}
    meta = replace(trained.meta, recipe=recipe, **norm,
                   index_fingerprint=run.index.fingerprint(list(trained.ids)), train_size=len(trained.ids),
                   parent=f"{run.job.model}:v{trained.source.version}",
                   created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    folder = run.workspace.version_dir(run.job.model, target)
    return Saved(save_checkpoint(folder / "checkpoint.pt", trained.model, meta), meta)


def _drift(target: int, trained: Trained, metrics: dict[str, Any], right: dict[str, str]) -> dict[str, Any]:
    """An exact version starts a lineage; a caught-up one starts its own, its cost counted from the retrained
    network's ACC_Dtest (the catch-up is its one forget)."""
    now = datetime.now(timezone.utc).isoformat()
    drift = exact_drift(target, metrics.get("acc_test_retrained", metrics["acc_test_after"]), now,
                        right=right["retrained"], key=right["key"])
    if trained.caught_up is None:
        return drift
    caught_up = {**drift, "acc_test": metrics["acc_test_after"],
                 "cost": round(drift["base_acc_test"] - metrics["acc_test_after"], 3), "forgets": 1,
                 "samples": trained.caught_up["samples"]}
    return with_error(caught_up, drift, right["after"], right["key"], metrics["test_size"])


def _retrain_to_commit(run: _Run, locks: contextlib.ExitStack) -> bool:
    """Train without the model's lock, then take it, catch up with what was forgotten meanwhile, and run the
    steps up to the commit."""
    from tmu_core.state.locks import model_lock

    from tmu_core.train.loops import yielding

    pause = YieldToForgets(run.store)
    with yielding(pause):  # not under the model's lock: a forget job waiting for it would wait for the pause
        trained = run.step("train", lambda: _train(run))
        retrained, ready = trained.model, None
        early = _stale(run, trained.ids)
        if early:  # forgotten during the training: prepare the catch-up's state before taking the lock
            ready = run.step("prepare", lambda: _prepare_catch_up(run, trained, early))
    run.timings["yielded"] = round(pause.paused_s, 3)
    locks.enter_context(model_lock(run.workspace, run.job.model, blocking=True, holder=run.job.id))
    current = run.store.versions.require_serving(run.job.model)
    target = run.store.versions.reserve(run.job.model, run.job.id)
    undo.remove_version_files(run.workspace, run.store.versions, run.job.model, target)
    run.store.jobs.set_fields(run.job.id, from_version=current.version, to_version=target)
    stale = _stale(run, trained.ids)
    if stale:
        trained = run.step("catch_up", lambda: _catch_up(run, trained, stale, ready))
    metrics, right = run.step("evaluate", lambda: _evaluate(run, current, trained, retrained))
    saved = run.step("save", lambda: _save(run, target, trained))
    loaded = _Target(current, target)
    package = run.step("package", lambda: _package(run, loaded, saved))
    run.step("register", lambda: _register(run, loaded, package))
    drift = _drift(target, trained, metrics, right)
    result = _result(run, current, target, trained, metrics, package, drift)
    plan = commit.CommitPlan(model=run.job.model, source=current.version, target=target, archive=package.archive,
                             checkpoint=saved.checkpoint, onnx=package.onnx, members=trained.ids,
                             forgotten=tuple(sorted(run.store.versions.owed(run.job.model))),
                             request_ids=(run.job.id,), kind="exact" if trained.caught_up is None else "approximate",
                             drift=drift)
    run.step("commit", lambda: commit.commit_job(run.store, run.store.jobs.get(run.job.id), plan, result,
                                                 run.config.retry))
    return True


@dataclass(frozen=True)
class _Target:
    """What the forget pipeline's package and register steps read: the source version and the target number."""

    source: VersionRecord
    target: int


def _result(run: _Run, current: VersionRecord, target: int, trained: Trained, metrics: dict[str, Any],
            package: Any, drift: dict[str, Any]) -> dict[str, Any]:
    from tmu_core.forget.report import seconds_since

    job = run.store.jobs.get(run.job.id)
    forgetting: dict[str, Any] = {"kind": "exact", "method": "retrain", "exact_base": target,
                                  "replaces": current.version, "replaces_kind": current.kind}
    if trained.caught_up is not None:
        forgetting = {**forgetting, "kind": "approximate", "method": trained.caught_up["method"],
                      "caught_up": trained.caught_up, "drift": drift,
                      "retrain": run.config.drift.outlook(drift)}
    return {
        "job_id": job.id, "kind": "retrain", "model": job.model, "from_version": current.version,
        "to_version": target, "request_ids": [job.id], "method": "retrain", "samples": 0,
        "trained_on": len(trained.ids), "caught_up": trained.caught_up, "reason": job.options.get("reason"),
        "metrics": metrics, "timings": {**run.timings, "queued_to_commit": round(seconds_since(job.created_at), 3)},
        "unlearn_details": trained.details, "device": str(run.device),
        "onnx_max_abs_diff": getattr(package.onnx_check, "max_abs_diff", None), "forgetting": forgetting,
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
