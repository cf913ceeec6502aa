"""Hot swap: register a version, make it default, drain the old one, unregister it, and undo.

The functions here are the serving-backend seam: each dispatches to the workspace's backend, chosen by
``<serve_dir>/backend.json`` (:mod:`tmu_core.serving.backend`; no file means TorchServe). TorchServe's actions
talk to the management API of the workspace's running TorchServe, found from the ``config.properties`` and
``key_file.json`` that :class:`tmu_core.serving.TorchServe` writes into ``workspace.serve_dir``; a new client is
made for each call, so a rotated token is always picked up. Ray Serve's are in
:class:`tmu_core.serving.ray_control.RayServeBackend`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tmu_core.config import Workspace
from tmu_core.errors import ModelNotFoundError, ServerError
from tmu_core.serving import ManagementClient, TorchServe, TorchServeConfig
from tmu_core.serving.backend import read_backend

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwapSettings:
    """Timing of a swap.

    Attributes:
        register_timeout_s: how long a synchronous registration may take (workers starting).
        drain_timeout_s: the longest wait for the old version's queue to empty.
        drain_grace_s: extra wait after the queue is empty, for the batch a worker is still running.
        poll_s: how often the queue is polled while draining.
    """

    register_timeout_s: float = 300.0
    drain_timeout_s: float = 30.0
    drain_grace_s: float = 1.0
    poll_s: float = 0.05


def attach_torchserve(workspace: Workspace) -> TorchServe:
    """The workspace's TorchServe as started by ``TorchServe.start`` (ports and token setting re-read from
    ``<serve_dir>/config.properties``).

    Raises:
        ServerError: no ``config.properties`` in ``workspace.serve_dir`` (TorchServe was never started there).
    """
    path = workspace.serve_dir / "config.properties"
    if not path.is_file():
        raise ServerError(f"no TorchServe config at {path}: start TorchServe for this workspace first "
                          "(tmu-admin serve start)")
    return TorchServe(workspace, TorchServeConfig.from_properties(path, workspace.model_store))


def management(workspace: Workspace) -> ManagementClient:
    """A management client of the workspace's TorchServe, with the current token."""
    return attach_torchserve(workspace).management()


class SwapBackend(Protocol):
    """The swap actions a serving backend offers: the forget pipeline, undo and rollback use only these."""

    def register(self, model: str, version: int, archive: Path, settings: SwapSettings) -> None: ...

    def set_default(self, model: str, version: int) -> None: ...

    def drain(self, model: str, version: int, settings: SwapSettings) -> float: ...

    def unregister(self, model: str, version: int) -> bool: ...

    def registered_versions(self, model: str) -> set[str]: ...

    def default_version(self, model: str) -> str | None: ...

    def pending_requests(self, model: str, version: int) -> int | None: ...


class TorchServeBackend:
    """The swap actions on the workspace's TorchServe, through its management API (the default backend)."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace

    def registered_versions(self, model: str) -> set[str]:
        """Version strings of ``model`` that TorchServe holds (empty when the model is not registered)."""
        return _ts_registered_versions(management(self.workspace), model)

    def default_version(self, model: str) -> str | None:
        """The version ``/predictions/<model>`` answers with, or None when the model is not registered."""
        return _ts_default_version(management(self.workspace), model)

    def pending_requests(self, model: str, version: int) -> int | None:
        """Requests queued for one version (None when TorchServe does not report it)."""
        return _ts_pending_requests(management(self.workspace), model, version)

    def register(self, model: str, version: int, archive: Path, settings: SwapSettings) -> None:
        """Register ``archive`` as ``model`` version ``version`` and wait until a worker is READY.

        Raises:
            ServerError: registration failed or no worker became ready.
        """
        client = management(self.workspace)
        if str(version) in _ts_registered_versions(client, model):
            logger.info("model=%s version=%d already registered", model, version)
            return
        started = time.perf_counter()
        client.register(archive.name, model_name=model, synchronous=True, timeout=settings.register_timeout_s)
        # A synchronous registration can return while the worker is still starting (seen under load): poll.
        deadline = time.perf_counter() + settings.register_timeout_s
        infos = client.describe(model, version)
        while not (infos and infos[0].ready):
            if time.perf_counter() > deadline:
                raise ServerError(f"model {model} version {version} registered but no worker became READY within "
                                  f"{settings.register_timeout_s:.0f}s")
            time.sleep(settings.poll_s * 4)
            infos = client.describe(model, version)
        logger.info("registered model=%s version=%d in %.1fs", model, version, time.perf_counter() - started)

    def set_default(self, model: str, version: int) -> None:
        """Make ``version`` the default and check that TorchServe says so."""
        client = management(self.workspace)
        client.set_default(model, version)
        now = _ts_default_version(client, model)
        if now != str(version):
            raise ServerError(f"set-default of {model} version {version} did not take: default is {now}")
        logger.info("model=%s default version is now %d", model, version)

    def drain(self, model: str, version: int, settings: SwapSettings) -> float:
        """Wait until ``version`` has no queued requests (at most ``drain_timeout_s``), then ``drain_grace_s``.

        Returns:
            Seconds waited.
        """
        client = management(self.workspace)
        started = time.perf_counter()
        deadline = started + settings.drain_timeout_s
        while time.perf_counter() < deadline:
            try:
                pending = _ts_pending_requests(client, model, version)
            except ModelNotFoundError:
                return time.perf_counter() - started
            if not pending:
                break
            time.sleep(settings.poll_s)
        else:
            logger.warning("model=%s version=%d still had queued requests after %.1fs", model, version,
                           settings.drain_timeout_s)
        time.sleep(settings.drain_grace_s)
        return time.perf_counter() - started

    def unregister(self, model: str, version: int) -> bool:
        """Unregister one version; False when it was not registered."""
        client = management(self.workspace)
        if str(version) not in _ts_registered_versions(client, model):
            return False
        client.unregister(model, version)
        logger.info("unregistered model=%s version=%d", model, version)
        return True


def _ts_registered_versions(client: ManagementClient, model: str) -> set[str]:
    try:
        return {info.version for info in client.describe(model, "all")}
    except ModelNotFoundError:
        return set()


def _ts_default_version(client: ManagementClient, model: str) -> str | None:
    try:
        infos = client.describe(model)
    except ModelNotFoundError:
        return None
    return infos[0].version if infos else None


def _ts_pending_requests(client: ManagementClient, model: str, version: int) -> int | None:
    infos = client.describe(model, version)
    status = infos[0].raw.get("jobQueueStatus") if infos else None
    if not isinstance(status, dict) or "pendingRequests" not in status:
        return None
    return int(status["pendingRequests"])


def backend_for(workspace: Workspace) -> SwapBackend:
    """The workspace's serving backend: Ray Serve when ``<serve_dir>/backend.json`` says so, else TorchServe.

    Raises:
        InvalidInputError: ``backend.json`` is unreadable. ServerError: the Ray cluster cannot be reached.
    """
    spec = read_backend(workspace.serve_dir)
    if spec.kind == "ray":
        from tmu_core.serving.ray_control import RayServeBackend

        return RayServeBackend(workspace, spec)
    return TorchServeBackend(workspace)


def registered_versions(client: ManagementClient | SwapBackend, model: str) -> set[str]:
    """Version strings of ``model`` that the backend holds (empty when the model is not registered).

    Args:
        client: a TorchServe management client, or a backend from :func:`backend_for`.
    """
    if isinstance(client, ManagementClient):
        return _ts_registered_versions(client, model)
    return client.registered_versions(model)


def default_version(client: ManagementClient | SwapBackend, model: str) -> str | None:
    """The version ``/predictions/<model>`` answers with, or None when the model is not registered."""
    if isinstance(client, ManagementClient):
        return _ts_default_version(client, model)
    return client.default_version(model)


def pending_requests(client: ManagementClient | SwapBackend, model: str, version: int) -> int | None:
    """Requests queued for one version (None when the backend does not report it)."""
    if isinstance(client, ManagementClient):
        return _ts_pending_requests(client, model, version)
    return client.pending_requests(model, version)


def register(workspace: Workspace, model: str, version: int, archive: Path, settings: SwapSettings) -> None:
    """Register ``archive`` as ``model`` version ``version`` with the workspace's backend (ready to serve).

    Raises:
        ServerError: registration failed or no worker became ready.
    """
    backend_for(workspace).register(model, version, archive, settings)


def set_default(workspace: Workspace, model: str, version: int) -> None:
    """Make ``version`` the default and check that the backend serves it."""
    backend_for(workspace).set_default(model, version)


def drain(workspace: Workspace, model: str, version: int, settings: SwapSettings) -> float:
    """Wait until ``version`` has no queued requests (at most ``drain_timeout_s``), then ``drain_grace_s`` more.

    Returns:
        Seconds waited.
    """
    return backend_for(workspace).drain(model, version, settings)


def unregister(workspace: Workspace, model: str, version: int) -> bool:
    """Unregister one version; False when it was not registered."""
    return backend_for(workspace).unregister(model, version)


def serve_only(workspace: Workspace, model: str, keep: int, keep_archive: Path, drop: int | None,
               settings: SwapSettings) -> None:
    """Make ``keep`` the registered default (registering its archive if needed) and unregister ``drop``.

    Used to undo a half-done swap and to roll back. Each action is skipped when it is already in place,
    so calling it twice is harmless.

    Raises:
        ServerError: the backend is unreachable or refuses an action.
    """
    backend = backend_for(workspace)
    backend.register(model, keep, keep_archive, settings)
    if backend.default_version(model) != str(keep):
        backend.set_default(model, keep)
    if drop is not None and drop != keep and str(drop) in backend.registered_versions(model):
        backend.drain(model, drop, settings)
        backend.unregister(model, drop)


__all__ = ["SwapBackend", "SwapSettings", "TorchServeBackend", "attach_torchserve", "backend_for",
           "default_version", "drain", "management", "pending_requests", "register", "registered_versions",
           "serve_only", "set_default", "unregister"]
