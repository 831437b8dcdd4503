"""The HTTP server settings of `gateway serve`, against the real gateway on loopback:
heads too large are refused (431), unparsable requests get JSON, no `Server` header."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json

import httpx
import uvicorn
from packaging.requirements import Requirement
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.registry import Registry
from gateway.testing import served_gateway
from tests.support import body, dead_url, make_registry, parse_raw, raw_exchange


def registry(max_header_bytes: int = 2048) -> Registry:
    limits = {"max_header_bytes": max_header_bytes}
    return make_registry({"p": [dead_url()]}, sections={"limits": limits})


def get(*headers: bytes) -> bytes:
    return b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n" + b"".join(headers) + b"\r\n"


async def test_a_head_over_the_limit_is_431_and_the_connection_closed() -> None:
    async with served_gateway(registry()) as url:
        one_big = await raw_exchange(url, get(b"X-Big: " + b"a" * 3000 + b"\r\n"))
        many_small = await raw_exchange(
            url, get(*[b"X-H%d: %s\r\n" % (i, b"v" * 20) for i in range(200)])
        )
        long_url = await raw_exchange(
            url, b"GET /healthz?" + b"q" * 3000 + b" HTTP/1.1\r\nHost: g\r\n\r\n"
        )
    for answer in (one_big, many_small, long_url):
        status, headers, payload = parse_raw(answer)
        assert status == 431
        assert headers["connection"] == "close"
        assert json.loads(payload) == {
            "detail": "request line and headers are larger than 2048 bytes"
        }


async def test_an_endless_header_is_refused_without_waiting_for_its_end() -> None:
    async with served_gateway(registry()) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        answer = asyncio.create_task(reader.read())  # everything, until the server closes
        writer.write(get()[:-2] + b"X-Endless: ")
        sent = 0
        while not answer.done() and sent < 100_000:  # one header value, never finished
            writer.write(b"a" * 1000)
            sent += 1000
            await writer.drain()
            await asyncio.sleep(0.002)
        status = parse_raw(await asyncio.wait_for(answer, 5))[0]
        writer.close()
    assert status == 431
    assert sent < 100_000  # refused while the header was still arriving


async def test_heads_within_the_limit_pass_also_pipelined_after_a_body() -> None:
    post = json.dumps(body(prompt="p" * 3000)).encode()
    first = (
        b"POST /v1/images/generations HTTP/1.1\r\nHost: g\r\nContent-Type: text/plain\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(post), post)
    )
    second = get(b"X-Fine: " + b"b" * 1500 + b"\r\n", b"Connection: close\r\n")
    async with served_gateway(registry()) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        # A read that ends a body and starts the next head: only head bytes count.
        writer.write(first + second[:40])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(second[40:])
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert answer.count(b"HTTP/1.1 415 ") == 1  # the POST, answered on its merits
    assert answer.count(b"HTTP/1.1 200 OK") == 1  # then the GET with its 1.5 KB header


async def test_unparsable_requests_get_a_json_400() -> None:
    async with served_gateway(registry()) as url:
        answer = await raw_exchange(url, b"NOT HTTP AT ALL\r\n\r\n")
    status, headers, payload = parse_raw(answer)
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert "detail" in json.loads(payload)


async def test_no_server_header_on_any_answer() -> None:
    async with served_gateway(registry()) as url, httpx.AsyncClient(base_url=url) as client:
        answers = [
            await client.get("/healthz"),
            await client.get("/nowhere"),
            await client.post("/v1/images/generations", json=body()),  # 502: dead worker
        ]
        raw = await raw_exchange(url, get(b"X-Big: " + b"a" * 3000 + b"\r\n"))
    assert [a.status_code for a in answers] == [200, 404, 502]
    assert all("server" not in a.headers for a in answers)
    assert "server" not in parse_raw(raw)[1]


# What gateway/server.py takes from uvicorn's private HttpToolsProtocol: the hooks it
# overrides and the attributes it reads. A uvicorn that renames one breaks the bounds
# silently (a hook never called), so the pin in pyproject.toml stays narrow and this
# test names what moved.
UVICORN_HOOKS = (
    "connection_made",
    "connection_lost",
    "data_received",
    "on_message_begin",
    "on_headers_complete",
    "on_message_complete",
    "send_400_response",
)
UVICORN_ATTRIBUTES = ("connections", "timeout_keep_alive", "flow", "pipeline", "cycle", "loop")


def test_uvicorn_is_a_version_the_server_layer_was_tested_against() -> None:
    pins = [
        Requirement(text)
        for text in importlib.metadata.requires("image-gateway") or []
        if Requirement(text).name == "uvicorn"
    ]
    assert pins, "pyproject.toml names no uvicorn"
    assert pins[0].specifier.contains(uvicorn.__version__), (
        f"uvicorn {uvicorn.__version__} is outside {pins[0].specifier}: gateway/server.py "
        "subclasses its private HttpToolsProtocol; check it against this version, then pin"
    )


async def test_uvicorn_still_has_what_the_server_layer_overrides_and_reads() -> None:
    hooks = [name for name in UVICORN_HOOKS if callable(getattr(HttpToolsProtocol, name, None))]
    lost = sorted(set(UVICORN_HOOKS) - set(hooks))
    assert not lost, f"HttpToolsProtocol lost hooks that gateway/server.py overrides: {lost}"
    config = uvicorn.Config(app=_asgi_app, log_config=None)
    config.load()
    protocol = HttpToolsProtocol(config, ServerState(), app_state={})
    absent = [name for name in UVICORN_ATTRIBUTES if not hasattr(protocol, name)]
    assert not absent, f"HttpToolsProtocol no longer sets what gateway/server.py reads: {absent}"


async def _asgi_app(scope: Scope, receive: Receive, send: Send) -> None:
    pass
