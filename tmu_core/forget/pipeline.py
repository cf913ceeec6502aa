"""The forget pipeline one job worker runs, step by step, each step recorded on the job.

Up to the commit nothing a job does is visible: ``load`` (the serving version, its training membership and its
prepared artifacts) -> ``unlearn`` -> ``evaluate`` (ACC on D_test and D_f, membership attack on D_f) -> ``save``
(checkpoint v(n+1)) -> ``package`` (.mar + ONNX) -> ``register`` (v(n+1) loaded in TorchServe, not the default)
-> ``commit`` (one transaction: v(n+1) is the serving version with its membership, the model has forgotten the
samples, the audit record). A failure before the commit is undone and the job is queued again (or failed after
its last attempt). A version that would pass the drift policy's hold level while a retrain is on its way is not
served either: the job is undone the same way and waits in the queue for the retrain, without losing an attempt
(:func:`tmu_core.forget.drift.retrain_to_wait_for`). After the commit the job only goes forward
(:mod:`tmu_core.forget.commit`). Each step passes its typed result to the next.

Test-only hook: with ``PipelineConfig.kill_at`` (worker flag ``--kill-at STEP``) the worker calls ``os._exit(9)``
at the start of that step, in the job's first attempt only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from tmu_core.config import Workspace
from tmu_core.errors import InvalidInputError
from tmu_core.forget import commit, undo
from tmu_core.forget.commit import kill_point
from tmu_core.forget.drift import DriftPolicy, HeldForRetrain, drift_after, eval_key, retrain_to_wait_for
from tmu_core.forget.executor import Executor, ExecutorSettings, LocalExecutor, make_executor
from tmu_core.forget.retry import RetryPolicy
from tmu_core.service.swap import SwapSettings
from tmu_core.state.jobs import Job
from tmu_core.state.store import StateStore
from tmu_core.state.versions import VersionRecord

logger = logging.getLogger(__name__)

STEPS = ("load", "unlearn", "evaluate", "save", "package", "register", "commit")
# A retrain job's steps (tmu_core.forget.retrain): "train" (then "prepare" and "catch_up" when needed) replace
# load/unlearn.
RETRAIN_STEPS = ("train", "prepare", "catch_up", "evaluate", "save", "package", "register", "commit")
KILL_POINTS = STEPS + ("train", "prepare", "catch_up") + commit.FORWARD_STEPS
T = TypeVar("T")


@dataclass(frozen=True)
class PipelineConfig:
    """How a worker runs a job.

    Attributes:
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        seed: seeds the twin/eval split of the test set and the unlearning.
        twin_fraction: share of each class's test samples given to TMU's twin problem (the rest is D_test).
        mia_alpha: false-positive rate of the membership attack on non-members.
        swap: registration and drain timing.
        prepare_next: prepare the new version's artifacts after the job succeeded.
        retention_s: how long a superseded version's archive, checkpoint and ONNX copy are kept (0: deleted
            when the job finishes). Its prepared artifacts are always deleted then.
        max_attempts: tries of a job that fails before its commit, counting the first.
        retry: how the commit transaction and each step after it are retried.
        drift: when the commit also queues an exact retrain of the model (:mod:`tmu_core.forget.drift`).
        executor: where the compute steps run (:mod:`tmu_core.forget.executor`): this process by default.
        kill_at: test-only: exit with code 9 at this step of the first attempt (one of ``KILL_POINTS``).
    """

    device: str = "auto"
    seed: int = 0
    twin_fraction: float = 0.5
    mia_alpha: float = 0.5
    swap: SwapSettings = field(default_factory=SwapSettings)
    prepare_next: bool = True
    retention_s: float = 0.0
    max_attempts: int = 5
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    drift: DriftPolicy = field(default_factory=DriftPolicy)
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)
    kill_at: str | None = None

    def __post_init__(self) -> None:
        if self.kill_at is not None and self.kill_at not in KILL_POINTS:
            raise InvalidInputError(f"kill_at must be one of {', '.join(KILL_POINTS)}; got {self.kill_at!r}")
        if not 0.0 < self.twin_fraction < 1.0:
            raise InvalidInputError(f"twin_fraction must be in (0, 1), got {self.twin_fraction}")
        if self.retention_s < 0 or self.max_attempts < 1:
            raise InvalidInputError(f"retention_s must be >= 0 and max_attempts >= 1, got {self.retention_s} "
                                    f"and {self.max_attempts}")


@dataclass(frozen=True)
class Loaded:
    """What ``load`` found: the source version, the target number, the model and the id sets."""

    index: Any
    source: VersionRecord
    target: int
    method: Any
    model: Any
    meta: Any
    plan: Any
    forget_ids: tuple[str, ...]
    retain_ids: tuple[str, ...]


@dataclass(frozen=True)
class Unlearned:
    """What ``unlearn`` made: the data it used and the method's outcome (the new weights)."""

    data: Any
    outcome: Any


@dataclass(frozen=True)
class Saved:
    """The new version's checkpoint and its metadata."""

    checkpoint: Path
    meta: Any


class _Run:
    """One job's run: the context every step reads, and the timing and kill hook around each step."""

    def __init__(self, workspace: Workspace, job: Job, config: PipelineConfig, steps: tuple[str, ...] = STEPS,
                 executor: Executor | None = None) -> None:
        from tmu_core.device import resolve_device

        self.workspace, self.job, self.config, self.steps = workspace, job, config, steps
        self.executor = executor or LocalExecutor()
        self.store = StateStore.open(workspace)
        # With a remote executor the host only reads checkpoints and writes new ones: the CPU does.
        self.device = resolve_device(config.device if isinstance(self.executor, LocalExecutor) else "cpu")
        self.ids, self.request_ids = self.store.jobs.forget_set(job)
        self.timings: dict[str, float] = {}

    def step(self, name: str, action: Callable[[], T]) -> T:
        """Record the step on the job, run it, time it."""
        self.store.jobs.enter_step(self.job.id, name, self.steps.index(name) / (len(self.steps) + 4))
        kill_point(self.config, self.job, name)
        started = time.perf_counter()
        value = action()
        # "prepare_artifacts" is timed on its own inside "load"; keep the timings disjoint.
        nested = self.timings.get("prepare_artifacts", 0.0) if name == "load" else 0.0
        self.timings[name] = round(time.perf_counter() - started - nested, 3)
        return value


def _load(run: _Run) -> Loaded | None:
    from tmu_core.forget.artifacts import plan_data
    from tmu_core.index import TrainingIndex
    from tmu_core.preprocess import Preprocess
    from tmu_core.train import load_checkpoint
    from tmu_core.unlearn import get_method

    index = TrainingIndex.open(run.workspace.index_dir)
    run.index = index
    source = run.store.versions.require_serving(run.job.model)
    members = run.store.versions.members(run.job.model, source.version)
    trained = set(index.ids("train")) if members is None else members
    forget = tuple(sorted(set(run.ids) & trained))
    if not forget:
        return None
    target = run.store.versions.reserve(run.job.model, run.job.id)
    undo.remove_version_files(run.workspace, run.store.versions, run.job.model, target)
    run.store.jobs.set_fields(run.job.id, from_version=source.version, to_version=target)
    plan = plan_data(index, run.config.twin_fraction, run.config.seed, trained)
    name, options = run.job.method()
    method = get_method(name, **options)
    run.method = method  # its prepared state (this version's) seeds the next version's, see prepare_next
    model, meta = load_checkpoint(source.checkpoint, run.device)
    index = index.view(Preprocess.from_meta(meta))  # every image read as this version's handler reads it
    retain = tuple(i for i in plan.train_ids if i not in set(forget))
    loaded = Loaded(index, source, target, method, model, meta, plan, forget, retain)
    run.timings["prepare_artifacts"] = round(run.executor.prepare(run, loaded), 3)
    return loaded


def _unlearn(run: _Run, loaded: Loaded) -> Unlearned:
    return run.executor.unlearn(run, loaded)


def _evaluate(run: _Run, loaded: Loaded, unlearned: Unlearned) -> Any:
    return run.executor.evaluate(run, loaded, unlearned)


def _save(run: _Run, loaded: Loaded, unlearned: Unlearned) -> Saved:
    from tmu_core.train import save_checkpoint

    options = asdict(loaded.method.options) if is_dataclass(loaded.method.options) else {}
    meta = replace(loaded.meta, recipe={"unlearn": {"method": loaded.method.name, "options": options,
                                                    "forget_request": run.job.id}, "base": loaded.meta.recipe},
                   index_fingerprint=loaded.index.fingerprint(list(loaded.retain_ids)),
                   train_size=len(loaded.retain_ids), parent=f"{run.job.model}:v{loaded.source.version}",
                   created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    folder = run.workspace.version_dir(run.job.model, loaded.target)
    return Saved(save_checkpoint(folder / "checkpoint.pt", unlearned.outcome.model, meta), meta)


def _package(run: _Run, loaded: Loaded, saved: Saved) -> Any:
    from tmu_core.serving import package_version
    from tmu_core.serving.archive import ServingOptions

    options = asdict(ServingOptions.from_archive(loaded.source.archive))
    return package_version(saved.checkpoint, run.workspace, run.job.model, loaded.target, **options)


def _register(run: _Run, loaded: Loaded, package: Any) -> None:
    from tmu_core.service import swap

    # A version of this number left registered by an earlier failed attempt holds other weights: replace it.
    if swap.unregister(run.workspace, run.job.model, loaded.target):
        logger.warning("job=%s: unregistered a stale version %d first", run.job.id, loaded.target)
    swap.register(run.workspace, run.job.model, loaded.target, package.archive, run.config.swap)


def _result(run: _Run, loaded: Loaded, unlearned: Unlearned, metrics: Any, package: Any,
            drift: dict[str, Any]) -> dict[str, Any]:
    """The job's report (JSON-ready): what was forgotten, how well, and what each step cost."""
    from tmu_core.forget.report import metrics_dict

    job = run.store.jobs.get(run.job.id)
    claimed = datetime.fromisoformat(job.started_at or job.created_at)
    queued = (claimed - datetime.fromisoformat(job.created_at)).total_seconds()
    # From the claim to the first step: starting the worker process (interpreter, torch, CUDA context).
    loads = [s["at"] for s in job.steps if s["step"] == "load"]
    worker_start = (datetime.fromisoformat(loads[-1]) - claimed).total_seconds() if loads else 0.0
    timings = {"queue_wait": round(queued, 3), "worker_start": round(max(worker_start, 0.0), 3), **run.timings}
    forgetting = {"kind": "approximate", "method": loaded.method.name, "exact_base": drift["exact_base"],
                  "drift": drift, "retrain": run.config.drift.outlook(drift)}
    held = [s["retrain"] for s in job.steps if s["step"] == "held"]
    if held:
        forgetting["waited_for"] = held
    return {
        "job_id": job.id, "model": job.model, "from_version": loaded.source.version, "to_version": loaded.target,
        "request_ids": run.request_ids, "forget_request": job.request_id, "method": loaded.method.name,
        "samples": len(loaded.forget_ids), "owners": job.owner_ids, "already_forgotten": job.already_forgotten,
        "attempt": job.attempts + 1, "metrics": metrics_dict(metrics), "timings": timings,
        "unlearn_details": _json_safe(unlearned.outcome.details), "device": str(run.device),
        "onnx_max_abs_diff": getattr(package.onnx_check, "max_abs_diff", None), "forgetting": forgetting,
    }


def _run_to_commit(run: _Run) -> bool:
    """The steps up to and including the commit; False when the model has nothing to forget."""
    loaded = run.step("load", lambda: _load(run))
    if loaded is None:
        commit.finish_nothing_to_do(run.store, run.store.jobs.get(run.job.id), run.ids)
        return False
    unlearned = run.step("unlearn", lambda: _unlearn(run, loaded))
    metrics = run.step("evaluate", lambda: _evaluate(run, loaded, unlearned))
    drift = drift_after(loaded.source, metrics.acc_test_before, metrics.acc_test_after, len(loaded.forget_ids),
                        rights=(metrics.test_right_before, metrics.test_right_after),
                        key=eval_key(loaded.plan.eval_ids), size=metrics.test_size)
    held = retrain_to_wait_for(run.store, run.store.jobs.get(run.job.id), drift, run.config.drift)
    if held is not None:
        raise held
    saved = run.step("save", lambda: _save(run, loaded, unlearned))
    # The next version's artifacts are prepared while this one is packaged, registered and committed.
    run.ahead = run.executor.prepare_ahead(run, loaded, unlearned, saved) if run.config.prepare_next else None
    try:
        package = run.step("package", lambda: _package(run, loaded, saved))
        run.step("register", lambda: _register(run, loaded, package))
        result = _result(run, loaded, unlearned, metrics, package, drift)
        plan = commit.CommitPlan(model=run.job.model, source=loaded.source.version, target=loaded.target,
                                 archive=package.archive, checkpoint=saved.checkpoint, onnx=package.onnx,
                                 members=loaded.retain_ids, forgotten=tuple(run.ids),
                                 request_ids=tuple(run.request_ids), drift=drift,
                                 drift_policy=run.config.drift)
        run.step("commit", lambda: commit.commit_job(run.store, run.store.jobs.get(run.job.id), plan, result,
                                                     run.config.retry))
    except BaseException:
        if run.ahead is not None:  # let it finish writing before the undo deletes the version's folder
            wait([run.ahead])
        raise
    return True


def _json_safe(value: Any) -> Any:
    """Drop what JSON cannot hold (tensors become lists, other objects strings)."""
    import json

    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def run_job(workspace: Workspace, job_id: str, config: PipelineConfig) -> Job:
    """Run one claimed (``running``) job to the end, in this process, holding the model's lock.

    A job that already passed its commit (its worker died after it) only runs the steps after the commit.

    Args:
        workspace: where the state, index, versions and TorchServe live.
        job_id: a job in state ``running`` (claimed by the dispatcher).
        config: device, seed, swap timing, retention, retries and the test hook.

    Returns:
        The job as stored at the end: ``succeeded``, ``failed``, ``queued`` again (it failed before its commit
        and has attempts left) or still ``running`` (a step after the commit kept failing; it is resumed later).
    """
    from tmu_core.device import seed_everything
    from tmu_core.state.locks import model_lock

    store = StateStore.open(workspace)
    job = store.jobs.get(job_id)
    if job.state != "running":
        raise InvalidInputError(f"job {job_id} is {job.state}; only a running (claimed) job can be run")
    seed_everything(config.seed)
    executor = make_executor(config.executor, workspace)
    try:
        with model_lock(workspace, job.model, blocking=True, holder=job.id):
            if commit.is_committed(store, job):
                return _forward(workspace, job_id, config, resumed=True)
            run = _Run(workspace, job, config, executor=executor)
            try:
                committed = _attempt(run)
            finally:
                index = getattr(run, "index", None)
                if index is not None:
                    index.close()
            if committed is None:
                return store.jobs.get(job_id)
            if committed:
                job = _forward(workspace, job_id, config)
        if job.state == "succeeded" and config.prepare_next and committed:
            prepare_next(workspace, job, config, parent=getattr(run, "method", None), executor=executor,
                         ahead=getattr(run, "ahead", None))
    finally:
        executor.close()
    return store.jobs.get(job_id)


def _forward(workspace: Workspace, job_id: str, config: PipelineConfig, resumed: bool = False) -> Job:
    """The steps after the commit; one that keeps failing leaves the job running there, to be resumed."""
    store = StateStore.open(workspace)
    try:
        return commit.run_forward(workspace, job_id, config, resumed)
    except Exception as err:
        job = store.jobs.get(job_id)
        logger.exception("job=%s: step %s after the commit keeps failing; it will be resumed", job_id, job.step)
        try:
            store.jobs.set_fields(job_id, reason=f"step '{job.step}' after the commit failed, to be resumed: {err}")
        except Exception:  # the reason is only informative; the dispatcher resumes the job either way
            logger.exception("job=%s: could not record why", job_id)
        return store.jobs.get(job_id)


def _attempt(run: _Run, to_commit: Callable[[], bool] | None = None) -> bool | None:
    """Run to the commit (``to_commit``, a forget job's steps by default); on a failure before it, undo and queue
    again (None). True when committed, False when there was nothing to do."""
    try:
        return to_commit() if to_commit is not None else _run_to_commit(run)
    except HeldForRetrain as held:
        logger.info("job=%s held: %s", run.job.id, held)
        undo.hold_for_retrain(run.workspace, run.store.jobs.get(run.job.id), held, run.config.swap)
        return None
    except Exception as err:
        job = run.store.jobs.get(run.job.id)
        if commit.is_committed(run.store, job):  # the commit landed, then something raised: only forward
            logger.exception("job=%s raised after its commit; going forward", job.id)
            return True
        logger.exception("job=%s failed in step %s", job.id, job.step)
        undo.fail_or_requeue(run.workspace, job, f"step '{job.step}' failed: {err}", run.config.swap,
                             run.config.max_attempts)
        return None


def prepare_next(workspace: Workspace, job: Job, config: PipelineConfig, parent: Any = None,
                 executor: Executor | None = None, ahead: Future | None = None) -> None:
    """Prepare the new version's artifacts (after the job succeeded); the outcome goes to ``followup``.

    ``parent`` is the job's method: when it holds the source version's prepared state in memory (TMU), the new
    version's is an incremental update of it (that version's artifacts folder is deleted by then). ``followup``
    says how it went (``preparation``: ``incremental``, ``full``, or ``reused`` when a state was already there)
    and its seconds. ``executor`` runs it (this process by default); ``ahead``, the preparation the executor
    started before the commit (:meth:`tmu_core.forget.executor.LocalExecutor.prepare_ahead`), is waited for
    instead.
    """
    store = StateStore.open(workspace)
    target = job.to_version
    store.jobs.set_fields(job.id, followup={"artifacts": "preparing", "version": target})
    try:
        followup = ahead.result() if ahead is not None else (executor or LocalExecutor()).prepare_next(
            workspace, job, config, parent)
    except Exception as err:  # the job already succeeded; the next job prepares on demand
        logger.exception("job=%s: preparing v%s artifacts failed", job.id, target)
        store.jobs.set_fields(job.id, followup={"artifacts": "failed", "version": target, "reason": str(err)})
        return
    store.jobs.set_fields(job.id, followup=followup)

