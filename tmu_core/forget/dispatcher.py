"""The dispatcher: a thread in the extension service that runs queued jobs: per model, one forget job at a time,
and beside it one retrain job (:mod:`tmu_core.forget.retrain`).

Each job runs in its own worker process (``python -m tmu_core.forget.worker``), so the HTTP API stays responsive
and a crash in the job cannot take the service down. When a worker exits while its job is still ``running`` (it
was killed, or died), the dispatcher looks at how far it got: before its commit, the job's changes are undone and
it is queued again (failed after its last attempt); after its commit, a new worker resumes it at its step, since
such a job can only be finished. At start it does the same for jobs left ``running`` by a worker that died while
the service was down, and adopts workers that still run. On every pass it also wipes the pixels of forgotten
samples that no model needs any more (:mod:`tmu_core.forget.wipe`) and, on a schedule, purges the files of
versions that hold forgotten samples once their retention has passed, and queues the retrain of a model whose
last exact version has grown older than the drift policy allows (:mod:`tmu_core.forget.drift`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tmu_core.config import Workspace
from tmu_core.forget.drift import DriftPolicy, policy_flags
from tmu_core.forget.executor import ExecutorSettings
from tmu_core.service.swap import SwapSettings
from tmu_core.state.jobs import Job, JobStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    """How workers are started.

    Attributes:
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; passed to each worker.
        kill_at: test-only hook: the worker exits with code 9 at the start of this step of a job's first attempt.
        poll_s: how often the dispatcher looks for finished workers and queued jobs.
        python: the interpreter that runs workers.
        retention_s: how long a superseded version's archive, checkpoint and ONNX copy are kept once it holds
            forgotten samples (0: deleted when the forget job finishes).
        max_attempts: tries of a job that fails before its commit.
        resume_delay_s: wait before a worker resumes a job that stopped after its commit.
        purge_every_s: how often versions past their retention are purged (and retrains due by age queued).
        drift: when forget jobs queue an exact retrain (passed to each worker); off by default.
        executor: where forget jobs' compute runs (passed to each worker): the worker process by default.
    """

    device: str = "auto"
    kill_at: str | None = None
    poll_s: float = 0.5
    python: str = sys.executable
    retention_s: float = 0.0
    max_attempts: int = 5
    resume_delay_s: float = 2.0
    purge_every_s: float = 60.0
    drift: DriftPolicy = DriftPolicy()
    executor: ExecutorSettings = ExecutorSettings()


def worker_log(workspace: Workspace, job_id: str) -> Path:
    """Where a job's worker writes its output: ``<home>/jobs/<job>.log``."""
    return workspace.home / "jobs" / f"{job_id}.log"


def worker_command(workspace: Workspace, job_id: str, settings: WorkerSettings) -> list[str]:
    """The command line of one job's worker."""
    cmd = [settings.python, "-m", "tmu_core.forget.worker", "--job", job_id, "--home", str(workspace.home),
           "--model-store", str(workspace.model_store), "--device", settings.device,
           "--retention-s", str(settings.retention_s), "--max-attempts", str(settings.max_attempts)]
    cmd += policy_flags(settings.drift) + settings.executor.flags()
    if settings.kill_at:
        cmd += ["--kill-at", settings.kill_at]
    return cmd


def pid_runs_job(pid: int | None, job_id: str) -> bool:
    """True when ``pid`` is alive and (where ``/proc`` exists) is the worker of ``job_id``."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.exists():
        return True
    try:
        text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1]
    except (OSError, IndexError):
        return False
    return job_id in text and "tmu_core.forget.worker" in text and state != "Z"


class _Adopted:
    """A worker started by an earlier service process: polled by pid instead of by ``Popen``."""

    def __init__(self, pid: int, job_id: str) -> None:
        self.pid, self.job_id = pid, job_id

    def poll(self) -> int | None:
        return None if pid_runs_job(self.pid, self.job_id) else -1

    def terminate(self) -> None:
        try:
            os.kill(self.pid, 15)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.monotonic() + (timeout or 0)
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        return -1


class Dispatcher:
    """Starts queued jobs in worker processes and recovers jobs whose worker died.

    Args:
        workspace: the workspace whose state database holds the queue.
        settings: how to start workers.
    """

    def __init__(self, workspace: Workspace, settings: WorkerSettings | None = None) -> None:
        self.workspace = workspace
        self.settings = settings or WorkerSettings()
        self.jobs = JobStore(workspace.state_db)
        self._procs: dict[str, object] = {}
        self._resume_at: dict[str, float] = {}
        self._purged_at = 0.0
        self._actors_stale = True  # the Ray executor's actors may hold what the host no longer has
        self._purger: threading.Thread | None = None
        self._purge_after = 0.0
        self._orphans_due = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Recover jobs a dead worker left ``running``, then start the dispatch thread."""
        self.recover_orphans()
        self._thread = threading.Thread(target=self._loop, name="tmu-dispatcher", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        """True while the dispatch thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        """Look at the queue now instead of at the next poll."""
        self._wake.set()

    def stop(self, wait_s: float | None = 0.0) -> None:
        """Stop dispatching. Running workers go on (the next service adopts them) unless ``wait_s`` is given:
        then wait that long for them and terminate those still running."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if wait_s is None:
            return
        deadline = time.monotonic() + wait_s
        for job_id, proc in list(self._procs.items()):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))  # type: ignore[attr-defined]
            except subprocess.TimeoutExpired:
                logger.warning("terminating worker of job=%s at service stop", job_id)
                proc.terminate()  # type: ignore[attr-defined]
                proc.wait(timeout=10)  # type: ignore[attr-defined]
        self._reap()

    def running_workers(self) -> dict[str, int]:
        """Job id -> pid of the workers this dispatcher watches."""
        return {job_id: proc.pid for job_id, proc in self._procs.items()}  # type: ignore[attr-defined]

    def recover_orphans(self) -> None:
        """Adopt live workers of ``running`` jobs; recover the jobs whose worker is gone."""
        for job in self.jobs.list(state="running", limit=10_000):
            if job.merged_into is not None or job.id in self._procs or job.id in self._resume_at:
                continue
            if pid_runs_job(job.worker_pid, job.id):
                logger.info("adopting live worker pid=%s of job=%s", job.worker_pid, job.id)
                self._procs[job.id] = _Adopted(job.worker_pid, job.id)  # type: ignore[arg-type]
            else:
                self._recover(job, f"the worker (pid {job.worker_pid}) was gone when the service started")

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._reap()
                if self._orphans_due:
                    self._orphans_due = False
                    self.recover_orphans()
                self._start_resumes()
                self._start_queued()
                self._housekeeping()
            except Exception:  # the thread must survive a bad job; the error is in the log
                logger.exception("dispatcher pass failed")
            self._wake.wait(self.settings.poll_s)
            self._wake.clear()

    def _start_queued(self) -> None:
        for model in self.jobs.queued_models():
            for kind in ("forget", "retrain"):
                if self._stop.is_set():
                    return
                if kind == "forget" and self._held(model):
                    continue
                job = self.jobs.claim_next(model, kind)
                if job is None:
                    continue
                try:
                    self._spawn(job)
                except OSError as err:
                    logger.exception("cannot start a worker for job=%s", job.id)
                    self.jobs.finish(job.id, "failed", reason=f"the worker process could not be started: {err}")

    def _held(self, model: str) -> bool:
        """Forget jobs of ``model`` wait while its retrain is queued or running, when its lineage is past the hold
        level or one of them was held for that retrain (its version would have passed it, ``JobStore.hold``)."""
        from tmu_core.state.versions import VersionRegistry

        active = self.jobs.active_retrain(model)
        if active is None:
            return False
        if active.id in self.jobs.held_for(model):
            return True
        serving = VersionRegistry(self.workspace.state_db).serving(model)
        return serving is not None and self.settings.drift.holds(serving.metrics.get("drift"))

    def _start_resumes(self) -> None:
        now = time.monotonic()
        for job_id, due in list(self._resume_at.items()):
            if due > now or job_id in self._procs or self._stop.is_set():
                continue
            del self._resume_at[job_id]
            job = self.jobs.get(job_id)
            if job.state == "running":
                logger.info("resuming job=%s at step %s", job_id, job.step)
                self._spawn(job)

    def _housekeeping(self) -> None:
        """Wipe what no model needs any more; purge versions past their retention (on a schedule)."""
        from tmu_core.forget.wipe import sweep

        if sweep(self.workspace).wiped:
            self._actors_stale = True
        if (self.settings.executor.kind == "ray" and self._actors_stale and time.monotonic() >= self._purge_after
                and not (self._purger and self._purger.is_alive())):
            # In its own thread: an unreachable cluster must not hold up the queue.
            self._actors_stale = False
            busy = {self.jobs.get(job_id).model for job_id in self._procs}
            self._purger = threading.Thread(target=self._purge_actors, args=(busy,), name="tmu-actor-purge",
                                            daemon=True)
            self._purger.start()
        if time.monotonic() - self._purged_at >= self.settings.purge_every_s:
            from tmu_core.service.rollback import purge_due

            purge_due(self.workspace, self.settings.retention_s)
            self._schedule_retrains()
            self._purged_at = time.monotonic()

    def _purge_actors(self, busy: set[str]) -> None:
        """Make the Ray actors drop what the host no longer has: wiped pixels, a superseded version's weights and
        state. Models with a job running are left for a later pass (their actor is in use); after a failure it
        is tried again 30 s later."""
        from tmu_core.forget.ray_executor import purge_actors
        from tmu_core.index import TrainingIndex
        from tmu_core.serving.export import sha256_file
        from tmu_core.state.store import StateStore

        try:
            store, serving = StateStore.open(self.workspace), {}
            for model in store.versions.models():
                record = store.versions.serving(model)
                if model not in busy:
                    serving[model] = sha256_file(record.checkpoint) if record and record.checkpoint.is_file() else None
            with TrainingIndex.open(self.workspace.index_dir) as index:
                live = index.ids("train") + index.ids("test")
            dropped = purge_actors(self.settings.executor, self.workspace, live, serving)
        except Exception:
            logger.exception("could not purge the Ray actors; trying again in 30 s")
            self._actors_stale, self._purge_after = True, time.monotonic() + 30.0
            return
        if dropped:
            logger.info("Ray actors dropped %s", dropped)
        if busy:
            self._actors_stale = True

    def _schedule_retrains(self) -> None:
        """Queue the retrain of each model whose serving version is due by the drift policy (its age limit)."""
        from tmu_core.forget.drift import schedule_if_due
        from tmu_core.state.store import StateStore

        if not self.settings.drift.enabled:
            return
        store = StateStore.open(self.workspace)
        for model in store.versions.models():
            serving = store.versions.serving(model)
            if serving is not None and serving.kind == "approximate":
                schedule_if_due(store, model, serving.metrics.get("drift"), self.settings.drift)

    def _spawn(self, job: Job) -> None:
        log_path = worker_log(self.workspace, job.id)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = worker_command(self.workspace, job.id, self.settings)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.jobs.set_fields(job.id, worker_pid=proc.pid)
        self._procs[job.id] = proc
        logger.info("started worker pid=%d job=%s model=%s log=%s", proc.pid, job.id, job.model, log_path)

    def _reap(self) -> None:
        for job_id, proc in list(self._procs.items()):
            code = proc.poll()  # type: ignore[attr-defined]
            if code is None:
                continue
            del self._procs[job_id]
            self._actors_stale = True  # what serves may have changed
            job = self.jobs.get(job_id)
            if job.state == "running":
                step = job.step or "starting"
                self._recover(job, f"the worker exited with code {code} during step '{step}'")
            else:
                logger.info("worker of job=%s exited with code %s (job %s)", job_id, code, job.state)

    def _recover(self, job: Job, reason: str) -> None:
        """A job whose worker is gone: resume it after its commit, else undo it and queue it again."""
        from tmu_core.forget.commit import FORWARD_STEPS, is_committed
        from tmu_core.forget.undo import fail_or_requeue
        from tmu_core.state.locks import model_lock
        from tmu_core.state.store import StateStore

        if job.step in FORWARD_STEPS or is_committed(StateStore.open(self.workspace), job):
            logger.warning("job=%s model=%s: %s after its commit; resuming it", job.id, job.model, reason)
            self._resume_at[job.id] = time.monotonic() + self.settings.resume_delay_s
            return
        logger.warning("job=%s model=%s: %s; undoing it", job.id, job.model, reason)
        try:
            with model_lock(self.workspace, job.model, blocking=True, timeout_s=60.0, holder=f"recovery {job.id}"):
                fail_or_requeue(self.workspace, self.jobs.get(job.id), reason + "; no change was committed",
                                SwapSettings(), self.settings.max_attempts)
        except Exception:  # recovery must not kill the dispatcher; try again on a later pass
            logger.exception("recovery of job=%s failed; retrying later", job.id)
            self._orphans_due = True
