"""ASGI middleware of ``xybrid serve``: API key, body size, access log and metrics.

They sit below FastAPI at the ASGI level, so they also cover unknown routes
and streamed responses: the log line and the latency are written when the
last byte of a response has been sent, not when the handler returned.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any, Awaitable, Callable

from xybrid.server.errors import error_body

__all__ = ["AccessLog", "ApiKey", "BodyLimit"]

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("xybrid.server.access")

# Open without a key: liveness checks and the API's own description.
OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/openapi.json"})


async def _json(send: Send, status: int, body: dict[str, Any],
                headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class ApiKey:
    """``Authorization: Bearer KEY`` (or ``x-api-key: KEY``) on every path but
    the open ones; compared in constant time."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app = app
        self.key = key.encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
            elif name == b"x-api-key" and not given:
                given = value.strip()
        if not hmac.compare_digest(given, self.key):
            message = "missing API key" if not given else "invalid API key"
            await _json(send, 401, error_body(message + ": send 'Authorization: Bearer <key>'",
                                              "authentication_error", None, "invalid_api_key"),
                        {"WWW-Authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, whether the size
    is announced (Content-Length) or only found while reading (chunked)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    await self._refuse(send, 400, "Content-Length is not a number")
                    return
                if size > self.limit:
                    await self._refuse(send, 413, f"the request body of {size} bytes is over "
                                       f"this server's limit of {self.limit} bytes")
                    return
        # Read the whole body (at most limit + 1 bytes) before the app sees it,
        # then replay it: the app's body parser would turn any error raised
        # mid-read into a generic 400.
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected while sending
                return
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.limit:
                await self._refuse(send, 413, f"the request body is over this server's limit "
                                   f"of {self.limit} bytes")
                return
            chunks.append(body)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send: Send, status: int, message: str) -> None:
        await _json(send, status, error_body(message, "invalid_request_error", None,
                                             "request_too_large" if status == 413 else None))


class AccessLog:
    """One log line per request (method, path, status, tokens, time) and the
    request counters and latency histogram."""

    def __init__(self, app: ASGIApp, metrics: Any, enabled: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0
        finished = False
        state = scope.setdefault("state", {})

        async def watch(message: Message) -> None:
            nonlocal status, finished
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                finished = True
            await send(message)

        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.in_progress.dec()
            elapsed = time.perf_counter() - start
            label = state.get("route") or "other"  # set by the handlers: no label per bad URL
            shown = status or 499  # nothing sent: the client went away first
            if not finished and status:
                shown = status  # a stream cut short still logs its status
            self.metrics.requests.labels(label, str(shown)).inc()
            self.metrics.latency.labels(label).observe(elapsed)
            if self.enabled:
                tokens = state.get("tokens")
                tok = f" tokens={tokens[0]}+{tokens[1]}" if tokens else ""
                cut = "" if finished or not status else " (cut short)"
                log.info("%s %s %d%s %.1fms%s", scope["method"], scope["path"], shown, tok,
                         elapsed * 1000.0, cut)
