"""Start, watch and stop a TorchServe 0.12 server that belongs to one workspace.

TorchServe keeps its pid file and worker sockets in ``$TEMP`` and writes ``key_file.json`` (the token keys)
into its working folder, so every server gets a private ``<serve_dir>/tmp`` and runs in ``<serve_dir>``; the
same ``TEMP`` must be used to stop it. ``torchserve --start`` hangs when its output is captured by a pipe (Java
keeps the pipe open), so the launcher's output goes to ``<serve_dir>/logs/torchserve.out``.
``torchserve --stop`` returns at once while Java takes seconds to exit: ``stop()`` waits for the pid.
Readiness is a model's worker in state READY, not ``/ping`` (which says Healthy while workers crash-loop).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tmu_core.config import Workspace
from tmu_core.errors import ConflictError, InvalidInputError, ServerError, TmuError
from tmu_core.serving.clients import InferenceClient, ManagementClient, ModelVersionInfo  # noqa: F401  (re-exported)
from tmu_core.serving.keys import KeyRing, TokenKeys, read_keys

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
PID_FILE = ".model_server.pid"
KEY_FILE = "key_file.json"
# allowed_urls is a list of regexes that file:// and http(s):// registration URLs must match; this one matches
# none. A plain file name is never checked against it: TorchServe looks it up inside model_store.
NO_URLS = "(?!)"


def free_ports(count: int) -> tuple[int, ...]:
    """``count`` distinct TCP ports that are free on the loopback address right now.

    They are drawn below Linux's ephemeral range (32768-60999), so that outgoing connections cannot take
    one between this check and the server's bind.
    """
    rng = random.Random(os.urandom(8))
    ports: list[int] = []
    for _ in range(200):
        port = rng.randrange(20000, 32768)
        if port in ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return tuple(ports)
    raise ServerError(f"found only {len(ports)} of {count} free loopback ports in 20000-32767")


@dataclass(frozen=True)
class TorchServeConfig:
    """Server settings written to ``<serve_dir>/config.properties``. Addresses are always loopback.

    Attributes:
        model_store: the folder of ``.mar`` archives.
        inference_port / management_port / metrics_port: loopback ports of the three REST APIs.
        grpc_inference_port / grpc_management_port: loopback ports of the gRPC APIs, which TorchServe always
            opens (two servers on one host clash on the defaults 7070/7071).
        token_auth: TorchServe's token authorization (keys in ``key_file.json``).
        enable_model_api: allow register/unregister through the management API. Registration takes only
            the file name of an archive in the model store: ``allowed_urls`` matches no URL.
        token_expiration_min: minutes a generated key stays valid.
        default_workers_per_model: workers for a model registered without ``initial_workers``.
        max_request_size: largest request body TorchServe accepts, in bytes.
        vmargs: JVM arguments.
    """

    model_store: Path
    inference_port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    token_auth: bool = True
    enable_model_api: bool = True
    token_expiration_min: int = 60
    default_workers_per_model: int = 1
    max_request_size: int = 6553500
    vmargs: str = "-Xmx1g"

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_store", Path(self.model_store).absolute())
        ports = (self.inference_port, self.management_port, self.metrics_port, self.grpc_inference_port,
                 self.grpc_management_port)
        if len(set(ports)) != len(ports) or not all(1 <= p <= 65535 for p in ports):
            raise InvalidInputError(f"inference/management/metrics/grpc-inference/grpc-management ports must be "
                                    f"5 distinct ports in 1..65535, got {ports}")
        for name in ("token_expiration_min", "default_workers_per_model", "max_request_size"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def with_free_ports(cls, model_store: Path, **overrides: object) -> "TorchServeConfig":
        """A config on loopback ports that are free right now (for tests and side-by-side servers)."""
        inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
        return cls(model_store=model_store, inference_port=inference, management_port=management,
                   metrics_port=metrics, grpc_inference_port=grpc_inference, grpc_management_port=grpc_management,
                   **overrides)  # type: ignore[arg-type]

    @classmethod
    def from_properties(cls, path: Path, model_store: Path) -> "TorchServeConfig":
        """Read ports and switches from a TorchServe ``config.properties`` (e.g. the repository's).

        The workspace's ``model_store`` wins over the file's, so the CLI and the server agree on one folder.

        Raises:
            InvalidInputError: an address is not ``http://127.0.0.1:<port>``, or a value is malformed.
        """
        props = _read_properties(Path(path))
        values: dict[str, object] = {}
        for api in ("inference", "management", "metrics"):
            address = props.get(f"{api}_address")
            if address is not None:
                host, _, port = address.removeprefix("http://").rstrip("/").rpartition(":")
                if host not in (LOOPBACK, "localhost") or not port.isdigit():
                    raise InvalidInputError(f"{path}: {api}_address must be http://127.0.0.1:<port>, got {address!r}")
                values[f"{api}_port"] = int(port)
        flags = {"disable_token_authorization": "token_auth", "enable_model_api": "enable_model_api"}
        for key, name in flags.items():
            if key in props:
                on = props[key].lower() == "true"
                values[name] = not on if key.startswith("disable") else on
        for key in ("grpc_inference_address", "grpc_management_address"):
            if props.get(key, LOOPBACK) not in (LOOPBACK, "localhost"):
                raise InvalidInputError(f"{path}: {key} must be 127.0.0.1, got {props[key]!r}")
        for key in ("token_expiration_min", "default_workers_per_model", "max_request_size",
                    "grpc_inference_port", "grpc_management_port"):
            if key in props:
                if not props[key].isdigit():
                    raise InvalidInputError(f"{path}: {key} must be an integer, got {props[key]!r}")
                values[key] = int(props[key])
        if "vmargs" in props:
            values["vmargs"] = props["vmargs"]
        return cls(model_store=model_store, **values)  # type: ignore[arg-type]

    def url(self, api: str) -> str:
        """``http://127.0.0.1:<port>`` of ``"inference"``, ``"management"`` or ``"metrics"``."""
        ports = {"inference": self.inference_port, "management": self.management_port, "metrics": self.metrics_port}
        if api not in ports:
            raise InvalidInputError(f"api must be one of {sorted(ports)}, got {api!r}")
        return f"http://{LOOPBACK}:{ports[api]}"

    def properties(self) -> str:
        """The text of ``config.properties``."""
        lines = [
            "# Written by tmu-serve; edit TorchServeConfig instead.",
            f"inference_address={self.url('inference')}",
            f"management_address={self.url('management')}",
            f"metrics_address={self.url('metrics')}",
            f"grpc_inference_address={LOOPBACK}",
            f"grpc_management_address={LOOPBACK}",
            f"grpc_inference_port={self.grpc_inference_port}",
            f"grpc_management_port={self.grpc_management_port}",
            f"model_store={self.model_store}",
            f"allowed_urls={NO_URLS}",
            f"disable_token_authorization={str(not self.token_auth).lower()}",
            f"enable_model_api={str(self.enable_model_api).lower()}",
            f"token_expiration_min={self.token_expiration_min}",
            f"default_workers_per_model={self.default_workers_per_model}",
            f"max_request_size={self.max_request_size}",
            f"max_response_size={self.max_request_size}",
            "install_py_dep_per_model=false",
            "disable_system_metrics=true",
            f"vmargs={self.vmargs}",
        ]
        return "\n".join(lines) + "\n"

    def write(self, path: Path) -> Path:
        """Write ``config.properties`` to ``path`` and return it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.properties())
        return path


def _read_properties(path: Path) -> dict[str, str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise InvalidInputError(f"cannot read TorchServe properties {path}: {err}") from err
    pairs = (line.split("=", 1) for line in lines if "=" in line and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


@dataclass(frozen=True)
class ServerStatus:
    """Whether the workspace's server runs, where, and which models it serves."""

    running: bool
    pid: int | None
    inference_url: str
    management_url: str
    metrics_url: str
    key_file: Path | None
    log_dir: Path
    models: tuple[str, ...] = ()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():  # a zombie has exited but is not reaped yet
        try:
            return stat.read_text().split(") ", 1)[1][:1] != "Z"
        except (OSError, IndexError):
            return True
    return True


class TorchServe:
    """The TorchServe server of one workspace: files under ``workspace.serve_dir``."""

    def __init__(self, workspace: Workspace, config: TorchServeConfig) -> None:
        self.workspace = workspace
        self.config = config
        self.serve_dir = workspace.serve_dir
        self.temp_dir = self.serve_dir / "tmp"
        self.log_dir = self.serve_dir / "logs"
        self.config_path = self.serve_dir / "config.properties"
        self.key_file = self.serve_dir / KEY_FILE

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(TEMP=str(self.temp_dir), TMPDIR=str(self.temp_dir), LOG_LOCATION=str(self.log_dir),
                   METRICS_LOCATION=str(self.log_dir))
        return env

    def _launch(self, args: list[str], timeout: float) -> None:
        # Output to a file, never a pipe: Java inherits the descriptors and would keep a pipe open forever.
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "ts.model_server", *args]
        with open(self.log_dir / "torchserve.out", "ab") as out:
            proc = subprocess.Popen(cmd, cwd=self.serve_dir, env=self._env(), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired as err:
                proc.kill()
                raise ServerError(f"torchserve {args[0]} did not return in {timeout:.0f} s; see "
                                  f"{self.log_dir / 'torchserve.out'}") from err
        if code != 0:
            raise ServerError(f"torchserve {args[0]} exited with {code}: {self.log_tail('torchserve.out')}")

    def pid(self) -> int | None:
        """The Java frontend's pid when it runs, else None."""
        try:
            pid = int((self.temp_dir / PID_FILE).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid_alive(pid) else None

    def start(self, models: list[str] | None = None, timeout: float = 60.0) -> int:
        """Start the server with ``models`` (each ``"name=file.mar"``, file names inside the model store).

        Returns:
            The Java frontend's pid.

        Raises:
            ConflictError: this workspace's server already runs.
            InvalidInputError: a model spec is malformed or names a missing archive.
            ServerError: the launcher failed or no pid appeared.
        """
        socket_path = str(self.temp_dir / ".ts.sock.65535")
        if len(socket_path.encode()) > 107:
            raise InvalidInputError(
                f"workspace path too long: TorchServe's worker sockets live in {self.temp_dir} and a Unix socket "
                f"path may hold 107 bytes, {socket_path!r} has {len(socket_path.encode())}; use a shorter TMU_HOME")
        if self.pid() is not None:
            raise ConflictError(f"TorchServe already runs for {self.serve_dir} (pid {self.pid()}); stop it first")
        for spec in models or []:
            name, _, file = spec.partition("=")
            if not name or not file.endswith(".mar") or not (self.config.model_store / file).is_file():
                raise InvalidInputError(f"model {spec!r}: expected NAME=FILE.mar with FILE in {self.config.model_store}")
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.config.model_store.mkdir(parents=True, exist_ok=True)
        self.key_file.unlink(missing_ok=True)
        self.config.write(self.config_path)
        args = ["--start", "--ncs", "--ts-config", str(self.config_path),
                "--model-store", str(self.config.model_store)]
        if models:
            args += ["--models", *models]
        self._launch(args, timeout)
        pid = self.pid()
        if pid is None:
            raise ServerError(f"TorchServe did not start: {self.log_tail('torchserve.out')}")
        logger.info("torchserve started pid=%d models=%s inference=%s", pid, models, self.config.url("inference"))
        return pid

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the server and wait until the Java process has exited (killed after ``timeout``).

        Returns:
            True when a server was running.
        """
        pid = self.pid()
        if pid is None:
            return False
        self._launch(["--stop"], timeout)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            logger.warning("torchserve pid=%d still alive after %.0f s; killing it", pid, timeout)
            os.kill(pid, signal.SIGKILL)
        (self.temp_dir / PID_FILE).unlink(missing_ok=True)
        logger.info("torchserve stopped pid=%d", pid)
        return True

    def keys(self) -> TokenKeys:
        """The token keys of the running server, with their expiration times.

        Raises:
            ServerError: no key file (the server is not running, or token auth is off), or it is malformed.
        """
        return read_keys(self.key_file)

    def management(self, timeout: float = 30.0) -> ManagementClient:
        """A management-API client that follows renewed keys (no key when token auth is off)."""
        if not self.config.token_auth:
            return ManagementClient(self.config.url("management"), None, timeout=timeout)
        return ManagementClient(self.config.url("management"), self.keys().management, timeout=timeout,
                                keys=KeyRing(self.key_file, self.config.url("management")))

    def inference(self, timeout: float = 30.0) -> InferenceClient:
        """An inference-API client that follows renewed keys (no key when token auth is off)."""
        if not self.config.token_auth:
            return InferenceClient(self.config.url("inference"), None, timeout=timeout)
        return InferenceClient(self.config.url("inference"), self.keys().inference, timeout=timeout,
                               keys=KeyRing(self.key_file, self.config.url("management")))

    def wait_ready(self, model: str, timeout: float = 60.0, version: str | None = None) -> ModelVersionInfo:
        """Poll the management API until a worker of ``model`` (``version``, or any) is READY.

        Raises:
            ServerError: the server died, or no worker became READY before ``timeout``.
        """
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.pid() is None:
                raise ServerError(f"TorchServe exited while loading {model}: {self.log_tail('ts_log.log')}\n"
                                  f"{self.log_tail('torchserve.out')}")
            try:
                for info in self.management(timeout=5.0).describe(model, version):
                    if info.ready:
                        return info
                last = "no worker READY"
            except TmuError as err:  # key file not written yet, model not registered yet, ...
                last = str(err)
            time.sleep(0.25)
        raise ServerError(f"model {model} not READY after {timeout:.0f} s ({last}); "
                          f"model log: {self.log_tail('model_log.log')}")

    def status(self) -> ServerStatus:
        """Whether the server runs, its URLs, key file and registered models."""
        pid = self.pid()
        models: tuple[str, ...] = ()
        if pid is not None:
            try:
                models = tuple(m.name for m in self.management().list_models())
            except TmuError as err:
                logger.warning("cannot list models: %s", err)
        return ServerStatus(running=pid is not None, pid=pid, inference_url=self.config.url("inference"),
                            management_url=self.config.url("management"), metrics_url=self.config.url("metrics"),
                            key_file=self.key_file if self.key_file.exists() else None, log_dir=self.log_dir,
                            models=models)

    def log_tail(self, name: str, lines: int = 20) -> str:
        """The last ``lines`` lines of a log file in ``log_dir`` (for error messages)."""
        path = self.log_dir / name
        try:
            text = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"(no {path})"
        return f"{path}:\n" + "\n".join(text)
