"""Workspace layout and the only place that reads ``TMU_*`` environment variables.

A workspace is one folder (``TMU_HOME``, default ``.tmu``) that holds everything tmu-serve keeps
between runs, plus the TorchServe model store (``TMU_MODEL_STORE``, default ``model_store``)::

    <home>/index/                 training index (index.sqlite + blobs.bin)
    <home>/models/<model>/v<N>/   checkpoint.pt, model.onnx, artifacts/ (prepared TMU state), report.*
    <home>/state.sqlite           versions, jobs and the audit log
    <home>/serve/                 TorchServe's private TEMP, logs, pid and key file
    <home>/writer.lock            held by the extension service, the single writer of the workspace
    <home>/locks/<model>.lock     held by whatever changes what a model serves (forget job, rollback)
    <model_store>/<model>-v<N>.mar

Everything in the workspace is for its owner only: folders 0700, files 0600. The entry points (``tmu-admin``,
the extension service, job workers) set the ``PRIVATE_UMASK`` so that every file they create is private;
files holding secrets are also created 0600 explicitly, so library callers get them private too.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

PRIVATE_UMASK = 0o077
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def use_private_umask() -> int:
    """Make files and folders this process creates from now on owner-only; returns the previous umask.

    Called once at each process entry point (CLI, extension service, job worker), never by the library.
    """
    return os.umask(PRIVATE_UMASK)


def secure_mkdir(path: Path, *, tighten: bool = False) -> Path:
    """Create folder ``path`` and its missing parents with mode 0700, whatever the umask.

    Args:
        path: the folder.
        tighten: also set an existing ``path`` (not its parents) to 0700 when it is wider.

    Returns:
        ``path``.
    """
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:  # another process made it between the check and here
            continue
        os.chmod(folder, PRIVATE_DIR_MODE)  # mkdir's mode is narrowed by the umask, never widened
    if tighten and path not in missing and stat.S_IMODE(path.stat().st_mode) & 0o077:
        os.chmod(path, PRIVATE_DIR_MODE)
    return path


def make_private(path: Path) -> None:
    """Set file ``path`` to 0600 when it exists and is wider; a file owned by someone else is left alone."""
    try:
        if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
            os.chmod(path, PRIVATE_FILE_MODE)
    except (FileNotFoundError, PermissionError):
        return


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

    @property
    def locks_dir(self) -> Path:
        return self.home / "locks"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    def ensure_dirs(self) -> None:
        """Create home, ``serve/``, ``locks/``, ``models/`` and the model store with mode 0700.

        The service's own folders (``serve/``, ``locks/``) are narrowed to 0700 when they exist wider;
        home and the model store are narrowed only when this call creates them.
        """
        secure_mkdir(self.home)
        for folder in (self.serve_dir, self.locks_dir):
            secure_mkdir(folder, tighten=True)
        secure_mkdir(self.models_dir)
        secure_mkdir(self.model_store)

    def version_dir(self, model: str, version: int) -> Path:
        return self.models_dir / model / f"v{version}"

    def archive_path(self, model: str, version: int) -> Path:
        return self.model_store / f"{model}-v{version}.mar"


def env_device() -> str:
    """``TMU_DEVICE`` (auto, cpu, cuda, cuda:N); ``auto`` when unset."""
    return os.environ.get("TMU_DEVICE", "auto")


def env_token() -> str | None:
    """``TMU_TOKEN``: the management-extension token a client sends, when not read from the key file."""
    return os.environ.get("TMU_TOKEN")
