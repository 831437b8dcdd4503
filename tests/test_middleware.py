"""Pure ASGI middleware: request ids and the JSON access log; the body limit against
the real gateway served on loopback (413 before the body is read, with a
Content-Length and without one)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.logs import ACCESS_LOGGER, JsonFormatter
from gateway.registry import Registry, parse_registry
from gateway.testing import ServedSim, gateway_client, registry_yaml, served_gateway
from tests.support import body, make_registry, parse_raw, raw_exchange


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    formatter = JsonFormatter()
    return [json.loads(formatter.format(r)) for r in caplog.records if r.name == ACCESS_LOGGER]


async def test_one_json_line_per_request_without_the_prompt(
    fast_sims: list[ServedSim], caplog: pytest.LogCaptureFixture
) -> None:
    registry = parse_registry(registry_yaml({"p": [s.url for s in fast_sims]}))
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    async with gateway_client(registry) as client:
        await client.post(
            "/v1/images/generations",
            json=body(prompt="a secret family photo", seed=11),
            headers={"x-request-id": "req-42"},
        )
        await client.get("/healthz")  # probes are not logged
    (line,) = access_lines(caplog)
    assert line["request_id"] == "req-42"
    assert line["status"] == 200
    assert (line["adapter"], line["pool"], line["seed"], line["cache"]) == ("p", "p", 11, "miss")
    assert str(line["worker"]).startswith("p-")
    assert float(str(line["duration_ms"])) >= float(str(line["upstream_ms"])) > 0
    assert "secret" not in json.dumps(line)


async def test_prompts_are_logged_only_when_the_registry_says_so(
    fast_sims: list[ServedSim], caplog: pytest.LogCaptureFixture
) -> None:
    text = registry_yaml({"p": [s.url for s in fast_sims]}) + "log_prompts: true\n"
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    async with gateway_client(parse_registry(text)) as client:
        await client.post("/v1/images/generations", json=body(prompt="a red fox"))
    (line,) = access_lines(caplog)
    assert line["prompt"] == "a red fox"


async def test_errors_are_logged_with_their_status(
    fast_sims: list[ServedSim], caplog: pytest.LogCaptureFixture
) -> None:
    registry = parse_registry(registry_yaml({"p": [s.url for s in fast_sims]}))
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    async with gateway_client(registry) as client:
        await client.post("/v1/images/generations", json=body(model="nope"))
    (line,) = access_lines(caplog)
    assert (line["status"], line["adapter"]) == (404, "unknown")


GEN = "/v1/images/generations"


def limited(sims: list[ServedSim], max_body_bytes: int = 1024) -> Registry:
    limits = {"max_body_bytes": max_body_bytes}
    return make_registry({"p": [sims[0].url]}, sections={"limits": limits})


def post_head(length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST {GEN} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        f"X-Request-ID: big-1\r\n{framing}\r\n\r\n"
    ).encode()


async def test_content_length_over_the_limit_is_413_before_any_body_is_sent(
    fast_sims: list[ServedSim],
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
    fast_sims: list[ServedSim],
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
    fast_sims: list[ServedSim],
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


async def test_the_default_limit_is_64_kib(fast_sims: list[ServedSim]) -> None:
    registry = make_registry({"p": [fast_sims[0].url]})
    assert registry.limits.max_body_bytes == 65536
    async with served_gateway(registry) as url, httpx.AsyncClient(base_url=url) as client:
        big = await client.post(GEN, json=body(prompt="x" * 70_000))
        fine = await client.post(GEN, json=body(prompt="x" * 3_000))
    assert big.status_code == 413
    assert fine.status_code == 200
