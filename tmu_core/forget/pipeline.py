"""The forget pipeline one job worker runs, step by step, each step recorded on the job.

Steps: ``load`` (serving version's checkpoint and prepared artifacts, preparing them if missing) -> ``unlearn``
-> ``evaluate`` (ACC on D_test and D_f, membership attack on D_f) -> ``save`` (checkpoint v(n+1)) -> ``package``
(.mar + ONNX) -> ``register`` (synchronous) -> ``set_default`` -> ``drain`` v(n) -> ``unregister_old`` ->
``commit`` (delete from the index, then one transaction: version record, audit records, job succeeded).
After success the worker prepares v(n+1)'s artifacts (recorded in the job's ``followup``).

Nothing is deleted from the index before the new version serves. If a step fails, the worker undoes what the
job changed in TorchServe and on disk (:func:`tmu_core.forget.undo.undo_uncommitted`) and marks it failed;
if the worker dies, the dispatcher does the same. Test-only hook: with ``PipelineConfig.kill_at`` (worker flag
``--kill-at STEP``) the worker calls ``os._exit(9)`` at the start of that step, or, for ``commit.index_done``,
right after the index deletion.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from tmu_core.config import Workspace
from tmu_core.errors import InvalidInputError
from tmu_core.forget import commit as recovery
from tmu_core.forget import undo
from tmu_core.state.jobs import Job, JobStore
from tmu_core.state.versions import VersionRegistry
from tmu_core.service.swap import SwapSettings

logger = logging.getLogger(__name__)

STEPS = ("load", "unlearn", "evaluate", "save", "package", "register", "set_default", "drain", "unregister_old",
         "commit")
KILL_POINTS = STEPS + ("commit.index_done",)


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
        kill_at: test-only: exit with code 9 at this point (one of ``KILL_POINTS``).
    """

    device: str = "auto"
    seed: int = 0
    twin_fraction: float = 0.5
    mia_alpha: float = 0.5
    swap: SwapSettings = field(default_factory=SwapSettings)
    prepare_next: bool = True
    kill_at: str | None = None

    def __post_init__(self) -> None:
        if self.kill_at is not None and self.kill_at not in KILL_POINTS:
            raise InvalidInputError(f"kill_at must be one of {', '.join(KILL_POINTS)}; got {self.kill_at!r}")
        if not 0.0 < self.twin_fraction < 1.0:
            raise InvalidInputError(f"twin_fraction must be in (0, 1), got {self.twin_fraction}")


def seconds_since(iso_time: str) -> float:
    """Wall-clock seconds from an ISO 8601 time until now."""
    return (datetime.now(timezone.utc) - datetime.fromisoformat(iso_time)).total_seconds()


class _JobRun:
    """Working state of one job inside its worker; each ``_step_*`` method is one pipeline step."""

    def __init__(self, workspace: Workspace, job: Job, config: PipelineConfig) -> None:
        from tmu_core.device import resolve_device

        self.workspace, self.job, self.config = workspace, job, config
        self.jobs = JobStore(workspace.state_db)
        self.registry = VersionRegistry(workspace.state_db)
        self.device = resolve_device(config.device)
        self.ids, self.request_ids = self.jobs.forget_set(job)
        self.timings: dict[str, float] = {}
        self.state: dict[str, Any] = {}

    def kill_point(self, name: str) -> None:
        if self.config.kill_at == name:
            logger.warning("test hook: worker of job=%s exits at %s", self.job.id, name)
            os._exit(9)

    def run(self) -> None:
        for position, step in enumerate(STEPS):
            self.jobs.enter_step(self.job.id, step, position / len(STEPS))
            self.kill_point(step)
            started = time.perf_counter()
            getattr(self, f"_step_{step}")()
            # "prepare_artifacts" is timed on its own inside "load"; keep the timings disjoint.
            nested = self.timings.get("prepare_artifacts", 0.0) if step == "load" else 0.0
            self.timings[step] = round(time.perf_counter() - started - nested, 3)
            if self.state.get("nothing_to_do"):
                return

    def _step_load(self) -> None:
        from tmu_core.index import TrainingIndex
        from tmu_core.forget.artifacts import artifacts_dir, plan_data, prepare
        from tmu_core.train import load_checkpoint
        from tmu_core.unlearn import get_method

        self.index = TrainingIndex.open(self.workspace.index_dir)
        live = [i for i in self.ids if not self.index.is_forgotten(i)]
        if not live:
            self._nothing_to_do()
            return
        self.ids = live
        source = self.registry.require_serving(self.job.model)
        target = self.registry.next_version(self.job.model)
        undo.remove_version_files(self.workspace, self.registry, self.job.model, target)
        self.jobs.set_fields(self.job.id, from_version=source.version, to_version=target)
        self.source, self.target = source, target
        self.plan = plan_data(self.index, self.config.twin_fraction, self.config.seed)
        options = dict(self.job.options)
        self.method = get_method(options.pop("method", "tmu"), **options)
        self.model, self.meta = load_checkpoint(source.checkpoint, self.device)
        folder = artifacts_dir(self.workspace, self.job.model, source.version)
        self.timings["prepare_artifacts"] = round(
            prepare(self.method, self.model, self.meta, self.index, self.plan, self.device, folder), 3)

    def _nothing_to_do(self) -> None:
        self.state["nothing_to_do"] = True
        self.jobs.finish(self.job.id, "succeeded",
                         reason="every sample was forgotten by an earlier request; no new version was made",
                         result={"nothing_to_do": True})

    def _step_unlearn(self) -> None:
        from tmu_core.forget.artifacts import artifacts_dir
        from tmu_core.unlearn import UnlearnData

        forget = set(self.ids)
        retain = tuple(i for i in self.plan.train_ids if i not in forget)
        self.data = UnlearnData(self.index, tuple(self.ids), retain, self.plan.twin_ids)
        folder = artifacts_dir(self.workspace, self.job.model, self.source.version)
        self.outcome = self.method.unlearn(self.model, self.meta, self.data, self.device, folder)

    def _step_evaluate(self) -> None:
        from tmu_core.forget.report import measure

        hard = self.outcome.predicted_hard_ids
        test = (self.index.load(list(self.plan.eval_ids)), self.index.labels(list(self.plan.eval_ids)))
        self.metrics = measure(self.model, self.outcome.model, self.data.tensors("forget"), test, self.device,
                               None if hard is None else len(hard), self.config.mia_alpha)

    def _step_save(self) -> None:
        from dataclasses import asdict, is_dataclass, replace

        from tmu_core.train import save_checkpoint

        retain = list(self.data.retain_ids)
        meta = replace(self.meta, recipe={"unlearn": {"method": self.method.name,
                                                      "options": asdict(self.method.options)
                                                      if is_dataclass(self.method.options) else {},
                                                      "forget_request": self.job.id},
                                          "base": self.meta.recipe},
                       index_fingerprint=self.index.fingerprint(retain), train_size=len(retain),
                       parent=f"{self.job.model}:v{self.source.version}",
                       created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self.new_meta = meta
        folder = self.workspace.version_dir(self.job.model, self.target)
        self.checkpoint = save_checkpoint(folder / "checkpoint.pt", self.outcome.model, meta)

    def _step_package(self) -> None:
        from tmu_core.serving import package_version

        from dataclasses import asdict

        from tmu_core.serving.archive import ServingOptions

        options = asdict(ServingOptions.from_archive(self.source.archive))
        self.package = package_version(self.checkpoint, self.workspace, self.job.model, self.target, **options)

    def _step_register(self) -> None:
        from tmu_core.service import swap

        # A version of this number left registered by an earlier failed job holds other weights: replace it.
        if swap.unregister(self.workspace, self.job.model, self.target):
            logger.warning("job=%s: unregistered a stale version %d first", self.job.id, self.target)
        swap.register(self.workspace, self.job.model, self.target, self.package.archive, self.config.swap)

    def _step_set_default(self) -> None:
        from tmu_core.service import swap

        swap.set_default(self.workspace, self.job.model, self.target)
        self.timings["request_to_serving"] = round(seconds_since(self.job.created_at), 3)

    def _step_drain(self) -> None:
        from tmu_core.service import swap

        swap.drain(self.workspace, self.job.model, self.source.version, self.config.swap)

    def _step_unregister_old(self) -> None:
        from tmu_core.service import swap

        swap.unregister(self.workspace, self.job.model, self.source.version)

    def _step_commit(self) -> None:
        from tmu_core.forget.report import write_report

        result = self.result()
        self.jobs.set_fields(self.job.id, result=result)  # lets recovery finish the commit if the worker dies
        write_report(self.workspace.version_dir(self.job.model, self.target), result)
        forgotten = self.index.forget(self.ids, self.job.id)
        logger.info("job=%s index forgot %d samples (%d already gone)", self.job.id, len(forgotten.forgotten),
                    len(forgotten.already_forgotten))
        self.kill_point("commit.index_done")
        recovery.finish_commit(self.workspace, self.jobs.get(self.job.id))

    def result(self) -> dict[str, Any]:
        """The job's report (JSON-ready): what was forgotten, how well, and what each step cost."""
        from tmu_core.forget.report import metrics_dict

        job = self.jobs.get(self.job.id)
        claimed = datetime.fromisoformat(job.started_at or job.created_at)
        queued = (claimed - datetime.fromisoformat(job.created_at)).total_seconds()
        # From the claim to the first step: starting the worker process (interpreter, torch, CUDA context).
        worker_start = (datetime.fromisoformat(job.steps[0]["at"]) - claimed).total_seconds() if job.steps else 0.0
        timings = {"queue_wait": round(queued, 3), "worker_start": round(worker_start, 3), **self.timings}
        return {
            "job_id": job.id, "model": job.model, "from_version": self.source.version, "to_version": self.target,
            "request_ids": self.request_ids, "method": self.method.name, "samples": len(self.ids),
            "owners": job.owner_ids, "already_forgotten": job.already_forgotten,
            "metrics": metrics_dict(self.metrics), "timings": timings,
            "unlearn_details": _json_safe(self.outcome.details), "device": str(self.device),
            "onnx_max_abs_diff": getattr(self.package.onnx_check, "max_abs_diff", None),
        }

    def prepare_next(self) -> None:
        """Prepare the new version's artifacts (after the job succeeded); the outcome goes to ``followup``."""
        from tmu_core.forget.artifacts import artifacts_dir, plan_data, prepare
        from tmu_core.train import load_checkpoint

        self.jobs.set_fields(self.job.id, followup={"artifacts": "preparing", "version": self.target})
        try:
            model, meta = load_checkpoint(self.checkpoint, self.device)
            plan = plan_data(self.index, self.config.twin_fraction, self.config.seed)
            folder = artifacts_dir(self.workspace, self.job.model, self.target)
            seconds = prepare(self.method, model, meta, self.index, plan, self.device, folder)
        except Exception as err:  # the job already succeeded; the next job prepares on demand
            logger.exception("job=%s: preparing v%d artifacts failed", self.job.id, self.target)
            self.jobs.set_fields(self.job.id, followup={"artifacts": "failed", "version": self.target,
                                                        "reason": str(err)})
            return
        self.jobs.set_fields(self.job.id, followup={"artifacts": "ready", "version": self.target,
                                                    "seconds": round(seconds, 3)})


def _json_safe(value: Any) -> Any:
    """Drop what JSON cannot hold (tensors become lists, other objects strings)."""
    import json

    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def run_job(workspace: Workspace, job_id: str, config: PipelineConfig) -> Job:
    """Run one claimed (``running``) job to the end, in this process.

    Args:
        workspace: where the state, index, versions and TorchServe live.
        job_id: a job in state ``running`` (claimed by the dispatcher).
        config: device, seed, swap timing and the test hook.

    Returns:
        The job as stored at the end (``succeeded`` or ``failed`` with the reason).
    """
    jobs = JobStore(workspace.state_db)
    job = jobs.get(job_id)
    if job.state != "running":
        raise InvalidInputError(f"job {job_id} is {job.state}; only a running (claimed) job can be run")
    from tmu_core.device import seed_everything

    seed_everything(config.seed)
    run = _JobRun(workspace, job, config)
    try:
        try:
            run.run()
        except Exception as err:
            step = jobs.get(job_id).step
            logger.exception("job=%s failed in step %s", job_id, step)
            undo.fail_job(workspace, jobs.get(job_id), f"step '{step}' failed: {err}", config.swap)
            return jobs.get(job_id)
        if config.prepare_next and jobs.get(job_id).state == "succeeded" and not run.state.get("nothing_to_do"):
            run.prepare_next()
        return jobs.get(job_id)
    finally:
        index = getattr(run, "index", None)
        if index is not None:
            index.close()
