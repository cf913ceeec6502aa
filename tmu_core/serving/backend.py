"""Which serving backend a workspace uses: ``<serve_dir>/backend.json``, written by ``tmu-admin serve start``.

No file means TorchServe, as before this file existed. ``{"kind": "ray", ...}`` means Ray Serve on the cluster at
``address``, answering HTTP on ``http_host:http_port``. The Ray Serve bearer token is not in this file: it is in
``<serve_dir>/ray_token`` (mode 0600), so the settings file can be shown and copied without leaking it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import stat
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from tmu_core.config import PRIVATE_FILE_MODE
from tmu_core.errors import CheckpointError, InvalidInputError

logger = logging.getLogger(__name__)

BACKEND_FILE = "backend.json"
TOKEN_FILE = "ray_token"
KINDS = ("torchserve", "ray")


@dataclass(frozen=True)
class BackendSpec:
    """Where a workspace's models are served.

    Attributes:
        kind: ``"torchserve"`` (the default) or ``"ray"``.
        address: the Ray cluster's address (``host:port`` of its GCS, or ``ray://...``); ray only.
        namespace: the Ray namespace of tmu-serve's named actors (the archive store).
        http_host: where Ray Serve's proxy listens (loopback unless a reader chooses otherwise).
        http_port: Ray Serve's HTTP port.
        public_url: where this host and clients reach the proxy, when not ``http://http_host:http_port``
            (e.g. ``http://tmu-ray-head-svc:8000`` with ``http_host`` 0.0.0.0 on Kubernetes).
        replicas: replicas per model.
        num_cpus: CPUs that each replica reserves (fractions allowed; small so 2 replicas fit on a laptop).
        num_gpus: GPUs that each replica reserves (0 on CPU clusters).
        max_replicas_per_node: at most this many replicas of a model on one node (None: no limit; Serve
            spreads replicas over nodes by default anyway).
        max_batch_size: most requests a replica predicts in one forward pass.
        batch_wait_timeout_s: how long a replica waits to fill a batch.
    """

    kind: str = "torchserve"
    address: str | None = None
    namespace: str = "tmu-serve"
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    public_url: str | None = None
    replicas: int = 2
    num_cpus: float = 0.25
    num_gpus: float = 0.0
    max_replicas_per_node: int | None = None
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidInputError(f"serving backend must be one of {list(KINDS)}, got {self.kind!r}")
        if self.kind == "ray" and not self.address:
            raise InvalidInputError("the ray serving backend needs the cluster's address (--ray-address)")
        if not isinstance(self.http_port, int) or not 0 < self.http_port < 65536:
            raise InvalidInputError(f"http_port must be a port number 1..65535, got {self.http_port!r}")
        for name, low in (("replicas", 1), ("max_batch_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidInputError(f"{name} must be an int >= {low}, got {value!r}")
        if self.max_replicas_per_node is not None and not 1 <= self.max_replicas_per_node <= 100:
            raise InvalidInputError(f"max_replicas_per_node must be 1..100 or None, got {self.max_replicas_per_node}")
        for name in ("num_cpus", "num_gpus", "batch_wait_timeout_s"):
            if getattr(self, name) < 0:
                raise InvalidInputError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def url(self) -> str:
        """Ray Serve's HTTP root, as this host and clients reach it."""
        return (self.public_url or f"http://{self.http_host}:{self.http_port}").rstrip("/")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BackendSpec":
        """Build from ``backend.json``'s object.

        Raises:
            InvalidInputError: unknown keys or invalid values.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"unknown keys {unknown} in {BACKEND_FILE}; accepted: {sorted(known)}")
        return cls(**data)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for Ray Serve's HTTP proxy)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def read_backend(serve_dir: Path) -> BackendSpec:
    """The workspace's serving backend: ``backend.json`` in ``serve_dir``, else TorchServe.

    Raises:
        InvalidInputError: the file is not a JSON object of known settings.
    """
    path = Path(serve_dir) / BACKEND_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return BackendSpec()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidInputError(f"{path} is not JSON ({err}); expected an object such as "
                                '{"kind": "ray", "address": "127.0.0.1:6379"}') from err
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path} holds a {type(data).__name__}; expected a JSON object")
    return BackendSpec.from_dict(data)


def write_backend(serve_dir: Path, spec: BackendSpec) -> Path:
    """Write ``backend.json`` atomically (a TorchServe spec removes the file: no file is TorchServe)."""
    path = Path(serve_dir) / BACKEND_FILE
    if spec.kind == "torchserve":
        path.unlink(missing_ok=True)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(asdict(spec), indent=2))
    os.replace(partial, path)
    return path


def load_or_create_token(serve_dir: Path) -> str:
    """The Ray Serve bearer token in ``<serve_dir>/ray_token``, made (32 random bytes, mode 0600) when missing.

    Raises:
        CheckpointError: the file grants group or others any access, or is empty.
    """
    path = Path(serve_dir) / TOKEN_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32))
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise CheckpointError(f"{path} has mode {oct(mode)}; the token file must be readable by its owner only "
                              "(chmod 600)")
    token = path.read_text().strip()
    if not token:
        raise CheckpointError(f"{path} is empty; delete it and start serving again to make a new token")
    return token


__all__ = ["BACKEND_FILE", "BackendSpec", "TOKEN_FILE", "free_port", "load_or_create_token", "read_backend", "write_backend"]
