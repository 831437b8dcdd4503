"""The HTTP/1.1 protocol the gateway is served with: uvicorn's httptools protocol with
bounds on what one client can make the process hold. uvicorn 0.54 with httptools 0.9
sets none of these (measured: it buffered a 2 MB header and passed it on, and kept
connections that sent a header line a second, or half a body, for good).

- **Head size** (`limits.max_header_bytes`): a head that arrives whole is measured when
  its headers are complete (URL plus header names and values), once per request; a
  head still unfinished after a read is counted read by read, so one endless header
  cannot grow the buffer past the limit plus one read. 431.
- **Time**: a head must arrive whole within `head_timeout_s` of its first byte (of
  the connection's opening, for its first request: a connection that sends nothing
  is held no longer); a body within `body_timeout_s` of the head's end, with no gap
  between reads longer than `body_idle_s`. Otherwise 408 while an answer can still be
  written, and the connection closed; the app's `receive()` sees `http.disconnect`,
  so a request cut off in its body never reaches a worker. Between requests,
  uvicorn's keep-alive timer closes a connection idle for `keepalive_idle_s`.
- **Count** (`max_connections`): beyond it a new connection is answered 503 with
  `Retry-After` and closed at once, before it is read: the process holds a bounded
  number of descriptors and never fails on EMFILE. (uvicorn's `limit_concurrency`
  answers only once a head has arrived, which a slow client may never send.)

Time costs the fast path nothing but a few attribute writes: a connection has one
timer handle (`loop.call_at`), armed only while a head or body is unfinished at the
end of a read and cancelled when the request is complete, so a request that arrives
in one read arms none (the first request's head timer is armed at the connection's
opening). It is not moved on every read of a body: it fires at the earliest moment
the request could be due and re-arms itself if bytes came meanwhile.

Every answer written here comes from `gateway.errors.error_response`, the one error
table, in the gateway's JSON shape (uvicorn's own 400 is plain text).

`uvicorn_config` is the one uvicorn configuration that `gateway serve`, the demo, sim
workers and gateway.testing's in-process servers all start from.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.errors import (
    HeadersTooLarge,
    MalformedRequest,
    Overloaded,
    RequestError,
    RequestTimeout,
    error_response,
)
from gateway.logs import log_config
from gateway.registry import LimitsSpec

log = logging.getLogger("gateway.server")

# What `gateway serve` names to uvicorn: an import string, because `--processes N`
# sends its config to fresh processes, which import this class; each process's app
# (`gateway.app.app_from_env`) then gives it the registry's limits, before uvicorn
# accepts a connection (`use_served_limits`).
SERVED_PROTOCOL = "gateway.server:BoundedHttpToolsProtocol"

# Connections this process cut off, by reason (head_timeout, body_timeout, body_idle,
# max_connections). Module-level because uvicorn makes each protocol instance itself
# and hands it no app object; the app's metrics task copies these totals into
# `gateway_client_cutoffs_total` (one process serves one app). Written only when a
# connection is cut, never on the fast path.
CUTOFFS: collections.Counter[str] = collections.Counter()


@dataclass(frozen=True)
class ServerLimits:
    """The server's part of `LimitsSpec`, resolved: `max_connections` is a number."""

    max_head_bytes: int
    head_timeout_s: float
    body_timeout_s: float
    body_idle_s: float
    keepalive_idle_s: float
    max_connections: int

    @classmethod
    def of(cls, spec: LimitsSpec) -> ServerLimits:
        return cls(
            max_head_bytes=spec.max_header_bytes,
            head_timeout_s=spec.head_timeout_s,
            body_timeout_s=spec.body_timeout_s,
            body_idle_s=spec.body_idle_s,
            keepalive_idle_s=spec.keepalive_idle_s,
            max_connections=spec.max_connections or connections_for(fd_limit()),
        )


def fd_limit() -> int:
    """This process's soft limit on open files (RLIMIT_NOFILE)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 2**20 if soft == resource.RLIM_INFINITY else soft


def connections_for(fd_limit: int) -> int:
    """Client connections a process may hold under `fd_limit` descriptors: all but a
    reserve of a quarter of them, at least 256, for everything else it opens: worker
    connections (aiohttp's pool holds up to max(100, 2 x the pools' slots)), Redis
    pools, listening sockets, log and metrics files. 1024 -> 768; 1048576 -> 786432."""
    return max(1, fd_limit - max(256, fd_limit // 4))


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one, as Go's runtime does at start and
    nginx's `worker_rlimit_nofile` is set for: the soft 1024 many hosts still give a
    process is the limit of select(), which nothing here uses (uvloop is epoll). The
    processes `--processes N` starts inherit it. Returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # a sandbox may refuse; the soft one holds
            log.warning("could not raise the open-files limit to %d: %s", hard, exc)
    return fd_limit()


# Where a connection is in its current request (_DONE: one ended in the latest read).
_IDLE, _HEAD, _BODY, _DONE = 0, 1, 2, 3


class _HeadTooLarge(Exception):
    """Raised in a parser callback to stop parsing; uvicorn then calls send_400_response."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    limits = ServerLimits.of(LimitsSpec())  # `use_served_limits` sets the served ones

    _phase = _IDLE
    _timer: asyncio.TimerHandle | None = None  # armed while a head or body is unfinished
    _head_due = 0.0  # loop time the head must be whole by (0: set at the read's end)
    _body_due = 0.0  # loop time the body must be whole by (0: set at the read's end)
    _last_read = 0.0  # loop time of the body's latest read
    _begun = 0  # requests begun on this connection
    _unfinished = 0  # bytes of reads that began and ended inside the current head
    _too_large = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self.transport = transport
            self._refuse_connection()
            return
        super().connection_made(transport)
        # uvicorn's own keep-alive timer, which takes a float (typed int upstream).
        self.timeout_keep_alive = self.limits.keepalive_idle_s  # type: ignore[assignment]
        # The first head's clock starts now: a connection that sends nothing is cut too.
        self._phase = _HEAD
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        begun = self._begun
        super().data_received(data)
        phase = self._phase
        if self.transport.is_closing():
            return
        if phase == _DONE:
            self._phase = _IDLE
            return
        if phase == _IDLE:
            # A read that neither began nor ended a request, while none is being
            # answered: the empty lines a head may follow. The head's clock starts
            # with them, or a client sending one every few seconds (each cancels
            # uvicorn's keep-alive timer) would hold the connection for good.
            if not self._answering():
                self._phase = _HEAD
                self._arm_head_timer()
            return
        if phase == _HEAD:
            # Only a read that began and ended inside one head is counted: every byte
            # of it is head. The read a head starts in (which may end another
            # request's body) is not: that leaves the buffer bounded by the limit
            # plus one read.
            if self._begun == begun:
                self._unfinished += len(data)
                if self._unfinished > self.limits.max_head_bytes:
                    self._refuse_head()
                    return
            if self._timer is None:  # the head began in this read
                self._arm_head_timer()
            return
        now = self._last_read = self.loop.time()
        if not self._body_due:  # the head ended in this read
            self._body_due = now + self.limits.body_timeout_s
        if self._timer is None:
            self._timer = self.loop.call_at(self._body_deadline(), self._on_timer)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase, self._unfinished = _HEAD, 0
        self._begun += 1

    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(name) + len(value) for name, value in self.headers)
        if size > self.limits.max_head_bytes:
            self._too_large = True
            raise _HeadTooLarge
        self._stop_timer()  # the head's: the body's deadlines are its own
        self._phase, self._body_due = _BODY, 0.0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._phase = _DONE
        self._stop_timer()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if self._too_large:
            self._refuse_head()
        else:
            self._answer_and_close(MalformedRequest(msg))

    def _arm_head_timer(self) -> None:
        self._head_due = self.loop.time() + self.limits.head_timeout_s
        self._timer = self.loop.call_at(self._head_due, self._on_timer)

    def _body_deadline(self) -> float:
        return min(self._body_due, self._last_read + self.limits.body_idle_s)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return  # closed, or handed to uvicorn's WebSocket protocol by an upgrade
        now = self.loop.time()
        if self._phase == _HEAD:
            due = self._head_due
            if now >= due:
                if not self._answering():
                    self._cut_off("head_timeout")
                    return
                # The client sent the next head while we still answer the last one:
                # its wait is ours; check again once the answer may be done.
                due = now + self.limits.head_timeout_s
        elif self._phase == _BODY:
            if self.flow.read_paused or self.pipeline:
                # We are not reading (a pipelined request waits its turn, or the app
                # has not taken the body so far): not the client's delay.
                self._last_read = now
                self._body_due = max(self._body_due, now + self.limits.body_idle_s)
            due = self._body_deadline()
            if now >= due:
                self._cut_off("body_timeout" if now >= self._body_due else "body_idle")
                return
        else:
            return
        self._timer = self.loop.call_at(due, self._on_timer)

    def _answering(self) -> bool:
        """An answer to an earlier request on this connection is still being written."""
        return self.cycle is not None and not self.cycle.response_complete

    def _cut_off(self, reason: str) -> None:
        CUTOFFS[reason] += 1
        limits = self.limits
        if reason == "head_timeout":
            detail = f"request head not received within {limits.head_timeout_s:g}s"
        elif reason == "body_timeout":
            detail = f"request body not received within {limits.body_timeout_s:g}s"
        else:
            detail = f"request body stalled: nothing received for {limits.body_idle_s:g}s"
        cycle = self.cycle
        if self._phase == _BODY and cycle is not None:
            # The app waiting on this body sees a disconnect now, and anything it
            # sends after is dropped: the 408 below is the connection's last answer.
            started = cycle.response_started
            cycle.disconnected = True
            cycle.message_event.set()
            if started:  # too late for a status: just close
                self.transport.close()
                return
        self._answer_and_close(RequestTimeout(detail))

    def _refuse_head(self) -> None:
        self._answer_and_close(HeadersTooLarge(self.limits.max_head_bytes))

    def _refuse_connection(self) -> None:
        CUTOFFS["max_connections"] += 1
        if _due_to_log():
            log.warning(
                "connection refused with 503: %d open, the limit (limits.max_connections); "
                "%d refused since start",
                len(self.connections),
                CUTOFFS["max_connections"],
            )
        exc = Overloaded("too many open connections; try again later", retry_after_s=1)
        self._answer_and_close(exc)

    def _answer_and_close(self, exc: RequestError) -> None:
        response = error_response(exc)
        head = [STATUS_LINE[response.status_code]]
        for name, value in response.raw_headers:
            if name != b"connection":
                head += [name, b": ", value, b"\r\n"]
        head.append(b"connection: close\r\n\r\n")
        self.transport.write(b"".join(head) + response.body)
        self.transport.close()


_last_log = float("-inf")


def _due_to_log(every_s: float = 60.0) -> bool:
    """True at most once a minute: a flood of refusals is one log line, not thousands."""
    global _last_log
    now = time.monotonic()
    if now - _last_log < every_s:
        return False
    _last_log = now
    return True


def use_served_limits(spec: LimitsSpec) -> ServerLimits:
    """The limits of SERVED_PROTOCOL in this process: called by each served process's
    app factory, once, before uvicorn accepts a connection (uvicorn makes the protocol
    instances itself, from the class, and hands them no app)."""
    limits = BoundedHttpToolsProtocol.limits = ServerLimits.of(spec)
    return limits


def bounded_protocol(spec: LimitsSpec) -> type[BoundedHttpToolsProtocol]:
    """A protocol class for one in-process server (uvicorn takes a class, not an
    instance): the demo's, sim workers', and tests' that run several side by side.
    The fd limit is left as it is."""

    class Bounded(BoundedHttpToolsProtocol):
        limits = ServerLimits.of(spec)

    return Bounded


def uvicorn_config(
    app: ASGIApp | str,
    *,
    log_level: str,
    host: str = "127.0.0.1",
    port: int = 0,
    http: type[BoundedHttpToolsProtocol] | str | None = None,
    limits: LimitsSpec | None = None,
    configure_logging: bool = True,
    **options: Any,
) -> uvicorn.Config:
    """Every server of ours (`gateway serve`, the demo, sim workers, gateway.testing):
    uvloop + httptools and no access log, measured as what the hot path needs;
    httptools bounded in head size, time and connections (`http`, else a class bounded
    by `limits`, default ones if None; uvicorn's `timeout_keep_alive` is the class's
    too); no `Server` header, which would only tell a scanner what to try.
    `configure_logging=False` leaves the process's logging as it is (for a server
    inside a test run); `options` go to uvicorn.Config as they are."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        log_config=log_config(log_level) if configure_logging else None,
        loop="uvloop",
        http=http or bounded_protocol(limits or LimitsSpec()),
        access_log=False,
        server_header=False,
        **options,
    )
