"""bench/overhead.py --protocols: every row's static upstream answers what the gateway
accepts, so each row measures a success, and the static upstream answers per route."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from bench.overhead import BODY, ProtocolRow, protocol_rows, protocols_registry
from bench.static_upstream import NOT_FOUND, Routes, StaticHTTP, http_response
from gateway.protocols.imaging import sniff
from gateway.registry import parse_registry
from gateway.testing import served_gateway

ROWS = protocol_rows(64)


def test_a_route_answers_its_own_requests() -> None:
    routes = Routes(
        {"POST /prompt": b"prompt", "GET /history/*": b"history", "GET /view": b"view"},
        default=None,
    )
    assert routes.response(b"POST /prompt HTTP/1.1") == b"prompt"
    assert routes.response(b"GET /history/abc-1 HTTP/1.1") == b"history"
    assert routes.response(b"GET /view?filename=a.png&type=output HTTP/1.1") == b"view"
    assert routes.response(b"GET /prompt HTTP/1.1") == NOT_FOUND  # another method
    assert routes.response(b"GET /viewer HTTP/1.1") == NOT_FOUND
    assert Routes({}, b"any").response(b"POST /v1/images/generations HTTP/1.1") == b"any"


def test_every_protocol_has_a_row() -> None:
    from gateway.protocols import PROTOCOLS

    assert {row.protocol for row in ROWS} == set(PROTOCOLS)


@asynccontextmanager
async def static_upstream(row: ProtocolRow) -> AsyncIterator[str]:
    answers = {route: http_response(body, kind) for route, (body, kind) in row.routes.items()}
    default = None if row.answer is None else http_response(row.answer)
    routes = Routes(answers, default)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StaticHTTP(routes), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
async def test_each_row_is_an_image_through_the_gateway(row: ProtocolRow) -> None:
    async with static_upstream(row) as upstream:
        registry = parse_registry(protocols_registry([row], [upstream]))
        async with served_gateway(registry) as url, httpx.AsyncClient(timeout=30) as client:
            request = {**BODY, "model": row.name, "response_format": row.response_format}
            resp = await client.post(url + "/v1/images/generations", json=request)
    assert resp.status_code == 200, resp.text
    wanted = "JPEG" if row.response_format == "jpeg" else "PNG"
    assert sniff(base64.b64decode(resp.json()["image"])) == wanted
