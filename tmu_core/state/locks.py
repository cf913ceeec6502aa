"""OS file locks: one writer per workspace, one change at a time per model.

* ``<home>/writer.lock``: the extension service holds it for its whole life (:func:`writer_lock`), so a second
  service on the same workspace fails fast instead of rewriting the key file and failing the first one's jobs.
* ``<home>/locks/<model>.lock``: held by whatever changes what a model serves (:func:`model_lock`): a forget
  job's worker for its whole run, a rollback for its duration, the recovery of a job whose worker died.

They are exclusive ``fcntl.flock`` locks on an open file, so the kernel releases them when the holder exits,
however it exits (SIGKILL included): a crash never leaves a stale lock. Each lock file (mode 0600) holds JSON
naming its holder (``{"pid", "what", "since"}``) so that a refused caller can say who is in the way.

A flock belongs to the open file, not to the process: two threads of one process that each open the file exclude
each other (the dispatcher thread's recovery and an HTTP thread's rollback in the service). :func:`model_lock` is
re-entrant within one thread. A child made by ``fork`` without ``exec`` shares the open file and keeps the lock
until it exits; children started with ``subprocess`` do not inherit it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tmu_core.config import PRIVATE_FILE_MODE, Workspace, secure_mkdir
from tmu_core.errors import ConflictError, InvalidInputError
from tmu_core.state.db import utc_now

WRITER_LOCK = "writer.lock"
POLL_S = 0.05
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_held: dict[tuple[str, int], list] = {}  # (lock path, thread id) -> [HeldLock, depth]
_held_guard = threading.Lock()


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock, as its lock file says.

    Attributes:
        pid: the holder's process id, None when the file does not say (yet).
        what: what the holder does: ``"extension service"``, a job id, ``"rollback"``.
        since: when it took the lock (ISO 8601 UTC), None when unknown.
    """

    pid: int | None
    what: str
    since: str | None = None

    def describe(self) -> str:
        """For messages: ``pid 4242 (job j-1, since 2026-...)`` or ``an unknown process``."""
        who = f"pid {self.pid}" if self.pid else "an unknown process"
        details = ", ".join(x for x in (self.what, f"since {self.since}" if self.since else "") if x)
        return f"{who} ({details})" if details else who


class HeldLock:
    """An acquired lock; :meth:`release` (or leaving a ``with`` block) gives it back.

    Attributes:
        path: the lock file.
        holder: what this process wrote into it.
    """

    def __init__(self, path: Path, fd: int, holder: LockHolder) -> None:
        self.path, self.holder, self._fd = path, holder, fd

    @property
    def held(self) -> bool:
        """True until released."""
        return self._fd >= 0

    def release(self) -> None:
        """Clear the holder record and unlock; a second call does nothing."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            os.ftruncate(fd, 0)  # while still locked, so no one reads a stale holder after this
        finally:
            os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> "HeldLock":
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def writer_lock_path(workspace: Workspace) -> Path:
    """``<home>/writer.lock``."""
    return workspace.home / WRITER_LOCK


def model_lock_path(workspace: Workspace, model: str) -> Path:
    """``<home>/locks/<model>.lock``.

    Raises:
        InvalidInputError: ``model`` is not a model name (letters, digits, ``_`` and ``-``, at most 128).
    """
    if not isinstance(model, str) or not _MODEL_NAME.match(model):
        raise InvalidInputError(f"model name {model!r} cannot name a lock file; use 1 to 128 letters, digits, "
                                "'_' and '-', starting with a letter or digit")
    return workspace.locks_dir / f"{model}.lock"


def read_holder(path: Path) -> LockHolder | None:
    """The holder a lock file names, or None when it names none (free, or its holder is writing it)."""
    try:
        data = json.loads(Path(path).read_text() or "null")
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    pid = data.get("pid")
    return LockHolder(pid=pid if isinstance(pid, int) else None, what=str(data.get("what", "")),
                      since=data.get("since") if isinstance(data.get("since"), str) else None)


def current_holder(path: Path) -> LockHolder | None:
    """Who holds the lock at ``path`` now, or None when it is free (checked by trying to take it)."""
    path = Path(path)
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        if _try_flock(fd):
            return None
        return _holder_of(path)
    finally:
        os.close(fd)  # also releases the probe's lock when it got one


def writer_lock(workspace: Workspace) -> HeldLock:
    """Make this process the single writer of ``workspace``: take ``<home>/writer.lock`` without waiting.

    The extension service calls it before it writes its key file or starts its dispatcher, and keeps the
    returned lock for its whole life (``with writer_lock(ws): ...`` or :meth:`HeldLock.release`).

    Raises:
        ConflictError: another process (another extension service) holds it; the message names its pid.
    """
    secure_mkdir(workspace.home)
    path = writer_lock_path(workspace)
    try:
        return _acquire(path, "extension service", blocking=False, timeout_s=None)
    except _Busy as busy:
        raise ConflictError(
            f"workspace {workspace.home} already has a writer: {busy.holder.describe()} holds {path}; "
            "stop that extension service first (tmu-admin extension stop) or give this one another --home"
        ) from None


@contextlib.contextmanager
def model_lock(workspace: Workspace, model: str, *, blocking: bool = True, timeout_s: float | None = None,
               holder: str = "") -> Iterator[HeldLock]:
    """Hold ``<home>/locks/<model>.lock`` for the block: the one change to what ``model`` serves.

    Re-entrant within one thread (an inner call on the same model returns the outer lock).

    Args:
        workspace: the workspace.
        model: the model name.
        blocking: wait for the lock (False: one attempt).
        timeout_s: with ``blocking``, the most seconds to wait (None: no limit).
        holder: what the caller does, written into the lock file for others' messages: a job id, ``"rollback"``.

    Raises:
        ConflictError: another holder has it (``blocking=False``) or kept it past ``timeout_s``; the message
            names its pid and what it does.
        InvalidInputError: a bad model name, a negative ``timeout_s``, or ``timeout_s`` with ``blocking=False``.
    """
    _check_wait(blocking, timeout_s)
    path = model_lock_path(workspace, model)
    key = (str(path), threading.get_ident())
    with _held_guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is not None:
        try:
            yield entry[0]
        finally:
            with _held_guard:
                entry[1] -= 1
        return
    with _acquire_model(workspace, model, path, holder, blocking, timeout_s) as lock:
        with _held_guard:
            _held[key] = [lock, 0]
        try:
            yield lock
        finally:
            with _held_guard:
                _held.pop(key, None)


def _acquire_model(workspace: Workspace, model: str, path: Path, holder: str, blocking: bool,
                   timeout_s: float | None) -> HeldLock:
    secure_mkdir(workspace.locks_dir)
    try:
        return _acquire(path, holder or "unnamed holder", blocking=blocking, timeout_s=timeout_s)
    except _Busy as busy:
        waited = f" and did not release it within {timeout_s:g}s" if blocking else ""
        raise ConflictError(f"model {model!r} is busy: {busy.holder.describe()} holds its lock {path}{waited}; "
                            "only one forget job, rollback or recovery changes a model at a time, "
                            "try again when it has finished") from None


def _check_wait(blocking: bool, timeout_s: float | None) -> None:
    if timeout_s is None:
        return
    if not blocking:
        raise InvalidInputError(f"timeout_s={timeout_s!r} applies only with blocking=True; "
                                "give blocking=True or timeout_s=None")
    if not isinstance(timeout_s, (int, float)) or timeout_s < 0:
        raise InvalidInputError(f"timeout_s must be a number of seconds >= 0 or None, got {timeout_s!r}")


class _Busy(Exception):
    def __init__(self, holder: LockHolder) -> None:
        super().__init__(holder.describe())
        self.holder = holder


def _acquire(path: Path, what: str, *, blocking: bool, timeout_s: float | None) -> HeldLock:
    """Open (creating it 0600) and flock ``path``, then write this process as its holder.

    Raises:
        _Busy: not acquired (non-blocking, or not within ``timeout_s``).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
        if not _wait_flock(fd, blocking, timeout_s):
            raise _Busy(_holder_of(path))
        holder = LockHolder(pid=os.getpid(), what=what, since=utc_now())
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": holder.pid, "what": holder.what, "since": holder.since}).encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return HeldLock(path, fd, holder)


def _wait_flock(fd: int, blocking: bool, timeout_s: float | None) -> bool:
    if blocking and timeout_s is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    deadline = time.monotonic() + (timeout_s or 0.0)
    while True:
        if _try_flock(fd):
            return True
        if not blocking or time.monotonic() >= deadline:
            return False
        time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _holder_of(path: Path) -> LockHolder:
    """The holder of a busy lock; it may be writing its record right now, so look a few times."""
    for _ in range(5):
        holder = read_holder(path)
        if holder is not None:
            return holder
        time.sleep(0.02)
    return LockHolder(pid=None, what="")
