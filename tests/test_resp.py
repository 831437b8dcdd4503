"""gateway.resp: the cache's pipelined GET, against a real redis-server."""

from __future__ import annotations

import asyncio
import os

import pytest
import redis
from redis.exceptions import ConnectionError, ResponseError

from gateway.cache import RedisCache
from gateway.errors import CacheUnavailable
from gateway.registry import CacheSpec
from gateway.resp import PipelinedGet, command
from tests.support import blackhole, redis_cache


def test_command_is_a_resp_array_of_bulk_strings() -> None:
    assert command(b"GET", b"k\r\n") == b"*2\r\n$3\r\nGET\r\n$3\r\nk\r\n\r\n"


async def test_values_come_back_exactly_and_in_order_when_pipelined(redis_url: str) -> None:
    # Values that hold CRLF and RESP markers, of sizes around the buffer's (256 KB),
    # asked all at once on the one connection: each GET gets its own value.
    values = {
        f"k{i}": os.urandom(size) + b"\r\n$-1\r\n"
        for i, size in enumerate(range(1, 600_000, 37_501))
    }
    with redis.Redis.from_url(redis_url) as client:
        for key, value in values.items():
            client.set(key, value)
    fast = PipelinedGet.from_url(redis_url)
    try:
        keys = [*values, "absent", *values]  # no palindrome: LIFO must fail it
        got = await asyncio.gather(*(fast.get(key) for key in keys))
        assert got == [values.get(key) for key in keys]
        assert await fast.get("absent") is None
    finally:
        await fast.aclose()


async def test_an_error_reply_is_a_response_error_and_the_connection_goes_on(
    redis_url: str,
) -> None:
    with redis.Redis.from_url(redis_url) as client:
        client.rpush("a-list", b"x")
        client.set("k", b"v")
    fast = PipelinedGet.from_url(redis_url)
    try:
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await fast.get("a-list")
        assert await fast.get("k") == b"v"
    finally:
        await fast.aclose()


async def test_user_password_and_database_from_the_url(redis_url: str) -> None:
    base = redis_url.removeprefix("redis://")
    with redis.Redis.from_url(redis_url) as client:
        client.acl_setuser(
            "bench", enabled=True, passwords=["+s3cret"], keys="*", commands=["+@all"]
        )
        client.execute_command("SELECT", 3)  # a connection of its own: db 3 from here
        client.set("k", b"in db 3")
        fast = PipelinedGet.from_url(f"redis://bench:s3cret@{base}/3")
        wrong = PipelinedGet.from_url(f"redis://bench:wrong@{base}/3")
        db0 = PipelinedGet.from_url(f"redis://bench:s3cret@{base}/0")
        try:
            assert await fast.get("k") == b"in db 3"
            assert await db0.get("k") is None
            with pytest.raises(ResponseError):
                await wrong.get("k")
        finally:
            client.acl_deluser("bench")
            for each in (fast, wrong, db0):
                await each.aclose()


async def test_a_lost_connection_fails_and_the_next_get_connects_again(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        client.set("k", b"v")
        fast = PipelinedGet.from_url(redis_url)
        try:
            assert await fast.get("k") == b"v"
            client.client_kill_filter(skipme=True)  # every connection but this one
            with pytest.raises(ConnectionError):
                await fast.get("k")
            assert await fast.get("k") == b"v"
        finally:
            await fast.aclose()


async def test_the_cache_uses_it_for_plain_redis_and_fails_open_on_a_stalled_one(
    redis_url: str,
) -> None:
    backend = RedisCache.from_spec(CacheSpec(**redis_cache(redis_url)))
    try:
        assert backend.fast_get is not None
        await backend.set("k", b"v", ttl_ms=60_000)
        assert await backend.get("k") == b"v"
    finally:
        await backend.aclose()
    with blackhole() as url:
        stalled = RedisCache.from_spec(
            CacheSpec(**redis_cache(url, timeout_ms=50, connect_timeout_ms=50))
        )
        try:
            with pytest.raises(CacheUnavailable):
                await stalled.get("k")
            assert stalled.fast_get is not None
            reader = stalled.fast_get._reader
            assert reader is not None
            assert reader.transport is not None
            assert reader.transport.is_closing()  # given up: dropped, not waited on
        finally:
            await stalled.aclose()


@pytest.mark.parametrize("answer", [b"HTTP/1.1 400 Bad Request\r\n\r\n", b"$x\r\n"])
async def test_an_answer_that_is_not_resp_fails_the_get_and_drops_the_connection(
    answer: bytes,
) -> None:
    hung_up = asyncio.Event()

    async def not_redis(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readline()
            writer.write(answer)
            await writer.drain()
            await reader.read()  # until the client hangs up
        finally:
            writer.close()
            await writer.wait_closed()
            hung_up.set()

    server = await asyncio.start_server(not_redis, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    fast = PipelinedGet.from_url(f"redis://127.0.0.1:{port}")
    try:
        with pytest.raises(ConnectionError, match=r"RESP2|length"):
            await fast.get("k")
        reader = fast._reader
        assert reader is not None
        assert reader.transport is not None
        assert reader.transport.is_closing()
        await asyncio.wait_for(hung_up.wait(), 10)  # the server saw the connection go
    finally:
        await fast.aclose()
        server.close()
        await server.wait_closed()
