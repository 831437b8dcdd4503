"""bench/lean_client.py, the prototype priced by bench/worker_exchange.py --lean, does
what its figure assumes: the misbehaving-worker classes of tests/test_faults.py that
belong to the HTTP layer, against scripted servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from bench.lean_client import LeanPool, Lost, TooLarge

BODY = b'{"image":"' + b"A" * 5000 + b'"}'
Script = Callable[[asyncio.StreamWriter], Awaitable[None]]


def head(length: int | None, *extra: str) -> bytes:
    lines = ["HTTP/1.1 200 OK", "Content-Type: application/json", *extra]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Server:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                request = await reader.readuntil(b"\r\n\r\n")
                length = int(request.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                await self.script(writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serve(script: Script) -> AsyncIterator[tuple[LeanPool, Server]]:
    server = Server(script)
    listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    pool = LeanPool("127.0.0.1", port, limit=100_000)
    try:
        yield pool, server
    finally:
        pool.close()
        listening.close()
        await listening.wait_closed()


async def post(pool: LeanPool, timeout_s: float = 5.0) -> tuple[int, bytes]:
    status, _, body = await pool.post("/v1/images/generations", b"{}", b"", timeout_s=timeout_s)
    return status, body


async def answer(writer: asyncio.StreamWriter) -> None:
    writer.write(head(len(BODY)) + BODY)


async def chunked(writer: asyncio.StreamWriter) -> None:
    writer.write(head(None, "Transfer-Encoding: chunked"))
    for part in (BODY[:100], BODY[100:]):
        writer.write(b"%x\r\n%s\r\n" % (len(part), part))
    writer.write(b"0\r\n\r\n")


async def test_answers_by_length_and_chunked_read_whole_on_one_kept_connection() -> None:
    async with serve(answer) as (pool, server):
        assert await post(pool) == (200, BODY)
        assert await post(pool) == (200, BODY)
        assert server.connections == 1
    async with serve(chunked) as (pool, _):
        assert await post(pool) == (200, BODY)


async def test_too_large_by_length_and_as_chunks_arrive() -> None:
    async def by_length(writer: asyncio.StreamWriter) -> None:
        writer.write(head(200_000) + b"A" * 1000)

    async def by_chunks(writer: asyncio.StreamWriter) -> None:
        writer.write(head(None, "Transfer-Encoding: chunked"))
        for _ in range(30):
            writer.write(b"%x\r\n%s\r\n" % (10_000, b"A" * 10_000))

    for script in (by_length, by_chunks):
        async with serve(script) as (pool, _):
            with pytest.raises(TooLarge):
                await post(pool)


async def test_lost_before_the_answer_and_while_reading_it_are_told_apart() -> None:
    async def hang_up(writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def cut_short(writer: asyncio.StreamWriter) -> None:
        writer.write(head(len(BODY)) + BODY[:100])
        await writer.drain()
        writer.close()

    for script, answered in ((hang_up, False), (cut_short, True)):
        async with serve(script) as (pool, _):
            with pytest.raises(Lost) as lost:
                await post(pool)
            assert lost.value.answered is answered


async def test_bytes_past_the_answer_never_become_the_next_answer() -> None:
    async def twice(writer: asyncio.StreamWriter) -> None:
        writer.write(head(len(BODY)) + BODY)
        await writer.drain()
        await asyncio.sleep(0.05)  # a second answer nobody asked for, after the first
        writer.write(head(3) + b"old")

    async with serve(twice) as (pool, server):
        assert await post(pool) == (200, BODY)
        await asyncio.sleep(0.3)  # the second answer has arrived
        assert await post(pool) == (200, BODY)  # not b"old": a fresh connection
        assert server.connections == 2


async def test_a_worker_that_goes_silent_runs_into_the_deadline() -> None:
    async def silent(writer: asyncio.StreamWriter) -> None:
        writer.write(head(len(BODY)) + BODY[:10])
        await asyncio.sleep(30)

    async with serve(silent) as (pool, _):
        with pytest.raises(TimeoutError):
            await post(pool, timeout_s=0.3)
