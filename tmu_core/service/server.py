"""Run the management extension: in-process (tests, quickstart) or as a background process with a pid file.

Files in ``workspace.serve_dir``: ``extension.key`` (the bearer key, mode 0600, new at every start),
``extension.json`` (url, port, pid), ``extension.pid`` and ``extension.log``. The service listens on loopback only.
It is the single writer of its workspace: it holds ``<home>/writer.lock`` (:func:`tmu_core.state.locks.writer_lock`)
from before it writes its key file until it exits, so a second service on the same workspace fails fast and leaves
the first one's key, info file and jobs alone.
``python -m tmu_core.service.server --home H --model-store M [--port P]`` runs it in the foreground.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tmu_core.config import PRIVATE_FILE_MODE, Workspace, use_private_umask
from tmu_core.errors import ConflictError, InvalidInputError, ServerError
from tmu_core.forget.dispatcher import Dispatcher, WorkerSettings
from tmu_core.forget.drift import add_policy_flags, policy_flags, policy_from
from tmu_core.forget.executor import add_executor_flags, executor_from
from tmu_core.serving.keeper import KeyKeeper
from tmu_core.state.locks import HeldLock, current_holder, writer_lock, writer_lock_path

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
KEY_FILE = "extension.key"
INFO_FILE = "extension.json"
PID_FILE = "extension.pid"
LOG_FILE = "extension.log"
KILL_WAIT_S = 10.0  # how long stop() waits for the process to be gone after SIGKILL


@dataclass(frozen=True)
class ServiceConfig:
    """How the extension service runs.

    Attributes:
        port: loopback port; 0 picks a free one.
        run_jobs: start the dispatcher (False: accept and queue requests only).
        worker: how job workers are started (device, test hook).
    """

    port: int = 0
    run_jobs: bool = True
    worker: WorkerSettings = field(default_factory=WorkerSettings)

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise InvalidInputError(f"port must be an integer in 0..65535, got {self.port!r}")


@dataclass(frozen=True)
class ServiceInfo:
    """Where a running service answers."""

    url: str
    port: int
    pid: int
    key_file: Path


def key_path(workspace: Workspace) -> Path:
    """``<serve_dir>/extension.key``."""
    return workspace.serve_dir / KEY_FILE


def write_key(workspace: Workspace) -> str:
    """Write a new random key to the key file, readable by the owner only (0600), and return it."""
    path = key_path(workspace)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    os.chmod(path, 0o600)
    return key


def read_key(workspace: Workspace) -> str:
    """The key of the running service.

    Raises:
        ServerError: no key file (the service was never started for this workspace).
    """
    try:
        return key_path(workspace).read_text().strip()
    except OSError as err:
        raise ServerError(f"no extension key at {key_path(workspace)}: start the service first "
                          "(tmu-admin extension start)") from err


def read_info(workspace: Workspace) -> ServiceInfo | None:
    """The url/port/pid the service wrote at start, or None."""
    try:
        data = json.loads((workspace.serve_dir / INFO_FILE).read_text())
        return ServiceInfo(url=data["url"], port=int(data["port"]), pid=int(data["pid"]),
                           key_file=Path(data["key_file"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((LOOPBACK, port))
    except OSError as err:
        sock.close()
        raise ConflictError(f"cannot listen on {LOOPBACK}:{port}: {err}") from err
    return sock


def _claim(workspace: Workspace) -> HeldLock:
    """Create the workspace folders (0700) and take its writer lock, before anything else is written.

    Raises:
        ConflictError: another extension service is the workspace's writer (the message names its pid).
    """
    workspace.ensure_dirs()
    return writer_lock(workspace)


def _build(workspace: Workspace, config: ServiceConfig) -> tuple[object, Dispatcher | None, str]:
    import uvicorn

    from tmu_core.service.app import ServiceState, create_app

    key = write_key(workspace)
    dispatcher = Dispatcher(workspace, config.worker) if config.run_jobs else None
    app = create_app(ServiceState.open(workspace, key, dispatcher))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                            timeout_graceful_shutdown=5))
    return server, dispatcher, key


@dataclass
class RunningService:
    """A service running in this process (see :func:`in_process`)."""

    url: str
    key: str
    dispatcher: Dispatcher | None

    def headers(self) -> dict[str, str]:
        """``Authorization`` header for requests."""
        return {"Authorization": f"Bearer {self.key}"}


@contextlib.contextmanager
def in_process(workspace: Workspace, config: ServiceConfig | None = None,
               wait_workers_s: float = 60.0) -> Iterator[RunningService]:
    """Serve the extension from a thread of this process for the duration of the block.

    Args:
        workspace: the workspace to serve.
        config: port (0: a free one), dispatcher on/off, worker settings.
        wait_workers_s: at exit, how long to wait for running job workers before terminating them.

    Raises:
        ConflictError: another extension service is the workspace's writer (the message names its pid).
    """
    with _claim(workspace), _in_thread(workspace, config or ServiceConfig(), wait_workers_s) as running:
        yield running


@contextlib.contextmanager
def _in_thread(workspace: Workspace, config: ServiceConfig, wait_workers_s: float) -> Iterator[RunningService]:
    sock = _bind(config.port)
    server, dispatcher, key = _build(workspace, config)
    port = sock.getsockname()[1]
    if dispatcher is not None:
        dispatcher.start()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)  # type: ignore[attr-defined]
    thread.start()
    url = f"http://{LOOPBACK}:{port}"
    info_path = _write_info(workspace, url, port)
    keeper = KeyKeeper(workspace).start()  # renews TorchServe's keys while the service runs
    try:
        _wait_health(url, 30.0)
        yield RunningService(url=url, key=key, dispatcher=dispatcher)
    finally:
        keeper.stop()
        server.should_exit = True  # type: ignore[attr-defined]
        thread.join(timeout=15)
        sock.close()
        info_path.unlink(missing_ok=True)
        if dispatcher is not None:
            dispatcher.stop(wait_s=wait_workers_s)


def _write_info(workspace: Workspace, url: str, port: int) -> Path:
    """Write ``extension.json`` so that clients (``tmu-admin``) find the service."""
    path = workspace.serve_dir / INFO_FILE
    path.write_text(json.dumps({"url": url, "port": port, "pid": os.getpid(), "key_file": str(key_path(workspace))}))
    return path


def _wait_health(url: str, timeout: float) -> None:
    import requests

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException as err:
            last = str(err)
        time.sleep(0.1)
    raise ServerError(f"the extension service at {url} did not answer /health within {timeout:.0f}s ({last})")


def serve_forever(workspace: Workspace, config: ServiceConfig) -> None:
    """Run the service in the foreground until SIGTERM/SIGINT (what the background process does).

    Raises:
        ConflictError: another extension service is the workspace's writer (the message names its pid).
    """
    with _claim(workspace):
        _serve(workspace, config)


def _serve(workspace: Workspace, config: ServiceConfig) -> None:
    sock = _bind(config.port)
    server, dispatcher, _ = _build(workspace, config)
    port = sock.getsockname()[1]
    url = f"http://{LOOPBACK}:{port}"
    _write_info(workspace, url, port)
    (workspace.serve_dir / PID_FILE).write_text(str(os.getpid()))
    if dispatcher is not None:
        dispatcher.start()
    logger.info("extension service on %s (pid %d)", url, os.getpid())
    keeper = KeyKeeper(workspace).start()  # renews TorchServe's keys while the service runs
    try:
        server.run(sockets=[sock])  # type: ignore[attr-defined]
    finally:
        keeper.stop()
        if dispatcher is not None:
            dispatcher.stop(wait_s=None)
        for name in (INFO_FILE, PID_FILE):
            (workspace.serve_dir / name).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to exit; True when it has."""
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def status(workspace: Workspace) -> ServiceInfo | None:
    """The running background service of ``workspace``, or None."""
    info = read_info(workspace)
    return info if info is not None and _alive(info.pid) else None


def start(workspace: Workspace, config: ServiceConfig | None = None, timeout: float = 60.0) -> ServiceInfo:
    """Start the service as a background process (log in ``<serve_dir>/extension.log``) and wait for /health.

    Raises:
        ConflictError: it already runs for this workspace. ServerError: it did not come up.
    """
    config = config or ServiceConfig()
    _refuse_second_writer(workspace)
    workspace.ensure_dirs()
    cmd = [sys.executable, "-m", "tmu_core.service.server", "--home", str(workspace.home), "--model-store",
           str(workspace.model_store), "--port", str(config.port), "--device", config.worker.device,
           "--retention-s", str(config.worker.retention_s), *policy_flags(config.worker.drift),
           *config.worker.executor.flags()]
    log_fd = os.open(workspace.serve_dir / LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE_MODE)
    with os.fdopen(log_fd, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = read_info(workspace)
        if info is not None and info.pid == proc.pid:
            _wait_health(info.url, max(1.0, deadline - time.monotonic()))
            return info
        if proc.poll() is not None:
            _refuse_second_writer(workspace)  # it lost a race for the writer lock: say who won
            raise ServerError(f"the extension service exited with {proc.returncode}; see "
                              f"{workspace.serve_dir / LOG_FILE}")
        time.sleep(0.1)
    proc.terminate()
    raise ServerError(f"the extension service did not start within {timeout:.0f}s; see "
                      f"{workspace.serve_dir / LOG_FILE}")


def _refuse_second_writer(workspace: Workspace) -> None:
    """Raise ConflictError, naming the pid, when a service already runs for (or holds the lock of) ``workspace``."""
    running = status(workspace)
    if running is not None:
        raise ConflictError(f"the extension service already runs for {workspace.home} at {running.url} "
                            f"(pid {running.pid}); stop it first")
    holder = current_holder(writer_lock_path(workspace))
    if holder is not None:
        raise ConflictError(f"workspace {workspace.home} already has a writer: {holder.describe()} holds "
                            f"{writer_lock_path(workspace)}; stop it first (tmu-admin extension stop)")


def stop(workspace: Workspace, timeout: float = 20.0) -> bool:
    """Stop the background service (SIGTERM, then SIGKILL after ``timeout``). Job workers keep running.

    Returns:
        True when a service was running.
    """
    info = status(workspace)
    if info is None:
        return False
    os.kill(info.pid, signal.SIGTERM)
    if not _wait_gone(info.pid, timeout):
        logger.warning("extension service pid=%d ignored SIGTERM for %.0fs; killing it", info.pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGKILL)
        if not _wait_gone(info.pid, KILL_WAIT_S):
            raise ServerError(f"the extension service pid={info.pid} still runs {KILL_WAIT_S:.0f}s after SIGKILL")
    # The kernel frees the writer lock when the process is gone; wait for that too, so that a start right
    # after this call finds the workspace free.
    deadline = time.monotonic() + KILL_WAIT_S
    while current_holder(writer_lock_path(workspace)) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    for name in (INFO_FILE, PID_FILE):
        (workspace.serve_dir / name).unlink(missing_ok=True)
    return True


def main(argv: list[str] | None = None) -> int:
    """Foreground entry point of the background process; exits 3 when the workspace already has a writer."""
    use_private_umask()
    parser = argparse.ArgumentParser(prog="python -m tmu_core.service.server")
    parser.add_argument("--home", required=True, type=Path)
    parser.add_argument("--model-store", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--retention-s", type=float, default=0.0,
                        help="seconds the files of a version holding forgotten samples are kept after it stops serving")
    add_policy_flags(parser)
    add_executor_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workspace = Workspace(home=args.home, model_store=args.model_store)
    try:
        worker = WorkerSettings(device=args.device, retention_s=args.retention_s, drift=policy_from(args),
                                executor=executor_from(args))
        serve_forever(workspace, ServiceConfig(port=args.port, worker=worker))
    except ConflictError as err:
        logger.error("not started: %s", err)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
