"""Where a forget job's compute runs: the seam between the pipeline's host steps and its unlearning.

The worker process on the extension host always runs the job: it reads the state database and the index, and it
alone writes the checkpoint, the archive and the commit (the single-writer rule). An executor runs the three
compute steps of the job for it, and the preparation of the next version after the commit:

- ``prepare``: the serving version's prepared artifacts (TMU's twin model, features and classifier);
- ``unlearn``: the method on the forget set, giving the new weights;
- ``evaluate``: ACC on D_test and D_f and the membership attack;
- ``prepare_ahead`` / ``prepare_next``: the new version's artifacts, so that the next request finds them ready.
  The local executor starts them in a thread as soon as the new checkpoint is saved, while the job packages,
  registers and commits the version (``prepare_ahead``); otherwise they are made once it serves.

:class:`LocalExecutor` (the default) runs them in the worker process, with the artifacts on disk beside the
version. :class:`tmu_core.forget.ray_executor.RayExecutor` runs them in a warm per-model actor on a Ray cluster.
A step that raises, for either, is undone by the pipeline like any other failed step.
"""

from __future__ import annotations

import argparse
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from tmu_core.errors import InvalidInputError

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ExecutorSettings:
    """Which executor runs the jobs' compute, and how to reach it.

    Attributes:
        kind: ``"local"`` (the worker process) or ``"ray"`` (an actor per model on a Ray cluster).
        ray_address: the cluster's GCS address (``host:port``) for ``"ray"``.
        ray_num_cpus: CPUs each model's actor asks for (its torch threads too).
        ray_num_gpus: GPUs it asks for; None: one when the cluster has a GPU, else none.
        ray_resources: custom Ray resources each actor asks for, as (name, amount) pairs (e.g. to keep it on a
            node group that advertises them).
        ray_timeout_s: the longest one call to the actor may take before the step fails.
        pause_at: test only: the actor sleeps ``pause_s`` at the start of this step of a job's first attempt.
        pause_s: how long.
    """

    kind: str = "local"
    ray_address: str | None = None
    ray_num_cpus: float = 1.0
    ray_num_gpus: float | None = None
    ray_resources: tuple[tuple[str, float], ...] = ()
    ray_timeout_s: float = 3600.0
    pause_at: str | None = None
    pause_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise InvalidInputError(f"executor must be one of {', '.join(EXECUTORS)}; got {self.kind!r}")
        if self.kind == "ray" and not self.ray_address:
            raise InvalidInputError("executor 'ray' needs the cluster's address (--ray-address HOST:PORT)")
        if self.ray_num_cpus <= 0 or self.ray_timeout_s <= 0:
            raise InvalidInputError(f"ray_num_cpus and ray_timeout_s must be > 0; got {self.ray_num_cpus} and "
                                    f"{self.ray_timeout_s}")
        if self.pause_at is not None and self.pause_at not in ("prepare", "unlearn", "evaluate"):
            raise InvalidInputError(f"pause_at must be prepare, unlearn or evaluate; got {self.pause_at!r}")

    def flags(self) -> list[str]:
        """The command-line flags that give these settings to a worker or extension process."""
        if self.kind == "local":
            return []
        flags = ["--executor", self.kind, "--ray-address", str(self.ray_address),
                 "--ray-num-cpus", str(self.ray_num_cpus), "--ray-timeout-s", str(self.ray_timeout_s)]
        if self.ray_num_gpus is not None:
            flags += ["--ray-num-gpus", str(self.ray_num_gpus)]
        for name, amount in self.ray_resources:
            flags += ["--ray-resource", f"{name}={amount}"]
        if self.pause_at:
            flags += ["--pause-at", self.pause_at, "--pause-s", str(self.pause_s)]
        return flags


def add_executor_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of :class:`ExecutorSettings` on an ``argparse`` parser (extension and worker processes)."""
    parser.add_argument("--executor", choices=EXECUTORS, default="local", help="where jobs' compute runs")
    parser.add_argument("--ray-address", default=None, help="Ray cluster address for --executor ray")
    parser.add_argument("--ray-num-cpus", type=float, default=1.0, help="CPUs of each model's Ray actor")
    parser.add_argument("--ray-num-gpus", type=float, default=None, help="GPUs of it (default: 1 if the cluster has one)")
    parser.add_argument("--ray-resource", action="append", default=[], type=parse_resource,
                        help="NAME=AMOUNT: a custom Ray resource each actor asks for (repeatable)")
    parser.add_argument("--ray-timeout-s", type=float, default=3600.0, help="longest call to the actor")
    parser.add_argument("--pause-at", default=None, help="test only: the actor pauses at this step")
    parser.add_argument("--pause-s", type=float, default=0.0, help="test only: for this long")


def parse_resource(text: str) -> tuple[str, float]:
    """``NAME=AMOUNT`` as a (name, amount) pair."""
    name, _, amount = text.partition("=")
    try:
        value = float(amount)
    except ValueError:
        value = -1.0
    if not name or value <= 0:
        raise argparse.ArgumentTypeError(f"a Ray resource is NAME=AMOUNT with AMOUNT > 0, e.g. tmu_jobs=1; "
                                         f"got {text!r}")
    return name, value


def executor_from(args: argparse.Namespace) -> ExecutorSettings:
    """The settings parsed by :func:`add_executor_flags`."""
    return ExecutorSettings(kind=args.executor, ray_address=args.ray_address, ray_num_cpus=args.ray_num_cpus,
                            ray_num_gpus=args.ray_num_gpus, ray_resources=tuple(args.ray_resource),
                            ray_timeout_s=args.ray_timeout_s,
                            pause_at=args.pause_at, pause_s=args.pause_s)


class Executor(Protocol):
    """What the pipeline asks of an executor (see the module docstring); ``run`` is the pipeline's job run,
    ``loaded`` what its ``load`` step found, ``unlearned`` what ``unlearn`` made."""

    def prepare(self, run: Any, loaded: Any) -> float: ...

    def unlearn(self, run: Any, loaded: Any) -> Any: ...

    def evaluate(self, run: Any, loaded: Any, unlearned: Any) -> Any: ...

    def prepare_ahead(self, run: Any, loaded: Any, unlearned: Any, saved: Any) -> Future | None: ...

    def prepare_next(self, workspace: Any, job: Any, config: Any, parent: Any) -> dict[str, Any]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Runs the compute in the worker process; prepared artifacts live in ``<version>/artifacts``."""

    name = "local"

    def prepare(self, run: Any, loaded: Any) -> float:
        from tmu_core.forget.artifacts import artifacts_dir, prepare

        folder = artifacts_dir(run.workspace, run.job.model, loaded.source.version)
        return prepare(loaded.method, loaded.model, loaded.meta, loaded.index, loaded.plan, run.device, folder)

    def unlearn(self, run: Any, loaded: Any) -> Any:
        from tmu_core.forget.artifacts import artifacts_dir
        from tmu_core.forget.pipeline import Unlearned
        from tmu_core.unlearn import UnlearnData

        data = UnlearnData(loaded.index, loaded.forget_ids, loaded.retain_ids, loaded.plan.twin_ids)
        folder = artifacts_dir(run.workspace, run.job.model, loaded.source.version)
        return Unlearned(data, loaded.method.unlearn(loaded.model, loaded.meta, data, run.device, folder))

    def evaluate(self, run: Any, loaded: Any, unlearned: Any) -> Any:
        from tmu_core.forget.report import measure

        hard = unlearned.outcome.predicted_hard_ids
        eval_ids = list(loaded.plan.eval_ids)
        test = (loaded.index.load(eval_ids), loaded.index.labels(eval_ids))
        return measure(loaded.model, unlearned.outcome.model, unlearned.data.tensors("forget"), test, run.device,
                       None if hard is None else len(hard), run.config.mia_alpha)

    def prepare_ahead(self, run: Any, loaded: Any, unlearned: Any, saved: Any) -> Future:
        """Start preparing the new version's artifacts in a thread, from the job's new weights in memory, while
        the job packages, registers and commits the version. The thread takes the artifacts folder's lock at
        once, long before the next job can ask for it (that job first waits for this one's model lock), so the
        next job waits for this preparation instead of making a second one. The future gives the job's
        ``followup``; a job that fails before its commit waits for it before its undo deletes the folder."""
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare-ahead")
        job = run.store.jobs.get(run.job.id)  # as stored since the load step: it names the source version
        future = pool.submit(_prepare_version, run.workspace, job, run.config, loaded.target,
                             unlearned.outcome.model, saved.meta, loaded.retain_ids, loaded.method)
        pool.shutdown(wait=False)  # the thread ends with its one task
        return future

    def prepare_next(self, workspace: Any, job: Any, config: Any, parent: Any) -> dict[str, Any]:
        """Prepare the new version's artifacts on disk (incrementally from ``parent``'s state when it has one)."""
        from tmu_core.device import resolve_device
        from tmu_core.state.store import StateStore
        from tmu_core.train import load_checkpoint

        store = StateStore.open(workspace)
        model, meta = load_checkpoint(store.versions.get(job.model, job.to_version).checkpoint,
                                      resolve_device(config.device))
        return _prepare_version(workspace, job, config, job.to_version, model, meta,
                                store.versions.members(job.model, job.to_version), parent)

    def close(self) -> None:
        pass


def _prepare_version(workspace: Any, job: Any, config: Any, version: int, model: Any, meta: Any,
                     members: Any, parent: Any) -> dict[str, Any]:
    """Prepare ``version`` of ``job.model`` (weights ``model``, trained on ``members``) for the next forget job,
    incrementally from ``parent``'s prepared state when the method has one; returns the ``followup``."""
    from tmu_core.device import resolve_device
    from tmu_core.forget.artifacts import artifacts_dir, plan_data, prepare
    from tmu_core.index import TrainingIndex
    from tmu_core.preprocess import Preprocess
    from tmu_core.state.store import StateStore
    from tmu_core.unlearn import get_method

    name, options = next_method(StateStore.open(workspace), job)
    method = get_method(name, **options)
    with TrainingIndex.open(workspace.index_dir) as index:
        plan = plan_data(index, config.twin_fraction, config.seed, members)
        seconds = prepare(method, model, meta, index.view(Preprocess.from_meta(meta)), plan,
                          resolve_device(config.device), artifacts_dir(workspace, job.model, version),
                          parent=getattr(parent, "prepared", None), origin=f"{job.model}:v{job.from_version}")
    why_full = getattr(getattr(method, "prepared", None), "info", {}).get("full_reason")
    return prepared_followup(getattr(method, "last_prepare", None), why_full, version, seconds)


def next_method(store: Any, job: Any) -> tuple[str, dict[str, Any]]:
    """The method (name, options) that the version ``job`` made is prepared for: the forget job's own; after a
    retrain (whose options say why it ran, not how to forget), that of the model's latest forget job, or TMU's
    defaults when it has none."""
    if job.kind == "forget":
        return job.method()
    for earlier in store.jobs.list(model=job.model, state="succeeded", limit=10_000):
        if earlier.kind == "forget":
            return earlier.method()
    return "tmu", {}


def prepared_followup(went: str | None, why_full: str | None, version: int, seconds: float) -> dict[str, Any]:
    """The job's ``followup`` after preparing ``version``: how (``incremental``, ``full`` or ``reused``, from the
    method's ``last_prepare`` in ``went``), why it was full when a parent state was offered, and how long."""
    preparation = {"incremental": "incremental", "memory": "reused", "disk": "reused"}.get(went, "full")
    followup = {"artifacts": "ready", "version": version, "seconds": round(seconds, 3), "preparation": preparation}
    if went == "built" and why_full:  # a full build although a parent state was offered
        followup["full_reason"] = why_full
    return followup


def make_executor(settings: ExecutorSettings, workspace: Any) -> Executor:
    """The executor ``settings`` name (a Ray one connects to its cluster here)."""
    if settings.kind == "ray":
        from tmu_core.forget.ray_executor import RayExecutor

        return RayExecutor(settings, workspace)
    return LocalExecutor()
