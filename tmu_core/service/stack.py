"""Start and stop the whole serving stack of a workspace: TorchServe (or Ray Serve), then the management extension.

TorchServe loads, for each model, the version the registry marks ``serving`` (so a rollback survives a restart),
or the highest-numbered archive for a model the registry does not know. ``start_stack`` starts only what is not
running, so it is also the restart step after a crash: a TorchServe that died is started again (with each model's
serving version) while the extension keeps running, a dead extension is started beside a running TorchServe, and
a model missing from a running TorchServe is registered. The extension starts only once every model's workers are
READY; if anything fails, whatever this call started is stopped again.

With Ray Serve as the backend (``start_ray_stack``), the same versions are deployed as Serve applications on an
existing Ray cluster, ``<serve_dir>/backend.json`` tells every later swap to go there, and no TorchServe starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tmu_core.config import Workspace
from tmu_core.errors import ModelNotFoundError, TmuError
from tmu_core.service import server as extension
from tmu_core.service.server import ServiceConfig, ServiceInfo
from tmu_core.serving.archive import latest_archives
from tmu_core.serving.backend import BackendSpec, read_backend, write_backend
from tmu_core.serving.torchserve import ServerStatus, TorchServe, TorchServeConfig
from tmu_core.state.versions import VersionRegistry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackStatus:
    """Where the stack answers, which version of each model TorchServe serves, and what this call started.

    Attributes:
        torchserve: TorchServe's status.
        extension: where the extension answers (None when it was not asked for and does not run).
        versions: ``{model: version}`` that TorchServe serves by default.
        started: the parts this call started, of ``"torchserve"``, ``"extension"`` and ``"model:<name>"``
            (a model registered into a TorchServe that was already running); empty when everything ran.
    """

    torchserve: ServerStatus
    extension: ServiceInfo | None
    versions: dict[str, int]
    started: tuple[str, ...] = ()


def archives_to_serve(workspace: Workspace, models: list[str] | None = None) -> dict[str, tuple[int, Path]]:
    """``{model: (version, archive)}``: the registry's serving version, else the newest archive in the store.

    Raises:
        ModelNotFoundError: no archive for a named model, or none at all.
    """
    chosen = latest_archives(workspace.model_store, models)
    registry = VersionRegistry(workspace.state_db)
    for name in list(chosen):
        record = registry.serving(name)
        if record is not None and Path(record.archive).is_file():
            chosen[name] = (record.version, Path(record.archive))
    if not chosen:
        raise ModelNotFoundError(f"no <model>-v<N>.mar archives in {workspace.model_store}; "
                                 "run tmu-admin package first")
    return chosen


def running_server(workspace: Workspace, config: TorchServeConfig) -> TorchServe | None:
    """The workspace's TorchServe when it runs, with the settings it was started with; else None.

    ``config`` is used only when the server's own ``config.properties`` is missing.
    """
    server = TorchServe(workspace, config)
    if server.pid() is None:
        return None
    if server.config_path.is_file():
        written = TorchServeConfig.from_properties(server.config_path, workspace.model_store)
        if written != config:
            logger.info("torchserve already runs with %s; keeping its settings", server.config_path)
        server = TorchServe(workspace, written)
    return server


def start_stack(workspace: Workspace, config: TorchServeConfig, models: list[str] | None = None,
                with_extension: bool = True, timeout: float = 120.0,
                service: ServiceConfig | None = None) -> StackStatus:
    """Start whatever part of the stack is not running, wait until every model is READY, then the extension.

    Args:
        workspace: the workspace to serve.
        config: TorchServe settings for a server started now (a running one keeps its own).
        models: the models to serve (default: every archived model).
        with_extension: also start the management extension when it does not run.
        timeout: seconds to wait for each model's worker to become READY.
        service: settings of an extension started now.

    Raises:
        ModelNotFoundError: nothing to serve. ServerError: a server did not start or a model did not load.
    """
    chosen = archives_to_serve(workspace, models)
    server = running_server(workspace, config)
    started: list[str] = []
    if server is None:
        server = TorchServe(workspace, config)
        server.start([f"{name}={path.name}" for name, (_, path) in sorted(chosen.items())])
        started.append("torchserve")
    try:
        if "torchserve" not in started:
            started += _register_missing(server, chosen, timeout)
        for name in sorted(chosen):
            server.wait_ready(name, timeout)
        info = extension.status(workspace)
        if with_extension and info is None:
            info = extension.start(workspace, service)
            started.append("extension")
    except TmuError:
        if "torchserve" in started:
            server.stop()
        raise
    versions = _served_versions(server, chosen) if "torchserve" not in started else \
        {name: version for name, (version, _) in chosen.items()}
    logger.info("stack home=%s models=%s started=%s", workspace.home, sorted(chosen), started or "nothing")
    return StackStatus(server.status(), info, versions, tuple(started))


def _register_missing(server: TorchServe, chosen: dict[str, tuple[int, Path]], timeout: float) -> list[str]:
    """Register, into a running TorchServe, each chosen model it does not serve; returns ``model:<name>`` each."""
    client = server.management(timeout=timeout)
    present = {entry.name for entry in client.list_models()}
    registered = []
    for name in sorted(set(chosen) - present):
        client.register(chosen[name][1].name, synchronous=True, timeout=timeout)
        logger.info("registered model=%s version=%d into the running torchserve", name, chosen[name][0])
        registered.append(f"model:{name}")
    return registered


def _served_versions(server: TorchServe, chosen: dict[str, tuple[int, Path]]) -> dict[str, int]:
    """The default version a running TorchServe answers with, for each chosen model."""
    client = server.management()
    versions = {}
    for name in chosen:
        described = client.describe(name)
        versions[name] = int(described[0].version) if described and described[0].version.isdigit() \
            else chosen[name][0]
    return versions


@dataclass(frozen=True)
class RayStackStatus:
    """Where Ray Serve answers, which version of each model its replicas serve, and what this call started.

    Attributes:
        url: Ray Serve's HTTP root (predictions at ``<url>/predictions/<model>``).
        token_file: the file holding the bearer token clients send.
        extension: where the extension answers (None when it was not asked for and does not run).
        versions: ``{model: version}`` that every replica answered with.
        replicas: ``{model: {replica id: node id}}``.
        started: ``"model:<name>"`` for each model deployed now, and ``"extension"``.
    """

    url: str
    token_file: Path
    extension: ServiceInfo | None
    versions: dict[str, int]
    replicas: dict[str, dict[str, str]]
    started: tuple[str, ...] = ()


def start_ray_stack(workspace: Workspace, spec: BackendSpec, models: list[str] | None = None,
                    with_extension: bool = True, service: ServiceConfig | None = None) -> RayStackStatus:
    """Deploy each model's serving version on Ray Serve (where it does not serve already), record the backend in
    ``<serve_dir>/backend.json``, then start the extension when it does not run.

    Raises:
        ModelNotFoundError: nothing to serve. ServerError: the cluster is unreachable or a rollout failed.
    """
    from tmu_core.serving.backend import TOKEN_FILE
    from tmu_core.serving.ray_control import RayServeBackend

    if spec.kind != "ray":
        raise TmuError(f"start_ray_stack needs a ray backend, got kind={spec.kind!r}")
    chosen = archives_to_serve(workspace, models)
    workspace.ensure_dirs()
    backend = RayServeBackend(workspace, spec)
    write_backend(workspace.serve_dir, spec)
    started, replicas = [], {}
    for name, (version, archive) in sorted(chosen.items()):
        if backend.default_version(name) == str(version):  # already served: keep its replicas
            check = backend.wait_replicas(name, version, backend.timeout_s)
        else:
            backend.stage(name, version, archive)
            check = backend.deploy(name, version)
            started.append(f"model:{name}")
        replicas[name] = check.nodes
    info = extension.status(workspace)
    if with_extension and info is None:
        info = extension.start(workspace, service)
        started.append("extension")
    logger.info("ray stack home=%s models=%s started=%s", workspace.home, sorted(chosen), started or "nothing")
    return RayStackStatus(spec.url, workspace.serve_dir / TOKEN_FILE, info,
                          {name: version for name, (version, _) in chosen.items()}, replicas, tuple(started))


def stop_stack(workspace: Workspace, server: TorchServe) -> tuple[bool, bool]:
    """Stop the extension (new forget requests stop first), then TorchServe, or with Ray Serve as the backend,
    delete the workspace's Serve applications and ``backend.json`` (the cluster itself keeps running).

    Returns:
        (extension was running, TorchServe or the Ray Serve applications were running).
    """
    ext_was_running = extension.stop(workspace)
    spec = read_backend(workspace.serve_dir)
    if spec.kind == "ray":
        return ext_was_running, _stop_ray(workspace, spec)
    ts_was_running = server.stop()
    return ext_was_running, ts_was_running


def _stop_ray(workspace: Workspace, spec: BackendSpec) -> bool:
    from tmu_core.serving.ray_control import RayServeBackend

    backend = RayServeBackend(workspace, spec)
    deployed = [backend.undeploy(name) for name in sorted(latest_archives(workspace.model_store))]
    write_backend(workspace.serve_dir, BackendSpec())  # no file: TorchServe again
    return any(deployed)
