"""Request limits of the management extension: body size, ids per request, id length.

:class:`BodyLimit` is a pure ASGI middleware: a request whose ``Content-Length`` is over the limit is answered
413 before its body is read; a body without ``Content-Length`` (chunked) is counted while it is read and answered
413 as soon as it grows past the limit, so the service never holds more than ``max_bytes`` of one body. The
answer is the service's JSON error, ``{"error": ..., "code": "payload_too_large", "status": 413}``, and the
connection is closed (the rest of the body is never read).

The body models check ``MAX_IDS_PER_REQUEST`` and ``MAX_ID_LENGTH`` (422). ``MAX_BODY_BYTES`` leaves room for
a full list of maximum-length ASCII ids: 10,000 x (256 + 3) bytes is about 2.6 MB.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from tmu_core.errors import InvalidInputError

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_IDS_PER_REQUEST = 10_000
MAX_ID_LENGTH = 256

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    """Answer 413 to any HTTP request whose body is larger than ``max_bytes``.

    Args:
        app: the ASGI app to wrap.
        max_bytes: the largest body accepted, in bytes (> 0).

    Raises:
        InvalidInputError: ``max_bytes`` is not a positive integer.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise InvalidInputError(f"max_bytes must be a positive integer number of bytes, got {max_bytes!r}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            logger.warning("refused %s %s: Content-Length %d > %d", scope.get("method"), scope.get("path"),
                           declared, self.max_bytes)
            await _reject(send, f"the request body is {declared} bytes; the service accepts at most "
                                f"{self.max_bytes} bytes")
            return
        await _Guard(self.app, self.max_bytes, scope, receive, send).run()


class _Guard:
    """One request whose body is counted while the app reads it."""

    def __init__(self, app: ASGIApp, max_bytes: int, scope: Scope, receive: Receive, send: Send) -> None:
        self.app, self.max_bytes, self.scope = app, max_bytes, scope
        self._receive, self._send = receive, send
        self.received = 0
        self.exceeded = False  # the body grew past the limit before the app started its response
        self.started = False  # the app started its response
        self.answered = False  # the 413 was sent

    async def run(self) -> None:
        try:
            await self.app(self.scope, self.receive, self.send)
        except Exception:
            if not self.exceeded:
                raise
            # The app failed on the cut-off body (it sees a client disconnect); the 413 below is the answer.
        if self.exceeded and not self.answered:
            await self._answer()

    async def receive(self) -> Message:
        if self.exceeded:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.max_bytes and not self.started:
                self.exceeded = True
                logger.warning("refused %s %s: body grew past %d bytes", self.scope.get("method"),
                               self.scope.get("path"), self.max_bytes)
                return {"type": "http.disconnect"}  # the app stops reading; it never sees the extra bytes
        return message

    async def send(self, message: Message) -> None:
        if self.exceeded:
            if not self.answered:
                await self._answer()
            return  # the app's own answer to the cut-off body is dropped: the client gets the 413
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)

    async def _answer(self) -> None:
        self.answered = True
        await _reject(self._send, f"the request body grew past {self.max_bytes} bytes; the service accepts "
                                  f"at most {self.max_bytes} bytes")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


async def _reject(send: Send, message: str) -> None:
    # The same shape as tmu_core.service.app.error_body, built here so that this module stays a plain ASGI layer.
    body = json.dumps({"error": message, "code": "payload_too_large", "status": 413}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
