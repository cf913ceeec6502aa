"""Parts of the soak-and-chaos benchmark (``scripts/soak_chaos.py``): prediction clients, forget requests, faults,
and process clean-up. Every loop stops at its deadline or when the run's stop event is set; every
address is loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import sys
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests

FAULT_KINDS = ("kill_worker", "lock_db", "kill_torchserve")


class Events:
    """A timestamped log of what happened (faults, requests, restarts), echoed to stderr as it grows."""

    def __init__(self, t0: float) -> None:
        self.t0, self.items, self._lock = t0, [], threading.Lock()

    def add(self, kind: str, **details: Any) -> dict[str, Any]:
        item = {"t": round(time.time() - self.t0, 2), "kind": kind, **details}
        with self._lock:
            self.items.append(item)
        print(f"[{item['t']:8.1f}s] {kind} {json.dumps(details, default=str)}", file=sys.stderr, flush=True)
        return item


def is_token_refusal(resp: requests.Response) -> bool:
    """TorchServe 0.12 refuses a stale or expired key with 400 and ``"type": "InvalidKeyException"``."""
    if resp.status_code != 400:
        return resp.status_code == 401
    try:
        return resp.json().get("type") == "InvalidKeyException"
    except (ValueError, AttributeError):
        return False


class KeyFile:
    """The inference key of TorchServe's ``key_file.json``, re-read after a refusal as a client would."""

    def __init__(self, path: Path) -> None:
        self.path, self._lock = path, threading.Lock()
        self.key = self._read() or ""

    def _read(self) -> str | None:
        try:
            return json.loads(self.path.read_text())["inference"]["key"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # missing while TorchServe restarts, or caught half written

    def refresh(self, refused: str) -> str:
        """A key other than ``refused`` if the file gets one within about 2 s, else the file's key."""
        with self._lock:
            for _ in range(8):
                fresh = self._read()
                if fresh and fresh != refused:
                    self.key = fresh
                    return fresh
                time.sleep(0.25)
            return self.key


@dataclass
class Tally:
    """One client thread's results: successes as compact arrays, failures with their details."""

    ok_sent: array = field(default_factory=lambda: array("d"))
    ok_done: array = field(default_factory=lambda: array("d"))
    ok_model: array = field(default_factory=lambda: array("b"))
    failures: list[tuple[float, float, int, str]] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)
    token_retries: int = 0


class Load:
    """``clients`` threads, each sending one prediction at a time, alternating between the models."""

    def __init__(self, url: str, keys: KeyFile, models: list[str], images: list[bytes], clients: int) -> None:
        self.url, self.keys, self.models, self.images = url, keys, models, images
        self.stop = threading.Event()
        self.tallies = [Tally() for _ in range(clients)]
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def start(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _client(self, index: int) -> None:
        tally, session = self.tallies[index], requests.Session()
        n = index
        while not self.stop.is_set():
            model = n % len(self.models)
            sent = time.time()
            ok, detail = self._predict(session, self.models[model], self.images[n % len(self.images)], tally)
            done = time.time()
            if ok:
                tally.ok_sent.append(sent), tally.ok_done.append(done), tally.ok_model.append(model)
                key = f"{self.models[model]} v{detail}"
                tally.versions[key] = tally.versions.get(key, 0) + 1
            else:
                tally.failures.append((sent, done, model, detail))
                time.sleep(0.05)  # a client backs off a little after an error
            n += 1

    def _predict(self, session: requests.Session, model: str, image: bytes, tally: Tally) -> tuple[bool, str]:
        key = self.keys.key
        for attempt in range(4):
            try:
                resp = session.post(f"{self.url}/predictions/{model}", data=image, timeout=30,
                                    headers={"Authorization": f"Bearer {key}",
                                             "Content-Type": "application/octet-stream"})
            except requests.RequestException as err:
                return False, type(err).__name__
            if is_token_refusal(resp) and attempt < 3:
                tally.token_retries += 1
                key = self.keys.refresh(key)
                continue
            if resp.status_code == 200:
                try:
                    return True, str(resp.json().get("model_version", "?"))
                except ValueError:
                    return False, "200 without JSON"
            return False, f"HTTP {resp.status_code}: {resp.text.strip()[:120]}"
        return False, "token refused 4 times"

    def summary(self) -> dict[str, Any]:
        done = np.concatenate([np.frombuffer(t.ok_done, dtype=np.float64) for t in self.tallies])
        sent = np.concatenate([np.frombuffer(t.ok_sent, dtype=np.float64) for t in self.tallies])
        latency_ms = np.sort(done - sent) * 1000 if len(done) else np.zeros(1)
        versions: dict[str, int] = {}
        for tally in self.tallies:
            for key, count in tally.versions.items():
                versions[key] = versions.get(key, 0) + count
        return {"succeeded": len(done), "failed": sum(len(t.failures) for t in self.tallies),
                "token_retries": sum(t.token_retries for t in self.tallies), "versions": dict(sorted(versions.items())),
                "p50_ms": float(np.percentile(latency_ms, 50)), "p99_ms": float(np.percentile(latency_ms, 99)),
                "max_ms": float(latency_ms[-1])}

    def first_success_after(self, when: float, model: int) -> float | None:
        """When the first prediction of ``model`` sent at or after ``when`` succeeded (None: none did)."""
        best = None
        for tally in self.tallies:
            sent, done = np.frombuffer(tally.ok_sent), np.frombuffer(tally.ok_done)
            mask = (sent >= when) & (np.frombuffer(tally.ok_model, dtype=np.int8) == model)
            if mask.any():
                first = float(done[mask].min())
                best = first if best is None else min(best, first)
        return best

    def failures(self) -> list[tuple[float, float, int, str]]:
        return sorted(f for t in self.tallies for f in t.failures)


class Extension:
    """The management extension, found through its info and key files (re-read at every call)."""

    def __init__(self, workspace: Any) -> None:
        self.workspace = workspace

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 90.0) -> requests.Response:
        from tmu_core.service.server import read_info, read_key

        info = read_info(self.workspace)
        if info is None:
            raise requests.ConnectionError("the extension wrote no extension.json (not running?)")
        return requests.request(method, info.url + path, json=body, timeout=timeout,
                                headers={"Authorization": f"Bearer {read_key(self.workspace)}"})


def wait_for(stop: threading.Event, until: float) -> bool:
    """Sleep until ``until`` (epoch seconds); True when ``stop`` was set meanwhile."""
    return stop.wait(max(0.0, until - time.time()))


class Faults:
    """Injects one fault at a time at random points (seeded), cycling through every kind in shuffled rounds."""

    def __init__(self, ctx: Any, rng: random.Random, every: float, deadline: float, stop: threading.Event,
                 events: Events, restart: Callable[[], dict[str, Any]], lock_hold_s: float = 40.0) -> None:
        self.ctx, self.rng, self.every, self.deadline, self.stop = ctx, rng, every, deadline, stop
        self.events, self.restart, self.lock_hold_s = events, restart, lock_hold_s
        self.log: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        order: list[str] = []
        next_at = time.time() + self.every * self.rng.uniform(0.5, 1.0)
        while not wait_for(self.stop, next_at) and time.time() < self.deadline:
            if not order:
                order = list(FAULT_KINDS)
                self.rng.shuffle(order)
            kind = order.pop()
            try:
                self.log.append(getattr(self, kind)())
            except Exception as err:  # noqa: BLE001  (a fault that could not be injected is logged, never fatal)
                self.log.append(self.events.add(f"fault {kind} not injected", error=repr(err)))
            next_at = max(time.time(), next_at) + self.every * self.rng.uniform(0.5, 1.5)

    def kill_worker(self) -> dict[str, Any]:
        """SIGKILL a running forget job's worker process, a random moment into the job."""
        from tmu_core.forget.dispatcher import pid_runs_job

        until = min(self.deadline, time.time() + 2 * self.every)
        while not self.stop.is_set() and time.time() < until:
            jobs = self.ctx.extension.call("GET", "/jobs?state=running").json().get("jobs", [])
            job = next((j for j in jobs if j.get("worker_pid")), None)
            if job is not None:
                self.stop.wait(self.rng.uniform(0.2, 3.0))
                current = self.ctx.extension.call("GET", f"/jobs/{job['id']}").json()
                pid = current.get("worker_pid")
                if current.get("state") == "running" and pid_runs_job(pid, job["id"]):
                    os.kill(pid, signal.SIGKILL)
                    step = current.get("step") or (current.get("steps") or [{}])[-1].get("step")
                    return self.events.add("fault kill_worker", at=time.time(), job=job["id"], model=job["model"],
                                           pid=pid, step=step)
            self.stop.wait(0.5)
        return self.events.add("fault kill_worker skipped", at=time.time(), reason="no running job")

    def lock_db(self) -> dict[str, Any]:
        """Hold an exclusive lock on the state database past its busy timeout, then release it."""
        conn = sqlite3.connect(str(self.ctx.workspace.state_db), timeout=120, isolation_level=None)
        try:
            asked = time.time()
            conn.execute("BEGIN EXCLUSIVE")
            held_from = time.time()
            self.events.add("fault lock_db acquired", waited_s=round(held_from - asked, 2))
            self.stop.wait(self.lock_hold_s)
            conn.execute("ROLLBACK")
        finally:
            conn.close()
        return self.events.add("fault lock_db", at=held_from, held_s=round(time.time() - held_from, 2))

    def kill_torchserve(self) -> dict[str, Any]:
        """SIGKILL TorchServe's Java frontend, then restart it with ``tmu-admin serve start``."""
        from tmu_core.serving.torchserve import pid_alive

        pid = self.ctx.torchserve().pid()
        if pid is None:
            return self.events.add("fault kill_torchserve skipped", at=time.time(), reason="not running")
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        while pid_alive(pid) and time.time() < killed + 30:
            time.sleep(0.05)
        self.events.add("fault kill_torchserve killed", pid=pid)
        self.stop.wait(2.0)  # what a supervisor takes to notice
        restart = self.restart()
        return self.events.add("fault kill_torchserve", at=killed, pid=pid, restarted_at=restart["done_at"],
                               restart_s=round(restart["done_at"] - killed, 2), restart_rc=restart["rc"],
                               started=restart.get("started"))


def workspace_pids(home: Path) -> list[int]:
    """Processes other than this one whose command line names a path inside ``home`` (servers, workers)."""
    prefix, mine, found = str(home).rstrip("/"), os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == mine:
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a == prefix or a.startswith(prefix + "/") or f"={prefix}/" in a for a in args):
            found.append(int(entry.name))
    return found


def stop_leftovers(home: Path, grace_s: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL, each process still running from ``home``; returns their pids."""
    pids = workspace_pids(home)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in set(pids) & set(workspace_pids(home)):  # never a pid that exited and was reused
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + grace_s
        while time.time() < deadline and set(pids) & set(workspace_pids(home)):
            time.sleep(0.2)
    return pids


@dataclass
class ForgetRecord:
    """One data-centric forget request the run sent: which owners, their samples, and how it ended."""

    n: int
    key: str
    owners: list[str]
    samples: list[str]
    issued_at: float
    request_id: str | None = None
    accepted_at: float | None = None
    state: str = "unsent"
    finished_at: float | None = None
    jobs: list[Any] = field(default_factory=list)
    error: str = ""
    posts: int = 0

    @property
    def done(self) -> bool:
        return self.state in ("succeeded", "failed", "rejected", "lost")


class Forgets:
    """Sends a ``POST /forget`` for 1-3 random owners about every ``every`` seconds and follows each to its end.

    Before a request is sent, the stored bytes of each of its samples are read from the index's blob file, so
    that the end check can search the disk for them. After each request ends, the audit head is copied to
    ``heads_path`` (outside the workspace).
    """

    def __init__(self, ctx: Any, rng: random.Random, owners: list[str], every: float, deadline: float,
                 stop: threading.Event, events: Events, heads_path: Path) -> None:
        self.ctx, self.rng, self.owners, self.every, self.deadline = ctx, rng, owners, every, deadline
        self.stop, self.events, self.heads_path = stop, events, heads_path
        self.give_up_at = deadline
        self.records: list[ForgetRecord] = []
        self.images: dict[str, bytes] = {}
        self.last_head: Any = None
        self.finished = threading.Event()
        self.issuer = threading.Thread(target=self._issue, daemon=True)
        self.tracker = threading.Thread(target=self._track, daemon=True)

    def start(self) -> Forgets:
        self.issuer.start(), self.tracker.start()
        return self

    def _issue(self) -> None:
        asked: set[str] = set()
        next_at = time.time() + self.every * 0.5
        while not wait_for(self.stop, next_at) and time.time() < self.deadline:
            remaining = [o for o in self.owners if o not in asked]
            if not remaining:
                break
            chosen = sorted(self.rng.sample(remaining, min(len(remaining), self.rng.randint(1, 3))))
            asked.update(chosen)
            record = self._prepare(len(self.records), chosen)
            self.records.append(record)
            self._submit(record)
            next_at += self.every * self.rng.uniform(0.8, 1.2)

    def _prepare(self, n: int, owners: list[str]) -> ForgetRecord:
        from tmu_core.index import TrainingIndex

        index_dir = self.ctx.workspace.index_dir
        with TrainingIndex.open(index_dir) as index:
            samples = sorted(index.ids_for_owners(owners))
            records = index.lookup(samples)
        fd = os.open(index_dir / "blobs.bin", os.O_RDONLY)
        try:
            for record in records:
                self.images[record.sample_id] = os.pread(fd, record.length, record.offset)
        finally:
            os.close(fd)
        return ForgetRecord(n, f"soak-{self.ctx.seed}-{n}", owners, samples, time.time())

    def _submit(self, record: ForgetRecord) -> None:
        """POST until accepted (the same idempotency key each time), or refused for good, or past the deadline."""
        from tmu_core.errors import TmuError

        body = {"owner_ids": record.owners, "idempotency_key": record.key}
        while not self.stop.is_set() and time.time() < self.give_up_at:
            record.posts += 1
            try:
                resp = self.ctx.extension.call("POST", "/forget", body)
            except (requests.RequestException, TmuError) as err:
                record.error = repr(err)
            else:
                if resp.status_code in (200, 202):
                    answer = resp.json()
                    record.request_id, record.state = answer.get("request_id"), answer.get("state", "pending")
                    record.accepted_at, record.jobs = time.time(), answer.get("jobs", [])
                    self.events.add("forget accepted", n=record.n, request=record.request_id, owners=record.owners,
                                    samples=len(record.samples), posts=record.posts, state=record.state)
                    if record.state in ("succeeded", "failed"):
                        self._finish(record, answer)
                    return
                record.error = f"HTTP {resp.status_code}: {resp.text.strip()[:200]}"
                if resp.status_code < 500 and resp.status_code not in (408, 429):
                    record.state = "rejected"
                    self.events.add("forget rejected", n=record.n, error=record.error)
                    return
            self.events.add("forget post failed, retrying", n=record.n, error=record.error[:160])
            self.stop.wait(2.0)
        record.state = "lost"

    def _track(self) -> None:
        while not self.stop.wait(2.0):
            for record in [r for r in self.records if r.request_id and not r.done]:
                try:
                    answer = self.ctx.extension.call("GET", f"/requests/{record.request_id}", timeout=30).json()
                except Exception:  # noqa: BLE001, S112  (the extension busy or restarting: ask at the next pass)
                    continue
                record.jobs = answer.get("jobs", record.jobs)
                if answer.get("state") in ("succeeded", "failed"):
                    self._finish(record, answer)
            if self.finished.is_set():
                return

    def _finish(self, record: ForgetRecord, answer: dict[str, Any]) -> None:
        from tmu_core.state.audit import HEAD_NAME, read_head_file

        record.state, record.finished_at = answer["state"], time.time()
        if answer["state"] == "failed":
            record.error = str(answer.get("reason") or answer)[:300]
        head = read_head_file(self.ctx.workspace.home / HEAD_NAME)
        if head is not None:
            self.last_head = head
            with self.heads_path.open("a") as out:
                out.write(json.dumps({"request": record.request_id, "seq": head.seq, "hash": head.hash,
                                      "t": round(record.finished_at, 3)}) + "\n")
        self.events.add(f"forget {record.state}", n=record.n, request=record.request_id,
                        seconds=round(record.finished_at - (record.accepted_at or record.issued_at), 1),
                        head=str(head) if head else None)

    def drain(self, until: float) -> bool:
        """Wait until every request has ended, or ``until``; True when all have."""
        self.give_up_at = until
        self.issuer.join(timeout=max(0.0, until - time.time()))
        while time.time() < until and not self.stop.is_set():
            if all(r.done for r in self.records):
                return True
            self.stop.wait(1.0)
        return all(r.done for r in self.records)
