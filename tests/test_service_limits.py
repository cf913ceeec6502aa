"""BodyLimit: 413 with the service's JSON error for an over-long body, declared or chunked, never buffering it."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from fastapi.testclient import TestClient

from tmu_core.config import Workspace
from tmu_core.errors import InvalidInputError
from tmu_core.service.app import ServiceState, create_app
from tmu_core.service.limits import MAX_BODY_BYTES, MAX_ID_LENGTH, MAX_IDS_PER_REQUEST, BodyLimit
from tmu_core.service.server import ServiceConfig, in_process

KEY = "k" * 43


class EchoApp:
    """Reads the whole body, then answers 200 with its length; records what it saw."""

    def __init__(self, fail_on_disconnect: bool = False) -> None:
        self.calls = 0
        self.fail_on_disconnect = fail_on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        self.calls += 1
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if self.fail_on_disconnect:
                    raise RuntimeError("client went away")
                await send({"type": "http.response.start", "status": 400, "headers": []})
                await send({"type": "http.response.body", "body": b"cut off"})
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(size).encode()})


def drive(app, chunks: list[bytes], headers: list[tuple[bytes, bytes]] = ()) -> tuple[list[dict], int]:
    """Run one HTTP request through ``app``; returns the messages sent and how many body chunks were pulled."""
    pulled = 0
    sent: list[dict] = []

    async def receive():
        nonlocal pulled
        if pulled >= len(chunks):
            return {"type": "http.disconnect"}
        pulled += 1
        return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/forget/m", "headers": list(headers)}
    asyncio.run(app(scope, receive, send))
    return sent, pulled


def answer(sent: list[dict]) -> tuple[int, dict | bytes]:
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return status, json.loads(body) if status == 413 else body


def test_declared_length_over_the_limit_is_refused_unread():
    inner = EchoApp()
    sent, pulled = drive(BodyLimit(inner, 100), [b"x" * 50], [(b"content-length", b"101")])
    status, body = answer(sent)
    assert status == 413 and pulled == 0 and inner.calls == 0
    assert body == {"error": "the request body is 101 bytes; the service accepts at most 100 bytes",
                    "code": "payload_too_large", "status": 413}
    assert (b"connection", b"close") in sent[0]["headers"]


def test_chunked_body_is_cut_off_as_soon_as_it_passes_the_limit():
    inner = EchoApp()
    chunks = [b"x" * 40] * 100  # 4,000 bytes offered, limit 100
    sent, pulled = drive(BodyLimit(inner, 100), chunks)
    status, body = answer(sent)
    assert status == 413 and body["code"] == "payload_too_large"
    assert body["error"] == "the request body grew past 100 bytes; the service accepts at most 100 bytes"
    assert pulled == 3  # 40 + 40 + 40 > 100: nothing past the chunk that crossed the limit was read
    assert len(sent) == 2  # the app's own 400 for the cut-off body was dropped


def test_app_failing_on_the_cut_off_body_still_answers_413():
    sent, _ = drive(BodyLimit(EchoApp(fail_on_disconnect=True), 10), [b"x" * 8] * 4)
    assert answer(sent)[0] == 413


def test_bodies_at_the_limit_pass_through():
    sent, pulled = drive(BodyLimit(EchoApp(), 100), [b"x" * 50, b"y" * 50], [(b"content-length", b"100")])
    assert answer(sent) == (200, b"100") and pulled == 2


def test_other_errors_of_the_app_are_not_swallowed():
    async def broken(scope, receive, send):
        raise KeyError("boom")

    with pytest.raises(KeyError):
        drive(BodyLimit(broken, 100), [b"x"])


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1"])
def test_max_bytes_must_be_a_positive_integer(bad):
    with pytest.raises(InvalidInputError, match="max_bytes must be a positive integer"):
        BodyLimit(EchoApp(), bad)


def test_limits_fit_together():
    ids = ["i" * MAX_ID_LENGTH] * MAX_IDS_PER_REQUEST
    assert len(json.dumps({"sample_ids": ids}).encode()) < MAX_BODY_BYTES


@pytest.fixture()
def client(tmp_path):
    workspace = Workspace(home=tmp_path / "home", model_store=tmp_path / "store")
    return TestClient(create_app(ServiceState.open(workspace, KEY)))


def test_app_refuses_a_large_body_before_the_token_check(client):
    response = client.post("/forget/m", content=b"[" + b" " * MAX_BODY_BYTES + b"]")
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large" and response.json()["status"] == 413
    assert str(MAX_BODY_BYTES) in response.json()["error"]


def test_app_still_answers_small_bodies(client):
    response = client.post("/forget/m", json={"unknown_field": 1}, headers={"Authorization": f"Bearer {KEY}"})
    # The body was read and validated: the answer names its bad field (the validation status is the app's own).
    assert response.status_code in (400, 422) and response.json()["code"] == "invalid_input"
    assert "unknown_field" in response.json()["error"]


def _chunked_post(url: str, key: str, total: int, chunk: int = 64 * 1024) -> bytes:
    """POST ``total`` bytes with Transfer-Encoding: chunked over a raw socket; returns the raw response."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    try:
        sock.sendall(b"POST /forget/m HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer %s\r\nTransfer-Encoding: chunked\r\n\r\n" % key.encode())
        payload = b"%x\r\n%s\r\n" % (chunk, b" " * chunk)
        try:
            for _ in range(total // chunk):
                sock.sendall(payload)
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed the connection while the body was still coming
        data = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                part = sock.recv(65536)
            except OSError:
                break
            if not part:
                break
            data += part
        return data
    finally:
        sock.close()


def test_real_server_cuts_off_a_chunked_body(tmp_path):
    workspace = Workspace(home=tmp_path / "home", model_store=tmp_path / "store")
    with in_process(workspace, ServiceConfig(run_jobs=False)) as service:
        raw = _chunked_post(service.url, service.key, 4 * MAX_BODY_BYTES)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), raw[:200]
    assert json.loads(body)["code"] == "payload_too_large"
