"""Start and stop the whole serving stack of a workspace: TorchServe, then the management extension.

TorchServe loads, for each model, the version the registry marks ``serving`` (so a rollback survives a restart),
or the highest-numbered archive for a model the registry does not know. The extension starts only once every
model's workers are READY; if anything fails, whatever was started is stopped again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tmu_core.config import Workspace
from tmu_core.errors import ModelNotFoundError, TmuError
from tmu_core.service import server as extension
from tmu_core.state.versions import VersionRegistry
from tmu_core.service.server import ServiceConfig, ServiceInfo
from tmu_core.serving.archive import latest_archives
from tmu_core.serving.torchserve import ServerStatus, TorchServe, TorchServeConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackStatus:
    """Where the stack answers, and which version of each model TorchServe was started with."""

    torchserve: ServerStatus
    extension: ServiceInfo | None
    versions: dict[str, int]


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


def start_stack(workspace: Workspace, config: TorchServeConfig, models: list[str] | None = None,
                with_extension: bool = True, timeout: float = 120.0,
                service: ServiceConfig | None = None) -> StackStatus:
    """Start TorchServe with each model's serving version, wait until READY, then start the extension.

    Raises:
        ModelNotFoundError: nothing to serve. ServerError / ConflictError: a server did not start or already runs.
    """
    chosen = archives_to_serve(workspace, models)
    server = TorchServe(workspace, config)
    server.start([f"{name}={path.name}" for name, (_, path) in sorted(chosen.items())])
    try:
        for name in sorted(chosen):
            server.wait_ready(name, timeout)
        info = extension.start(workspace, service) if with_extension else None
    except TmuError:
        server.stop()
        raise
    logger.info("stack started home=%s models=%s", workspace.home, sorted(chosen))
    return StackStatus(server.status(), info, {name: version for name, (version, _) in chosen.items()})


def stop_stack(workspace: Workspace, server: TorchServe) -> tuple[bool, bool]:
    """Stop the extension (new forget requests stop first), then TorchServe.

    Returns:
        (extension was running, TorchServe was running).
    """
    ext_was_running = extension.stop(workspace)
    ts_was_running = server.stop()
    return ext_was_running, ts_was_running
