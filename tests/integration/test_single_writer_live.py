"""One writer per workspace: a second real extension process fails fast and leaves the first one alone."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import requests

from tmu_core.config import Workspace
from tmu_core.errors import ConflictError
from tmu_core.service import server
from tmu_core.state.jobs import JobStore
from tmu_core.state.locks import current_holder, writer_lock_path

pytestmark = pytest.mark.integration

CONFIG = server.ServiceConfig(worker=server.WorkerSettings(device="cpu"))


@pytest.fixture()
def workspace(tmp_path):
    ws = Workspace(home=tmp_path / "home", model_store=tmp_path / "store")
    yield ws
    server.stop(ws)


def _snapshot(workspace: Workspace) -> tuple[str, str, list]:
    jobs = [(j.id, j.state, j.reason) for j in JobStore(workspace.state_db).list(limit=100)]
    return server.read_key(workspace), (workspace.serve_dir / server.INFO_FILE).read_text(), jobs


def _answers_with(info: server.ServiceInfo, key: str) -> int:
    return requests.get(f"{info.url}/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code


def _with_a_finished_job(workspace: Workspace) -> None:
    jobs = JobStore(workspace.state_db)
    job = jobs.submit("m", ["s1"], owner_ids=[], options={"method": "tmu"})
    jobs.finish(job.id, "failed", reason="made by the test")


def test_second_start_fails_with_the_first_pid(workspace):
    _with_a_finished_job(workspace)
    first = server.start(workspace, CONFIG)
    before = _snapshot(workspace)
    with pytest.raises(ConflictError, match=f"pid {first.pid}"):
        server.start(workspace, CONFIG)
    assert _snapshot(workspace) == before
    assert _answers_with(first, before[0]) == 200


def test_a_second_service_process_exits_without_touching_the_first(workspace):
    _with_a_finished_job(workspace)
    first = server.start(workspace, CONFIG)
    before = _snapshot(workspace)
    cmd = [sys.executable, "-m", "tmu_core.service.server", "--home", str(workspace.home), "--model-store",
           str(workspace.model_store), "--device", "cpu"]
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert second.returncode == 3, second.stderr
    assert f"already has a writer: pid {first.pid} (extension service" in second.stderr
    assert _snapshot(workspace) == before
    assert _answers_with(first, server.read_key(workspace)) == 200
    assert server.status(workspace) == first


def test_concurrent_starts_leave_exactly_one_writer(workspace):
    results: list[object] = [None, None]

    def start(slot: int) -> None:
        try:
            results[slot] = server.start(workspace, CONFIG)
        except ConflictError as err:
            results[slot] = err

    threads = [threading.Thread(target=start, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    started = [r for r in results if isinstance(r, server.ServiceInfo)]
    refused = [r for r in results if isinstance(r, ConflictError)]
    assert len(started) == 1 and len(refused) == 1, results
    assert f"pid {started[0].pid}" in str(refused[0])
    assert _answers_with(started[0], server.read_key(workspace)) == 200


_STUBBORN = """
import json, signal, sys, time
from pathlib import Path
from tmu_core.config import Workspace
from tmu_core.state.locks import writer_lock
signal.signal(signal.SIGTERM, signal.SIG_IGN)
ws = Workspace(home=Path(sys.argv[1]), model_store=Path(sys.argv[2]))
lock = writer_lock(ws)
ws.serve_dir.mkdir(parents=True, exist_ok=True)
(ws.serve_dir / "extension.json").write_text(json.dumps({"url": "http://127.0.0.1:9", "port": 9, "pid": __import__("os").getpid(), "key_file": ""}))
print("ready", flush=True)
time.sleep(600)
"""


def test_stop_returns_only_when_a_stubborn_service_is_gone_and_the_workspace_free(workspace):
    """A service that ignores SIGTERM is killed, and stop() waits until its writer lock is free: a start right
    after it must not be refused."""
    proc = subprocess.Popen([sys.executable, "-c", _STUBBORN, str(workspace.home), str(workspace.model_store)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert server.status(workspace).pid == proc.pid
        assert server.stop(workspace, timeout=0.5)
        assert proc.poll() is not None or server._alive(proc.pid) is False
        assert current_holder(writer_lock_path(workspace)) is None
        started = server.start(workspace, CONFIG)
        assert _answers_with(started, server.read_key(workspace)) == 200
    finally:
        proc.kill()
        proc.wait(10)
