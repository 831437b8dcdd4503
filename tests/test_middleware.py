"""The body limit, against the real gateway served on loopback: 413 before the body
is read, with a Content-Length and without one (chunked)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx

from gateway.registry import Registry
from tests.support import (
    SimWorker,
    body,
    make_registry,
    parse_raw,
    raw_exchange,
    served_gateway,
)

GEN = "/v1/images/generations"


def limited(sims: list[SimWorker], max_body_bytes: int = 1024) -> Registry:
    limits = {"max_body_bytes": max_body_bytes}
    return make_registry({"p": [sims[0].url]}, sections={"limits": limits})


def post_head(length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST {GEN} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        f"X-Request-ID: big-1\r\n{framing}\r\n\r\n"
    ).encode()


async def test_content_length_over_the_limit_is_413_before_any_body_is_sent(
    fast_sims: list[SimWorker],
) -> None:
    async with served_gateway(limited(fast_sims)) as url:
        # Only the head: the gateway must answer without waiting for the body.
        answer = await raw_exchange(url, post_head(10**9))
    status, headers, payload = parse_raw(answer)
    assert status == 413
    assert json.loads(payload) == {"detail": "request body is larger than 1024 bytes"}
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert headers["x-request-id"] == "big-1"


async def test_chunked_body_over_the_limit_is_413_before_it_ends(
    fast_sims: list[SimWorker],
) -> None:
    async with served_gateway(limited(fast_sims)) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(post_head(None))
        chunk = b"x" * 512
        for _ in range(4):  # 2 KiB of a body that never ends
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    status, headers, payload = parse_raw(answer)
    assert status == 413
    assert json.loads(payload)["detail"] == "request body is larger than 1024 bytes"
    assert headers["x-request-id"] == "big-1"


async def test_bodies_within_the_limit_pass_whatever_their_framing(
    fast_sims: list[SimWorker],
) -> None:
    payload = json.dumps(body(prompt="fox " * 200)).encode()
    assert 800 < len(payload) <= 1024

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 100):
            yield payload[i : i + 100]

    async with served_gateway(limited(fast_sims)) as url, httpx.AsyncClient(base_url=url) as c:
        sized = await c.post(GEN, content=payload, headers={"content-type": "application/json"})
        chunked = await c.post(GEN, content=chunks(), headers={"content-type": "application/json"})
    assert sized.status_code == 200, sized.text
    assert chunked.status_code == 200, chunked.text
    assert "content-length" not in chunked.request.headers


async def test_the_default_limit_is_64_kib(fast_sims: list[SimWorker]) -> None:
    registry = make_registry({"p": [fast_sims[0].url]})
    assert registry.limits.max_body_bytes == 65536
    async with served_gateway(registry) as url, httpx.AsyncClient(base_url=url) as client:
        big = await client.post(GEN, json=body(prompt="x" * 70_000))
        fine = await client.post(GEN, json=body(prompt="x" * 3_000))
    assert big.status_code == 413
    assert fine.status_code == 200
