"""The Ray Serve serving backend, as the extension host drives it: stage, deploy, check, retire.

Each model is one Serve application ``tmu-<model>`` at ``/predictions/<model>`` (TorchServe's path). The swap
actions of :mod:`tmu_core.service.swap` map onto it:

* ``register``: put the version's archive into the cluster's archive store (nothing is served yet);
* ``set_default``: deploy the version; Serve rolls it out with surge (new replicas load it before old ones stop),
  then this backend asks until every replica that Serve runs for the model has answered with the new version;
* ``drain``: wait until no replica of the old version is left (a stopping replica finishes its requests first);
* ``unregister``: drop the version's archive from the store (its replicas are gone, and their files with them).

A rolling update rather than an in-place ``reconfigure``: Ray Serve 2.60 gives every ``serve.run`` a new code
version, so a changed ``user_config`` restarts the replicas anyway; only the declarative config (REST API, which
needs the dashboard) would reconfigure in place. The rollout with surge keeps the old replicas serving until the
new ones are ready, and it leaves no replica that could still answer with the old version.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from tmu_core.config import Workspace
from tmu_core.errors import CheckpointError, ServerError
from tmu_core.serving.backend import BackendSpec, load_or_create_token

logger = logging.getLogger(__name__)

APP_PREFIX = "tmu-"
REPLICA_PREFIX = "SERVE_REPLICA::"


@dataclass(frozen=True)
class ReplicaCheck:
    """What each running replica of a model answered: ``{replica id: version}``, where it runs
    (``{replica id: node id}``), and how long the check took."""

    model: str
    version: int
    answers: dict[str, str]
    nodes: dict[str, str]
    seconds: float


def app_name(model: str) -> str:
    """The Serve application serving ``model``."""
    return f"{APP_PREFIX}{model}"


def route(model: str) -> str:
    """The HTTP path of ``model``'s predictions (TorchServe's)."""
    return f"/predictions/{model}"


def join_cluster(address: str | None, namespace: str) -> bool:
    """Connect this process to the Ray cluster at ``address`` as a driver, with usage stats off; False when it was
    connected already (that connection is then used, and left to whoever opened it).

    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps a loopback cluster's driver on 127.0.0.1 on hosts that also
    have a routable address (there Ray otherwise binds that address and hangs); both are set only when unset.

    Raises:
        ServerError: the cluster cannot be reached.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    host = (address or "").rsplit(":", 1)[0]
    extra = {"_node_ip_address": "127.0.0.1"} if host in ("127.0.0.1", "localhost") else {}
    try:
        ray.init(address=address, namespace=namespace, log_to_driver=False, **extra)
    except (ConnectionError, RuntimeError) as err:
        raise ServerError(f"cannot connect to the Ray cluster at {address}: {err}") from err
    return True


def start_http(spec: BackendSpec) -> None:
    """Start Serve's HTTP proxy on ``spec.http_host:spec.http_port``, on the head node only.

    One proxy: every node of a one-machine test cluster has the same address, so a proxy per node would fight
    over the port. A Serve already running on the cluster keeps its own HTTP settings.

    Raises:
        ServerError: nothing answers at ``spec.url`` within 60 s (a Serve that runs on another port).
    """
    from ray import serve

    serve.start(proxy_location="HeadOnly", http_options={"host": spec.http_host, "port": spec.http_port})
    deadline, last = time.monotonic() + 60.0, ""
    while time.monotonic() < deadline:
        try:
            requests.get(f"{spec.url}/-/healthz", timeout=5)
            return
        except requests.RequestException as err:
            last = str(err)
            time.sleep(0.2)
    raise ServerError(f"Ray Serve runs on the cluster at {spec.address} but nothing answers at {spec.url} ({last}); "
                      "a Serve started earlier keeps its own HTTP port: pass that one (--http-port)")


class RayServeBackend:
    """The swap actions of a workspace whose models are served by Ray Serve."""

    def __init__(self, workspace: Workspace, spec: BackendSpec, timeout_s: float = 300.0) -> None:
        if spec.kind != "ray":
            raise ServerError(f"RayServeBackend needs a ray backend spec, got kind={spec.kind!r}")
        self.workspace, self.spec, self.timeout_s = workspace, spec, timeout_s
        self.token = load_or_create_token(workspace.serve_dir)
        join_cluster(spec.address, spec.namespace)
        start_http(spec)  # a no-op when Serve runs; without it there is no proxy to ask

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _store(self, create: bool = False) -> Any:
        from tmu_core.serving.ray_serve import store_actor

        return store_actor(self.spec.namespace, create=create)

    def stage(self, model: str, version: int, archive: Path) -> int:
        """Put ``archive`` into the archive store as ``model`` version ``version``; its size in bytes.

        Raises:
            CheckpointError: the archive is missing or not a zip file.
        """
        import ray

        if not zipfile.is_zipfile(archive):
            raise CheckpointError(f"cannot serve {model} version {version}: {archive} is missing or not a .mar")
        size = ray.get(self._store(create=True).put.remote(model, int(version), Path(archive).read_bytes()),
                       timeout=self.timeout_s)
        logger.info("staged model=%s version=%d bytes=%d", model, version, size)
        return size

    def staged(self, model: str) -> dict[int, int]:
        """``{version: bytes}`` of the archives the store holds for ``model`` (empty without a store)."""
        import ray

        try:
            store = self._store()
        except ValueError:
            return {}
        return ray.get(store.versions.remote(model), timeout=self.timeout_s)

    def deploy(self, model: str, version: int) -> ReplicaCheck:
        """Serve ``version`` on every replica (staging its archive if the store lacks it) and check it.

        Raises:
            ServerError: the rollout failed or did not finish in time, or a replica did not answer.
        """
        from ray import serve

        from tmu_core.serving.ray_serve import build_app

        if int(version) not in self.staged(model):
            self.stage(model, version, self.workspace.archive_path(model, version))
        started = time.perf_counter()
        _bounded(lambda: _run_fresh(lambda: serve.run(build_app(model, version, self.token, self.spec),
                                                      name=app_name(model), route_prefix=route(model))),
                 self.timeout_s, f"deploying {model} version {version} on Ray Serve")
        check = self.wait_replicas(model, version, self.timeout_s)
        logger.info("model=%s version=%d on %d replica(s) in %.1fs", model, version, len(check.answers),
                    time.perf_counter() - started)
        return check

    def replica_ids(self, model: str) -> set[str]:
        """Ids of the replicas Serve runs for ``model`` (starting, running and stopping ones)."""
        import ray

        from tmu_core.serving.ray_serve import DEPLOYMENT

        prefix = f"{REPLICA_PREFIX}{app_name(model)}#{DEPLOYMENT}#"
        return {entry["name"][len(prefix):] for entry in ray.util.list_named_actors(all_namespaces=True)
                if entry["name"].startswith(prefix)}

    def identify(self, model: str) -> dict[str, str] | None:
        """One replica's ``{"model", "version", "replica", "node"}``; None when no application serves ``model``."""
        try:
            answer = requests.get(f"{self.spec.url}{route(model)}", headers=self.headers, timeout=10)
        except requests.RequestException as err:
            raise ServerError(f"Ray Serve at {self.spec.url} did not answer: {err}") from err
        if answer.status_code == 404:
            return None
        if answer.status_code != 200:
            raise ServerError(f"Ray Serve answered {answer.status_code} for {route(model)}: {answer.text[:200]}")
        return answer.json()

    def wait_replicas(self, model: str, version: int, timeout_s: float) -> ReplicaCheck:
        """Ask until every replica Serve runs for ``model`` has answered with ``version`` (at most ``timeout_s``).

        A replica keeps its version for life (a new version means new replicas), so one answer per replica id
        settles it; a stopping replica gets no new requests and is waited for until it is gone.

        Raises:
            ServerError: some replica had not answered with ``version`` in time (the message lists them).
        """
        started = time.perf_counter()
        deadline, answers, nodes, ids = started + timeout_s, {}, {}, set()
        with ThreadPoolExecutor(max_workers=8) as pool:
            while time.perf_counter() < deadline:
                for found in pool.map(lambda _: self._identify_quietly(model), range(8)):
                    if found is not None:
                        answers[found["replica"]], nodes[found["replica"]] = found["version"], found["node"]
                ids = self.replica_ids(model)
                if ids and all(answers.get(rid) == str(version) for rid in ids):
                    return ReplicaCheck(model, int(version), {rid: answers[rid] for rid in ids},
                                        {rid: nodes[rid] for rid in ids}, time.perf_counter() - started)
                time.sleep(0.05)
        behind = {rid: answers.get(rid, "no answer") for rid in sorted(ids) if answers.get(rid) != str(version)}
        raise ServerError(f"after {timeout_s:.0f}s, replicas of {model} not serving version {version}: {behind}")

    def _identify_quietly(self, model: str) -> dict[str, str] | None:
        try:
            return self.identify(model)
        except ServerError:
            return None

    # The swap seam (tmu_core.service.swap.SwapBackend).

    def register(self, model: str, version: int, archive: Path, settings: Any) -> None:
        """Stage the archive unless the store holds it already; serving it is :meth:`set_default`'s job."""
        if int(version) in self.staged(model):
            logger.info("model=%s version=%d already staged", model, version)
            return
        self.stage(model, version, archive)

    def set_default(self, model: str, version: int) -> None:
        """Deploy ``version`` and check that every replica answers with it."""
        self.deploy(model, version)

    def drain(self, model: str, version: int, settings: Any) -> float:
        """Wait until no replica serves ``version`` (at most ``drain_timeout_s``), then ``drain_grace_s``."""
        started = time.perf_counter()
        served = self.default_version(model)
        if served is not None and served != str(version):
            try:
                self.wait_replicas(model, int(served), settings.drain_timeout_s)
            except ServerError as err:
                logger.warning("model=%s version=%d drain: %s", model, version, err)
        time.sleep(settings.drain_grace_s)
        return time.perf_counter() - started

    def unregister(self, model: str, version: int) -> bool:
        """Drop ``version``'s archive from the store; False when the store did not hold it.

        Raises:
            ServerError: ``version`` is what the replicas serve (make another version the default first).
        """
        import ray

        if self.default_version(model) == str(version):
            raise ServerError(f"cannot unregister {model} version {version}: Ray Serve serves it; make another "
                              "version the default first")
        if int(version) not in self.staged(model):
            return False
        dropped = ray.get(self._store().drop.remote(model, int(version)), timeout=self.timeout_s)
        logger.info("unregistered model=%s version=%d", model, version)
        return bool(dropped)

    def registered_versions(self, model: str) -> set[str]:
        """Versions staged in the store, and the one served."""
        served = self.default_version(model)
        return {str(v) for v in self.staged(model)} | ({served} if served is not None else set())

    def default_version(self, model: str) -> str | None:
        """The version the replicas answer with, or None when no application serves ``model``."""
        found = self.identify(model)
        return None if found is None else str(found["version"])

    def pending_requests(self, model: str, version: int) -> int | None:
        """Serve does not report queues per version: None, as TorchServe without ``jobQueueStatus``."""
        return None

    def undeploy(self, model: str) -> bool:
        """Delete ``model``'s application and its staged archives; False when it was not deployed."""
        import ray
        from ray import serve

        deployed = app_name(model) in serve.status().applications
        if deployed:
            serve.delete(app_name(model))
        for version in self.staged(model):
            ray.get(self._store().drop.remote(model, version), timeout=self.timeout_s)
        return deployed


def _run_fresh(action: Any) -> Any:
    """Run ``action`` with Python's ``random`` freshly seeded from the OS, then restore the caller's state.

    ``serve.run`` names each rollout with a string drawn from ``random``; a process that seeded it (a forget job
    calls ``seed_everything``) would draw the same name every time, and Serve would take the new version for the
    one it already runs and restart nothing. :meth:`RayServeBackend.wait_replicas` would catch that, but late.
    """
    state = random.getstate()
    random.seed()
    try:
        return action()
    finally:
        random.setstate(state)


def _bounded(action: Any, timeout_s: float, what: str) -> None:
    """Run ``action`` in a thread and wait at most ``timeout_s`` (``serve.run`` has no timeout of its own).

    Raises:
        ServerError: ``action`` raised, or had not returned in time (it keeps running; Serve goes on rolling out).
    """
    errors: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as err:  # noqa: BLE001 - handed to the caller below
            errors.append(err)

    thread = threading.Thread(target=run, name="tmu-serve-run", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise ServerError(f"{what} did not finish within {timeout_s:.0f}s (are there resources for the replicas?)")
    if errors:
        raise ServerError(f"{what} failed: {errors[0]}") from errors[0]


__all__ = ["RayServeBackend", "ReplicaCheck", "app_name", "join_cluster", "route", "start_http"]
