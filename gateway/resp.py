"""The cache's hot read: Redis GET over one pipelined connection, read into one buffer.

A cache hit is one GET of a whole answer (~150 KB). redis-py's asyncio client spends
about five times the CPU of the read itself on it: its StreamReader copies every
chunk into a buffer and out again, and each command takes a pooled connection, packs
its arguments and arms a timeout. Here (measured in bench/README.md, issue 14):

- **one connection per process**, its GETs pipelined: each writes its command and
  waits for its reply in order (RESP answers in order), so concurrent hits share the
  socket's reads;
- **one buffer**: an `asyncio.BufferedProtocol` receives straight into a preallocated
  `bytearray` (grown for a larger reply), and a value is copied once, out of it.

Only GET goes this way, and only for `redis://` and `unix://` URLs: TLS, Cluster and
every write (SET, the coalescer's locks) stay with redis-py (`gateway.cache`).
Failures are redis-py's exception types (an error reply is a `ResponseError`, a lost
or broken connection a `ConnectionError`), which the cache turns into
`CacheUnavailable`. A GET given up before its reply (its deadline passed) closes the
connection, failing the others waiting on it (misses, never errors to a client): a
stalled connection is dropped, not waited on, and the next GET connects afresh.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError, ResponseError

_INITIAL_BUFFER = 256 * 1024  # a typical answer in one piece: ~150 KB
_MIN_FREE = 64 * 1024  # what a read is offered at least


@dataclass(frozen=True)
class Where:
    """A redis:// or unix:// URL's parts, by redis-py's own parser."""

    host: str | None
    port: int
    path: str | None
    username: str | None
    password: str | None
    db: int

    @classmethod
    def of(cls, url: str) -> Where:
        parts = cast(dict[str, Any], parse_url(url))
        return cls(
            host=parts.get("host"),
            port=int(parts.get("port") or 6379),
            path=parts.get("path"),
            username=parts.get("username"),
            password=parts.get("password"),
            db=int(parts.get("db") or 0),
        )


def command(*args: bytes) -> bytes:
    """A RESP array of bulk strings: how a client writes a command."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class _Reader(asyncio.BufferedProtocol):
    """Replies parsed in order into the futures of the commands that asked them."""

    def __init__(self) -> None:
        self.buffer = bytearray(_INITIAL_BUFFER)
        self.start = 0  # the first byte not yet parsed
        self.end = 0  # one past the last byte received
        self.waiting: collections.deque[asyncio.Future[bytes | None]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self.buffer) - self.end < _MIN_FREE:
            pending = self.end - self.start
            if self.start:  # move the unparsed rest to the front
                self.buffer[:pending] = self.buffer[self.start : self.end]
                self.start, self.end = 0, pending
            if len(self.buffer) - self.end < _MIN_FREE:
                self.buffer.extend(bytes(max(len(self.buffer), _MIN_FREE)))
        return memoryview(self.buffer)[self.end :]

    def buffer_updated(self, nbytes: int) -> None:
        self.end += nbytes
        try:
            while self.waiting and self._reply():
                pass
        except ConnectionError as exc:  # bytes that are not RESP: nothing after is trusted
            self._fail(exc)
            if self.transport is not None:
                self.transport.close()
            return
        if self.start == self.end:
            self.start = self.end = 0

    def _reply(self) -> bool:
        """Parse one reply at `start` into the oldest waiter; False if incomplete."""
        buffer, start = self.buffer, self.start
        line_end = buffer.find(b"\r\n", start, self.end)
        if line_end < 0:
            return False
        kind = buffer[start]
        if kind == 0x24:  # $: a bulk string, or $-1 for none
            try:
                size = int(buffer[start + 1 : line_end])
            except ValueError:
                raise ConnectionError("Redis answered a bulk string without a length") from None
            if size < 0:
                value: bytes | Exception | None = None
                self.start = line_end + 2
            else:
                data_end = line_end + 2 + size
                if self.end < data_end + 2:
                    return False
                value = bytes(memoryview(buffer)[line_end + 2 : data_end])  # one copy
                self.start = data_end + 2
        elif kind in (0x2B, 0x3A):  # + or :, a status or an integer (AUTH, SELECT)
            value = bytes(buffer[start + 1 : line_end])
            self.start = line_end + 2
        elif kind == 0x2D:  # -: an error reply
            value = ResponseError(buffer[start + 1 : line_end].decode(errors="replace"))
            self.start = line_end + 2
        else:
            raise ConnectionError(f"Redis answered something that is not RESP2 ({kind:#x})")
        future = self.waiting.popleft()
        if not future.done():
            if isinstance(value, Exception):
                future.set_exception(value)
            else:
                future.set_result(value)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def _fail(self, exc: Exception) -> None:
        self.lost = exc
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)


def _closing(reader: _Reader) -> bool:
    return reader.transport is None or reader.transport.is_closing()


class PipelinedGet:
    """GET over one pipelined connection, made at the first call and again after one
    is lost. Not thread-safe: one per event loop (the cache is made in the lifespan)."""

    def __init__(self, where: Where) -> None:
        self.where = where
        self._reader: _Reader | None = None
        self._connecting: asyncio.Task[_Reader] | None = None

    @classmethod
    def from_url(cls, url: str) -> PipelinedGet:
        return cls(Where.of(url))

    async def get(self, key: str) -> bytes | None:
        reader = self._reader
        if reader is None or reader.lost is not None or _closing(reader):
            reader = await self._connect()
        return await self._ask(reader, command(b"GET", key.encode()))

    async def _ask(self, reader: _Reader, request: bytes) -> bytes | None:
        assert reader.transport is not None
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        reader.waiting.append(future)
        reader.transport.write(request)
        try:
            return await future
        except asyncio.CancelledError:
            # Given up (a deadline): drop this connection rather than keep reading
            # replies nobody waits for from a Redis that may be stalled.
            reader.transport.close()
            raise

    async def _connect(self) -> _Reader:
        # Concurrent first calls share one connection attempt.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            reader = await asyncio.shield(connecting)
        finally:
            if connecting.done():
                self._connecting = None
        self._reader = reader
        return reader

    async def _open(self) -> _Reader:
        loop, where = asyncio.get_running_loop(), self.where
        if where.path is not None:
            _, reader = await loop.create_unix_connection(_Reader, where.path)
        else:
            assert where.host is not None  # the registry refuses a redis:// URL without one
            _, reader = await loop.create_connection(_Reader, where.host, where.port)
        try:
            if where.password is not None:
                credentials = [where.username.encode()] if where.username else []
                await self._ask(reader, command(b"AUTH", *credentials, where.password.encode()))
            if where.db:
                await self._ask(reader, command(b"SELECT", str(where.db).encode()))
        except BaseException:
            assert reader.transport is not None
            reader.transport.close()
            raise
        return reader

    async def aclose(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None and reader.transport is not None:
            reader.transport.close()
