"""Writer and model locks: exclusive across processes and threads, released when the holder dies, timeouts."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from tmu_core.config import Workspace
from tmu_core.errors import ConflictError, InvalidInputError
from tmu_core.state.locks import (
    current_holder,
    model_lock,
    model_lock_path,
    read_holder,
    writer_lock,
    writer_lock_path,
)

HOLD = """
import sys, time
from tmu_core.config import Workspace
from tmu_core.state.locks import model_lock, writer_lock
ws = Workspace(home=sys.argv[1], model_store=sys.argv[2])
kind, hold_s = sys.argv[3], float(sys.argv[4])
lock = writer_lock(ws) if kind == "writer" else model_lock(ws, "m", holder=kind)
with lock:
    print("locked", flush=True)
    time.sleep(hold_s)
"""


@pytest.fixture()
def workspace(tmp_path):
    return Workspace(home=tmp_path / "home", model_store=tmp_path / "store")


@pytest.fixture()
def holder_process(workspace):
    """Start a process that takes a lock (``writer`` or a model lock with that holder) and keeps it."""
    procs: list[subprocess.Popen] = []

    def start(kind: str, hold_s: float = 60.0) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workspace.home), str(workspace.model_store), kind,
                                 str(hold_s)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_writer_lock_names_this_process_and_is_private(workspace):
    old = os.umask(0)  # a library caller with a permissive umask still gets a private lock file
    try:
        with writer_lock(workspace) as lock:
            assert lock.held and lock.path == writer_lock_path(workspace)
            assert _mode(lock.path) == 0o600
            holder = read_holder(lock.path)
            assert holder.pid == os.getpid() and holder.what == "extension service" and holder.since
        assert not lock.held and current_holder(lock.path) is None and read_holder(lock.path) is None
    finally:
        os.umask(old)


def test_second_writer_in_this_process_fails_fast(workspace):
    with writer_lock(workspace):
        started = time.monotonic()
        with pytest.raises(ConflictError) as caught:
            writer_lock(workspace)
        assert time.monotonic() - started < 1.0
    assert f"already has a writer: pid {os.getpid()} (extension service" in str(caught.value)
    assert "tmu-admin extension stop" in str(caught.value)
    writer_lock(workspace).release()  # free again once released


def test_writer_held_by_another_process_names_its_pid(workspace, holder_process):
    proc = holder_process("writer")
    with pytest.raises(ConflictError, match=f"pid {proc.pid} \\(extension service"):
        writer_lock(workspace)
    assert current_holder(writer_lock_path(workspace)).pid == proc.pid


def test_killed_holder_releases_the_lock(workspace, holder_process):
    proc = holder_process("j-1")
    with pytest.raises(ConflictError, match=f"pid {proc.pid} \\(j-1"):
        with model_lock(workspace, "m", blocking=False):
            pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    with model_lock(workspace, "m", blocking=False, holder="rollback") as lock:
        assert read_holder(lock.path).pid == os.getpid() and read_holder(lock.path).what == "rollback"


def test_non_blocking_attempt_says_who_holds_the_model(workspace, holder_process):
    proc = holder_process("rollback")
    with pytest.raises(ConflictError) as caught:
        with model_lock(workspace, "m", blocking=False, holder="j-2"):
            pass
    message = str(caught.value)
    assert message.startswith(f"model 'm' is busy: pid {proc.pid} (rollback, since ")
    assert str(model_lock_path(workspace, "m")) in message and "try again" in message


def test_timeout_gives_up_after_the_limit(workspace, holder_process):
    proc = holder_process("j-3")
    started = time.monotonic()
    with pytest.raises(ConflictError, match=f"pid {proc.pid} \\(j-3.*did not release it within 0.3s"):
        with model_lock(workspace, "m", timeout_s=0.3):
            pass
    assert 0.3 <= time.monotonic() - started < 2.0


def test_zero_timeout_is_one_attempt(workspace, holder_process):
    holder_process("j-4")
    with pytest.raises(ConflictError, match="within 0s"):
        with model_lock(workspace, "m", timeout_s=0):
            pass


@pytest.mark.parametrize("timeout_s", [5.0, None])
def test_blocking_waits_for_the_holder_to_finish(workspace, holder_process, timeout_s):
    holder_process("j-5", hold_s=0.5)
    started = time.monotonic()
    with model_lock(workspace, "m", timeout_s=timeout_s, holder="j-6") as lock:
        waited = time.monotonic() - started
        assert read_holder(lock.path).what == "j-6"
    assert 0.2 < waited < 5.0


def test_other_models_are_independent(workspace, holder_process):
    holder_process("j-7")
    with model_lock(workspace, "other", blocking=False) as lock:
        assert lock.path.name == "other.lock"


def test_threads_of_one_process_exclude_each_other(workspace):
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with model_lock(workspace, "m", holder="recovery of j-8"):
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert entered.wait(10)
        with pytest.raises(ConflictError, match="recovery of j-8"):
            with model_lock(workspace, "m", blocking=False, holder="rollback"):
                pass
    finally:
        release.set()
        thread.join(10)
    with model_lock(workspace, "m", blocking=False):
        pass


def test_re_entrant_within_one_thread(workspace):
    with model_lock(workspace, "m", holder="j-9") as outer:
        with model_lock(workspace, "m", blocking=False, holder="inner") as inner:
            assert inner is outer and read_holder(outer.path).what == "j-9"
        assert outer.held
    assert not outer.held and current_holder(outer.path) is None


def test_lock_folder_is_private(workspace):
    old = os.umask(0)
    try:
        with model_lock(workspace, "m") as lock:
            assert _mode(workspace.locks_dir) == 0o700 and _mode(lock.path) == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 129, None])
def test_model_name_must_be_a_plain_name(workspace, name):
    with pytest.raises(InvalidInputError, match="cannot name a lock file; use 1 to 128 letters"):
        with model_lock(workspace, name):
            pass


def test_wait_arguments_are_checked(workspace):
    with pytest.raises(InvalidInputError, match="applies only with blocking=True"):
        with model_lock(workspace, "m", blocking=False, timeout_s=1.0):
            pass
    with pytest.raises(InvalidInputError, match="timeout_s must be a number of seconds >= 0"):
        with model_lock(workspace, "m", timeout_s=-1):
            pass
