"""Helpers of the Ray Serve tests: a workspace with two tiny packaged versions, and a bounded load of clients."""

from __future__ import annotations

import io
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
import torch
from PIL import Image

from tmu_core.config import Workspace
from tmu_core.models import build_model
from tmu_core.serving.archive import package_version
from tmu_core.state.versions import VersionRegistry
from tmu_core.train import CheckpointMeta, save_checkpoint

CLASSES = ("ant", "bee", "cat", "dog")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_versions(root: Path, model: str = "m") -> Workspace:
    """A workspace holding versions 1 and 2 of a seeded small_cnn (3x16x16, 4 classes), ONNX backend,
    recorded in the registry with v2 derived from v1 and v1 serving."""
    workspace = Workspace(home=root / "home", model_store=root / "store")
    workspace.ensure_dirs()
    registry = VersionRegistry(workspace.state_db)
    meta = CheckpointMeta("small_cnn", 4, CLASSES, 3, 16, (0.5,) * 3, (0.25,) * 3, 0, {}, "fp", 4)
    for version in (1, 2):
        torch.manual_seed(version)
        net = build_model("small_cnn", 4, 3, 16, (0.5,) * 3, (0.25,) * 3).eval()
        ckpt = save_checkpoint(root / f"v{version}.pt", net, meta)
        result = package_version(ckpt, workspace, model, version, backend="onnx", batch_size=8, max_batch_delay=5)
        registry.record_version(model, version, result.archive, result.checkpoint, result.onnx,
                                parent=None if version == 1 else 1, forget_request=None, metrics={},
                                state="serving" if version == 1 else "superseded")
    return workspace


def png(seed: int, size: int = 24) -> bytes:
    """A random RGB PNG of ``size`` x ``size``."""
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Load:
    """What the clients saw: ``(started_at, status, model_version, replica)`` per request, and errors."""

    answers: list[tuple[float, int, str | None, str | None]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[tuple[float, int, str | None, str | None]]:
        return [a for a in self.answers if a[1] != 200]


class Clients:
    """``threads`` clients posting ``body`` in a loop until :meth:`stop` or ``max_s`` seconds have passed."""

    def __init__(self, url: str, headers: dict[str, str], body: bytes, threads: int = 16, max_s: float = 240.0):
        self.url, self.headers, self.body, self.max_s = url, headers, body, max_s
        self.load, self._lock, self._stop = Load(), threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> "Clients":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> Load:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)
        return self.load

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_s
        with requests.Session() as session:
            while not self._stop.is_set() and time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    reply = session.post(self.url, data=self.body, headers=self.headers, timeout=60)
                    body = reply.json() if reply.headers.get("content-type", "").startswith("application/json") \
                        else {}
                    answer = (started, reply.status_code, body.get("model_version"),
                              reply.headers.get("x-tmu-replica"))
                except requests.RequestException as err:
                    answer = (started, -1, None, None)
                    with self._lock:
                        self.load.errors.append(repr(err))
                with self._lock:
                    self.load.answers.append(answer)
