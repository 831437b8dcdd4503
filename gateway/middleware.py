"""Cross-cutting concerns as pure ASGI middleware (no BaseHTTPMiddleware: it costs
~0.3 ms and much throughput per request here)."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import cast

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, HTTPExceptionHandler, Message, Receive, Scope, Send

from gateway.errors import EXCEPTION_HANDLERS, PayloadTooLarge, error_response
from gateway.logs import ACCESS_LOGGER
from gateway.metrics import Metrics, Trace

GENERATION_PATH = "/v1/images/generations"
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes: no log
REQUEST_ID_HEADER = b"x-request-id"
Endpoint = Callable[[Request], Awaitable[Response]]
_SAFE_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER and _SAFE_ID.match(value):
            return str(value.decode("ascii"))
    # 128 random bits as 32 hex digits, like uuid4().hex, at an eighth of its cost
    # (uuid4 builds a UUID object to set 6 version bits nobody reads).
    return os.urandom(16).hex()


class GatewayMiddleware:
    """Every cross-cutting concern of a request, as one ASGI layer (three layers cost
    three coroutine frames and three `send` wrappers a request, measured in
    bench/overhead.py --yardstick):

    - **request id**: a safe `X-Request-ID` from the client, or a new one; echoed on
      every response (errors included) and left in `scope["state"]["request_id"]`;
    - **observe**: request metrics and one JSON access-log line per request, from the
      `Trace` the pipeline fills in (left in `scope["state"]["trace"]`); `X-Cache` on
      every generation error answer;
    - **body limit**: 413 for a request body over `max_bytes`, before the rest of it is
      read. With a Content-Length the answer comes at once: the server never reads past
      that length, so a request within it needs no further watching (the common case
      costs one header scan). Without one (a chunked body) the bytes are counted as the
      app receives them, and the read that passes the limit raises PayloadTooLarge,
      which the app's error table turns into the same JSON 413.

    `generation`, when given, is the `POST /v1/images/generations` endpoint, called
    from here rather than through Starlette's exception middleware, router and route
    wrapper (four more layers, a route-by-route match, on the request the gateway
    exists for): its errors go through the same table (`EXCEPTION_HANDLERS`, the
    handler of the nearest class), and an error with none there (a bug) propagates to
    Starlette's 500 as before. Every other request, and any other method on that path
    (405), goes through the app.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        max_bytes: int,
        generation: Endpoint | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_bytes = max_bytes
        self.generation = generation
        self.log = logging.getLogger(ACCESS_LOGGER)
        # Exception (a bug) is left to Starlette's ServerErrorMiddleware, as there.
        self.handlers: dict[type, HTTPExceptionHandler] = {
            kind: cast(HTTPExceptionHandler, handler)
            for kind, handler in EXCEPTION_HANDLERS.items()
            if kind is not Exception
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        trace = state["trace"] = Trace()
        raw_id = request_id.encode()
        generation = scope["path"] == GENERATION_PATH
        status = 500  # what the client gets if the app raises before answering

        async def send_noted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ())]
                if status >= 400 and generation:
                    # X-Cache on every generation answer, errors too (a success sets its own).
                    headers.append((b"x-cache", (trace.cache or "bypass").encode()))
                headers.append((REQUEST_ID_HEADER, raw_id))
                message["headers"] = headers
            await send(message)

        try:
            length = _content_length(scope)
            if length is None:
                receive = _counting(receive, self.max_bytes)
            elif length > self.max_bytes:
                await error_response(PayloadTooLarge(self.max_bytes))(scope, receive, send_noted)
                return
            if generation and self.generation is not None and scope["method"] == "POST":
                await self._call(self.generation, scope, receive, send_noted)
            else:
                await self.app(scope, receive, send_noted)
        finally:
            elapsed = time.perf_counter() - started
            if generation:
                self.metrics.observe_request(trace, status, elapsed)
            if scope["path"] not in QUIET_PATHS and self.log.isEnabledFor(logging.INFO):
                self._access_log(_access_fields(scope, trace, status, elapsed))

    async def _call(self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        """What Starlette's route wrapper does for an endpoint: a Request, the answer,
        and an exception turned into its handler's answer unless one already began."""
        request = Request(scope, receive, send)
        started = False

        async def send_started(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            response = await endpoint(request)
            await response(scope, receive, send_started)
        except Exception as exc:
            kinds = type(exc).__mro__
            handler = next((self.handlers[k] for k in kinds if k in self.handlers), None)
            if handler is None or started:
                raise
            # The table's handlers are all coroutines (gateway.errors).
            answer = await cast(Awaitable[Response], handler(request, exc))
            await answer(scope, receive, send)

    def _access_log(self, fields: dict[str, object]) -> None:
        """`log.info("request", extra={"fields": fields})` without its search of the
        stack for the caller's file and line, which no access line shows: a third of
        the line's cost."""
        log = self.log
        extra = {"fields": fields}
        log.handle(log.makeRecord(log.name, logging.INFO, "", 0, "request", (), None, extra=extra))


def _access_fields(scope: Scope, trace: Trace, status: int, elapsed: float) -> dict[str, object]:
    state = scope["state"]
    fields: dict[str, object] = {
        "request_id": state.get("request_id"),
        "method": scope["method"],
        "path": scope["path"],
        "status": status,
        "duration_ms": round(elapsed * 1000, 2),
    }
    if scope["path"] == GENERATION_PATH:
        fields.update(
            adapter=trace.adapter,
            pool=trace.pool,
            worker=trace.worker,
            cache=trace.cache,
            seed=trace.seed,
            upstream_ms=round(trace.upstream_s * 1000, 2),
            queue_ms=round(trace.queue_s * 1000, 2),
        )
        if trace.prompt is not None:
            fields["prompt"] = trace.prompt
    if "key_name" in state:
        fields["key"] = state["key_name"]  # the key's name from the registry, never the key
    return fields


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            # The server has already refused a malformed one; digits only here.
            return int(value) if value.isdigit() else None
    return None


def _counting(receive: Receive, max_bytes: int) -> Receive:
    seen = 0

    async def receive_counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > max_bytes:
                raise PayloadTooLarge(max_bytes)
        return message

    return receive_counted
