"""Workspace layout and the only place that reads ``TMU_*`` environment variables.

A workspace is one folder (``TMU_HOME``, default ``.tmu``) that holds everything tmu-serve keeps
between runs, plus the TorchServe model store (``TMU_MODEL_STORE``, default ``model_store``)::

    <home>/index/                 training index (index.sqlite + blobs.bin)
    <home>/models/<model>/v<N>/   checkpoint.pt, model.onnx, artifacts/ (prepared TMU state), report.*
    <home>/state.sqlite           versions, jobs and the audit log
    <home>/serve/                 TorchServe's private TEMP, logs, pid and key file
    <model_store>/<model>-v<N>.mar
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    """Where tmu-serve keeps its files. Build it once at the edge and pass it down."""

    home: Path = Path(".tmu")
    model_store: Path = Path("model_store")

    def __post_init__(self) -> None:
        object.__setattr__(self, "home", Path(self.home).absolute())
        object.__setattr__(self, "model_store", Path(self.model_store).absolute())

    @classmethod
    def from_env(cls, home: Path | None = None, model_store: Path | None = None) -> "Workspace":
        """Explicit arguments win over ``TMU_HOME`` / ``TMU_MODEL_STORE``, which win over the defaults."""
        return cls(
            home=Path(home or os.environ.get("TMU_HOME", ".tmu")),
            model_store=Path(model_store or os.environ.get("TMU_MODEL_STORE", "model_store")),
        )

    @property
    def index_dir(self) -> Path:
        return self.home / "index"

    @property
    def state_db(self) -> Path:
        return self.home / "state.sqlite"

    @property
    def serve_dir(self) -> Path:
        return self.home / "serve"

    def version_dir(self, model: str, version: int) -> Path:
        return self.home / "models" / model / f"v{version}"

    def archive_path(self, model: str, version: int) -> Path:
        return self.model_store / f"{model}-v{version}.mar"


def env_device() -> str:
    """``TMU_DEVICE`` (auto, cpu, cuda, cuda:N); ``auto`` when unset."""
    return os.environ.get("TMU_DEVICE", "auto")


def env_token() -> str | None:
    """``TMU_TOKEN``: the management-extension token a client sends, when not read from the key file."""
    return os.environ.get("TMU_TOKEN")
