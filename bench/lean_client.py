"""A prototype: a lean HTTP/1.1 client for the worker exchange, on asyncio.Protocol
and httptools' C response parser (installed with uvicorn). Bench only: the gateway
does not use it (bench/README.md says what moving onto it would have to keep).

One `LeanPool` per worker keeps idle keep-alive connections; `post` writes one
request and returns (status, headers, body). Content-Length and chunked answers,
a size bound checked as the head and every chunk arrive, a deadline around the
whole exchange (`asyncio.timeout`), and the two ways a connection is lost told
apart (before the answer began: safe to retry; after: truncated).
"""

from __future__ import annotations

import asyncio

import httptools


class Lost(Exception):
    def __init__(self, answered: bool) -> None:
        super().__init__("connection lost " + ("after" if answered else "before") + " the answer")
        self.answered = answered


class TooLarge(Exception):
    pass


class _Conn(asyncio.Protocol):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.done = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.answered = False
        self.complete = False
        self.keep_alive = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.complete or self.done is None:
            # Bytes nobody asked for (more than the Content-Length said): they would be
            # read as the next request's answer. The connection is not reused.
            self._fail(httptools.HttpParserError("data after the answer"))
            return
        self.answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            # httptools wraps a callback's exception: the cause is what the callback raised.
            self._fail(exc.__context__ if isinstance(exc.__context__, TooLarge) else exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            self._fail(Lost(self.answered))

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.complete:  # a second answer in the same bytes: see data_received
            raise httptools.HttpParserError("data after the answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        if name.lower() == b"content-length" and int(value) > self.limit:
            raise TooLarge(f"{int(value)} bytes")

    def on_body(self, chunk: bytes) -> None:
        self.body += chunk
        if len(self.body) > self.limit:
            raise TooLarge(f"more than {self.limit} bytes")

    def on_message_complete(self) -> None:
        self.complete = True
        # Asked here: once the parser has moved past the answer it no longer knows.
        self.keep_alive = self.parser.should_keep_alive()
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    async def exchange(self, request: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        self._reset()
        self.done = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(request)
        await self.done
        return self.parser.get_status_code(), self.headers, bytes(self.body)


class LeanPool:
    """Keep-alive connections to one worker, `host:port`."""

    def __init__(self, host: str, port: int, *, limit: int) -> None:
        self.host, self.port, self.limit = host, port, limit
        self.idle: list[_Conn] = []
        self.host_header = f"Host: {host}:{port}\r\n".encode()

    async def post(
        self, path: str, body: bytes, headers: bytes, *, timeout_s: float
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        head = b"".join(
            (
                b"POST ",
                path.encode(),
                b" HTTP/1.1\r\n",
                self.host_header,
                headers,
                b"Content-Length: %d\r\n\r\n" % len(body),
            )
        )
        async with asyncio.timeout(timeout_s):
            conn = await self._connection()
            try:
                answer = await conn.exchange(head + body)
            except BaseException:
                conn._fail(Lost(conn.answered))  # a cancelled exchange leaves a half-read answer
                raise
        if not conn.closed and conn.keep_alive:
            self.idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()
        return answer

    async def _connection(self) -> _Conn:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Conn(self.limit), self.host, self.port)
        return conn

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()
