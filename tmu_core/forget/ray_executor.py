"""Forget jobs' compute on a Ray cluster: one warm, detached actor per model (:class:`ModelActor`).

The worker process on the extension host still runs the job and stays the single writer (state database, index,
audit, model store); it hands the compute steps to the model's actor (:mod:`tmu_core.forget.executor`):

- ``prepare``: the host sends the serving version's checkpoint (only when the actor holds other weights) and the
  pixels of the version's training and test ids the actor lacks, through Ray's object store; the actor builds
  the method's prepared state in memory, or finds it there (a warm actor skips loading and preparation);
- ``unlearn``: the actor runs the method and returns the new weights (a state_dict) and the method's details;
- ``evaluate``: the actor scores both models and returns the metrics, then drops the forget set's pixels and
  the job's model: it never keeps a copy of the samples a job forgets past that job's compute;
- ``prepare_next``: the actor loads the new version's weights, updates the prepared state from the previous
  version's (incrementally, as the local executor does) and drops the previous version's weights and state.

Why the object store and not shared storage: the index lives on the extension host and nothing else is assumed
to read it (a KubeRay pod has no volume in common with the host by default); the pixels of a version's ids
travel once per actor (15 MB for 5,000 CIFAR-10 images), then only the ids it lacks. An actor keeps what it was
sent in memory only: nothing is written on the node.

The actor is named ``tmu:<workspace>:<model>`` in namespace ``tmu-serve`` and detached, so it outlives the
worker process that created it; it asks for ``ray_num_cpus`` CPUs (its torch threads) and a GPU when the
cluster has one (``ray_num_gpus``). When its node dies, calls to it raise, the step fails, and the pipeline
undoes the job and queues it again; the next attempt creates the actor afresh on a live node.

The cluster's nodes need tmu-serve installed (the same version as the host): the actor runs this module.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from typing import Any

import torch

from tmu_core.errors import ServerError
from tmu_core.serving.export import sha256_file

logger = logging.getLogger(__name__)

NAMESPACE = "tmu-serve"


def actor_name(workspace: Any, model: str) -> str:
    """The actor's name: the model's, qualified by the workspace (clusters may serve several)."""
    home = hashlib.sha256(str(os.path.realpath(workspace.home)).encode()).hexdigest()[:12]
    return f"tmu:{home}:{model}"


def connect(address: str) -> bool:
    """Join the cluster at ``address`` in this module's namespace (see
    :func:`tmu_core.serving.ray_control.join_cluster`); False when this process was connected already."""
    from tmu_core.serving.ray_control import join_cluster

    return join_cluster(address, NAMESPACE)


class ModelActor:
    """A model's warm compute: its version's weights, prepared state and pixels (see the module docstring)."""

    def __init__(self, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        self.sha: str | None = None
        self.model: Any = None
        self.meta: Any = None
        self.method: Any = None
        self.method_key: str | None = None
        self.pixels: dict[str, torch.Tensor] = {}
        self.labels: dict[str, int] = {}
        self.jobs: dict[str, Any] = {}

    # -- what the host asks before it sends anything
    def holds(self, sha: str, ids: list[str]) -> dict[str, Any]:
        """Whether the actor holds the weights ``sha``, and which of ``ids`` it has no pixels of."""
        return {"weights": self.sha == sha, "missing": [i for i in ids if i not in self.pixels],
                "node": _node_id()}

    def prepare(self, task: dict[str, Any], checkpoint: bytes | None, pixels: Any) -> dict[str, Any]:
        """Hold ``task``'s version and its prepared state; returns the seconds and how it went."""
        from tmu_core.device import seed_everything

        started = time.perf_counter()
        _pause(task, "prepare")
        seed_everything(task["seed"])  # as the worker does at the start of a job
        self._take(task, checkpoint, pixels)
        method = self._method(task)
        data = self._data(task, (), task["train_ids"])
        method.prepare(self.model, self.meta, data, self._device(), None)
        return {"seconds": time.perf_counter() - started, "went": getattr(method, "last_prepare", None),
                "node": _node_id()}

    def unlearn(self, task: dict[str, Any]) -> dict[str, Any]:
        """Run the method on ``task``'s forget set; returns the new weights and the outcome's details."""
        _pause(task, "unlearn")
        try:
            data = self._data(task, task["forget_ids"], task["retain_ids"])
            outcome = self._method(task).unlearn(self.model, self.meta, data, self._device(), None)
        except BaseException:
            self._drop_job(task)
            raise
        self.jobs[task["job"]] = (data, outcome)
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in outcome.model.state_dict().items()}, buffer)
        return {"state_dict": buffer.getvalue(), "details": outcome.details, "seconds": outcome.seconds,
                "predicted_hard_ids": outcome.predicted_hard_ids, "node": _node_id()}

    def evaluate(self, task: dict[str, Any]) -> Any:
        """Score the job's model (kept since ``unlearn``); then drop it and the forget set's pixels."""
        from tmu_core.forget.report import measure

        try:
            _pause(task, "evaluate")
            data, outcome = self.jobs[task["job"]]
            eval_ids = list(task["eval_ids"])
            source = self._source(eval_ids)
            hard = outcome.predicted_hard_ids
            return measure(self.model, outcome.model, data.tensors("forget"), (source.load(eval_ids),
                           source.labels(eval_ids)), self._device(), None if hard is None else len(hard),
                           task["mia_alpha"])
        finally:
            self._drop_job(task)

    def prepare_next(self, task: dict[str, Any], checkpoint: bytes) -> dict[str, Any]:
        """Move to the new version of ``task``: its weights, and its prepared state updated from the old one's."""
        started = time.perf_counter()
        parent = getattr(self.method, "prepared", None) if self.method_key == _method_key(task) else None
        self.sha, self.model, self.meta = None, None, None
        self._take(task, checkpoint, None)
        method = self._method(task)
        data = self._data(task, (), task["train_ids"])
        if parent is not None and hasattr(method, "prepare_from"):
            method.prepare_from(parent, self.model, self.meta, data, self._device(), None, task.get("origin"))
        else:
            method.prepare(self.model, self.meta, data, self._device(), None)
        return {"seconds": time.perf_counter() - started, "went": getattr(method, "last_prepare", None),
                "full_reason": getattr(getattr(method, "prepared", None), "info", {}).get("full_reason")}

    def keep_only(self, live_ids: list[str], serving_sha: str | None) -> dict[str, int]:
        """Drop the pixels of every sample not in ``live_ids`` (wiped from the index); then, when anything was
        dropped (the prepared state was built from it) or the weights are not the serving version's
        (``serving_sha``), drop the weights and the prepared state too. Returns what was dropped."""
        dropped = self.drop([i for i in self.pixels if i not in set(live_ids)])
        stale = self.sha is not None and self.sha != serving_sha
        if dropped or stale:
            self.sha = self.model = self.meta = self.method = self.method_key = None
        return {"pixels": dropped, "weights": int(stale)}

    def drop(self, ids: list[str]) -> int:
        """Forget the pixels of ``ids``; returns how many it held."""
        held = [i for i in ids if i in self.pixels]
        for i in held:
            del self.pixels[i], self.labels[i]
        return len(held)

    # -- helpers
    def _take(self, task: dict[str, Any], checkpoint: bytes | None, pixels: Any) -> None:
        import tempfile

        from tmu_core.train import load_checkpoint

        if pixels is not None:
            ids, images, labels = pixels
            for row, sample in enumerate(ids):
                self.pixels[sample], self.labels[sample] = images[row].clone(), int(labels[row])
        if self.sha != task["sha"]:
            if checkpoint is None:
                raise ServerError(f"actor holds no weights {task['sha'][:12]} and none were sent")
            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, "checkpoint.pt")
                with open(path, "wb") as handle:
                    handle.write(checkpoint)
                self.model, self.meta = load_checkpoint(path, self._device())
            self.sha = task["sha"]
        keep = set(task["train_ids"]) | set(task["twin_ids"]) | set(task["eval_ids"])
        self.drop([i for i in self.pixels if i not in keep])

    def _method(self, task: dict[str, Any]) -> Any:
        from tmu_core.unlearn import get_method

        key = _method_key(task)
        if self.method is None or self.method_key != key:
            self.method, self.method_key = get_method(task["method"], **task["options"]), key
        return self.method

    def _source(self, ids: Any) -> Any:
        from tmu_core.unlearn.data import TensorSource

        ids = list(dict.fromkeys(ids))
        missing = [i for i in ids if i not in self.pixels]
        if missing:
            raise ServerError(f"actor lacks the pixels of {len(missing)} sample(s), e.g. {missing[0]!r}")
        images = torch.stack([self.pixels[i] for i in ids]) if ids else torch.zeros((0, 1, 1, 1), dtype=torch.uint8)
        return TensorSource(ids, images, torch.tensor([self.labels[i] for i in ids], dtype=torch.long))

    def _data(self, task: dict[str, Any], forget: Any, retain: Any) -> Any:
        from tmu_core.unlearn import UnlearnData

        source = self._source(list(forget) + list(retain) + list(task["twin_ids"]))
        return UnlearnData(source, tuple(forget), tuple(retain), tuple(task["twin_ids"]))

    def _drop_job(self, task: dict[str, Any]) -> None:
        self.jobs.pop(task["job"], None)
        self.drop(list(task["forget_ids"]))

    def _device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _method_key(task: dict[str, Any]) -> str:
    import json

    return json.dumps([task["method"], task["options"]], sort_keys=True, default=str)


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _pause(task: dict[str, Any], step: str) -> None:
    """Test hook: sleep at ``step`` of a job's first attempt (``ExecutorSettings.pause_at``)."""
    if task.get("pause_at") == step and task.get("attempt", 0) == 0:
        logger.warning("pausing %.0fs at %s (test hook)", task["pause_s"], step)
        time.sleep(task["pause_s"])


class RayExecutor:
    """Runs a job's compute steps in its model's actor (see the module docstring)."""

    name = "ray"

    def __init__(self, settings: Any, workspace: Any) -> None:
        self.settings, self.workspace = settings, workspace
        self.connected = connect(settings.ray_address)

    def _actor(self, model: str) -> Any:
        import ray

        gpus = self.settings.ray_num_gpus
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        remote = ray.remote(ModelActor).options(
            name=actor_name(self.workspace, model), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
            num_cpus=self.settings.ray_num_cpus, num_gpus=gpus, resources=dict(self.settings.ray_resources),
            max_concurrency=1)
        return remote.remote(int(self.settings.ray_num_cpus))

    def _get(self, ref: Any) -> Any:
        import ray

        return ray.get(ref, timeout=self.settings.ray_timeout_s)

    def _task(self, run: Any, loaded: Any) -> dict[str, Any]:
        name, options = run.job.method()
        return {"job": run.job.id, "attempt": run.job.attempts, "seed": run.config.seed,
                "sha": sha256_file(loaded.source.checkpoint), "method": name,
                "options": options, "train_ids": list(loaded.plan.train_ids), "twin_ids": list(loaded.plan.twin_ids),
                "eval_ids": list(loaded.plan.eval_ids), "forget_ids": list(loaded.forget_ids),
                "retain_ids": list(loaded.retain_ids), "mia_alpha": run.config.mia_alpha,
                "pause_at": self.settings.pause_at, "pause_s": self.settings.pause_s}

    def prepare(self, run: Any, loaded: Any) -> float:
        import ray

        task = self._task(run, loaded)
        actor = self._actor(run.job.model)
        wanted = task["train_ids"] + task["twin_ids"] + task["eval_ids"]
        held = self._get(actor.holds.remote(task["sha"], wanted))
        checkpoint = None if held["weights"] else loaded.source.checkpoint.read_bytes()
        missing = held["missing"]
        pixels = (missing, loaded.index.load(missing), loaded.index.labels(missing)) if missing else None
        logger.info("job=%s: actor %s on node %s: %s weights, %d of %d samples to send", run.job.id,
                    actor_name(self.workspace, run.job.model), held["node"][:12],
                    "has the" if held["weights"] else "sending the", len(missing), len(wanted))
        done = self._get(actor.prepare.remote(task, checkpoint, ray.put(pixels) if pixels else None))
        return float(done["seconds"])

    def unlearn(self, run: Any, loaded: Any) -> Any:
        from tmu_core.forget.pipeline import Unlearned
        from tmu_core.unlearn.base import UnlearnOutcome
        from tmu_core.unlearn.common import copy_model

        out = self._get(self._actor(run.job.model).unlearn.remote(self._task(run, loaded)))
        model = copy_model(loaded.model, run.device)
        model.load_state_dict(torch.load(io.BytesIO(out["state_dict"]), map_location=run.device, weights_only=True))
        details = {**out["details"], "executor": {"kind": "ray", "node": out["node"]}}
        return Unlearned(None, UnlearnOutcome(model=model.eval(), details=details, seconds=out["seconds"],
                                              predicted_hard_ids=out["predicted_hard_ids"]))

    def evaluate(self, run: Any, loaded: Any, unlearned: Any) -> Any:
        return self._get(self._actor(run.job.model).evaluate.remote(self._task(run, loaded)))

    def prepare_ahead(self, run: Any, loaded: Any, unlearned: Any, saved: Any) -> None:
        """None: the actor prepares the new version once it serves (``prepare_next``)."""
        return None

    def prepare_next(self, workspace: Any, job: Any, config: Any, parent: Any) -> dict[str, Any]:
        from tmu_core.forget.artifacts import plan_data
        from tmu_core.forget.executor import next_method, prepared_followup
        from tmu_core.index import TrainingIndex
        from tmu_core.state.store import StateStore

        store = StateStore.open(workspace)
        record = store.versions.get(job.model, job.to_version)
        name, options = next_method(store, job)
        with TrainingIndex.open(workspace.index_dir) as index:
            plan = plan_data(index, config.twin_fraction, config.seed, store.versions.members(job.model, record.version))
        task = {"sha": sha256_file(record.checkpoint), "method": name, "options": options,
                "train_ids": list(plan.train_ids), "twin_ids": list(plan.twin_ids), "eval_ids": list(plan.eval_ids),
                "origin": f"{job.model}:v{job.from_version}"}
        done = self._get(self._actor(job.model).prepare_next.remote(task, record.checkpoint.read_bytes()))
        return {**prepared_followup(done["went"], done["full_reason"], record.version, done["seconds"]),
                "executor": "ray"}

    def close(self) -> None:
        import ray

        if self.connected and ray.is_initialized():
            ray.shutdown()


def purge_actors(settings: Any, workspace: Any, live_ids: list[str], serving: dict[str, str | None]) -> dict:
    """Bring the actors of ``serving``'s models in line with the host: only pixels of ``live_ids``, and only the
    serving version's weights (``serving``: model -> its checkpoint's sha256). A model without an actor holds
    nothing. Returns what each actor dropped.

    Raises:
        whatever Ray raises when the cluster or an actor cannot be reached (the caller tries again later).
    """
    import ray

    connect(settings.ray_address)
    dropped = {}
    for model, sha in serving.items():
        try:
            actor = ray.get_actor(actor_name(workspace, model), namespace=NAMESPACE)
        except ValueError:  # no such actor: nothing held
            continue
        dropped[model] = ray.get(actor.keep_only.remote(live_ids, sha), timeout=30)
    return dropped
