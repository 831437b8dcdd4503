"""Forwarding: what reaches the worker, and how worker failures reach the client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from aiohttp import web

from gateway.state import served_of
from gateway.testing import (
    JPEG_ANSWER,
    FakeWorker,
    Handler,
    answers,
    fake_worker,
    gateway,
    gateway_client,
    image_ok,
    sleeps,
)
from tests.support import body, dead_url, make_registry

ADAPTERS: list[dict[str, Any]] = [
    {"name": "base", "pool": "p", "default": True},
    {"name": "pixel-art", "pool": "p", "upstream_model": "pixel-lora-v3", "aliases": ["px"]},
]


@asynccontextmanager
async def one_worker(handler: Handler) -> AsyncIterator[tuple[FakeWorker, httpx.AsyncClient]]:
    """One scripted worker behind the gateway, in memory."""
    async with (
        fake_worker(handler) as worker,
        gateway_client(make_registry({"p": [worker.url]}, ADAPTERS)) as client,
    ):
        yield worker, client


async def test_worker_gets_upstream_model_and_known_fields_only() -> None:
    async with fake_worker(image_ok()) as worker:
        registry = make_registry({"p": [worker.url]}, ADAPTERS)
        async with gateway_client(registry) as client:
            resp = await client.post(
                "/v1/images/generations",
                json=body(model="px", seed=3, lora_scale=0.8, api_key="secret"),
                headers={"authorization": "Bearer client-key", "x-request-id": "r-1"},
            )
    assert resp.status_code == 200
    assert resp.content == JPEG_ANSWER  # the worker's bytes, untouched
    assert worker.received == [
        {
            "prompt": "a red fox",
            "num_inference_steps": 4,
            "guidance_scale": 7.5,
            "model": "pixel-lora-v3",
            "response_format": "jpeg",
            "seed": 3,
        }
    ]
    sent = {k.lower(): v for k, v in worker.headers[0].items()}
    assert "authorization" not in sent
    assert sent["x-request-id"] == "r-1"
    # The worker's bytes are passed through undecoded, so it must not compress them.
    assert sent["accept-encoding"] == "identity"


async def test_base_model_sends_null_model() -> None:
    async with one_worker(image_ok()) as (worker, client):
        await client.post("/v1/images/generations", json=body())
    assert worker.received[0]["model"] is None


async def test_dead_worker_is_502_with_a_clear_message() -> None:
    async with gateway_client(make_registry({"p": [dead_url()]}, ADAPTERS)) as client:
        resp = await client.post("/v1/images/generations", json=body())
    assert resp.status_code == 502
    assert resp.json() == {
        "detail": "adapter 'base': worker p-0: cannot connect (connection refused)"
    }
    assert "127.0.0.1" not in resp.text


async def test_dead_worker_is_skipped_for_a_live_one() -> None:
    async with fake_worker(image_ok()) as worker:
        registry = make_registry({"p": [dead_url(), worker.url, dead_url()]}, ADAPTERS)
        async with gateway_client(registry) as client:
            statuses = [
                (await client.post("/v1/images/generations", json=body())).status_code
                for _ in range(10)
            ]
    assert statuses == [200] * 10
    assert len(worker.received) == 10


async def test_slow_worker_is_504() -> None:
    async with fake_worker(sleeps(5)) as worker:
        registry = make_registry({"p": [worker.url]}, ADAPTERS, timeout_s=0.3)
        async with gateway_client(registry) as client:
            resp = await client.post("/v1/images/generations", json=body())
    assert resp.status_code == 504
    assert resp.json()["detail"] == "adapter 'base': worker p-0: no answer within 0.3s"


async def test_worker_4xx_passes_through_with_its_message() -> None:
    handler = answers(400, '{"detail": "prompt is too long for this model"}')
    async with one_worker(handler) as (_, client):
        resp = await client.post("/v1/images/generations", json=body())
    assert resp.status_code == 400
    assert resp.json() == {
        "detail": "adapter 'base': worker rejected the request: prompt is too long for this model"
    }


async def test_worker_5xx_is_502_without_the_workers_body() -> None:
    handler = answers(500, '{"detail": "Traceback (most recent call last): File /srv/x.py"}')
    async with one_worker(handler) as (_, client):
        resp = await client.post("/v1/images/generations", json=body())
    assert resp.status_code == 502
    assert resp.json() == {"detail": "adapter 'base': worker p-0: HTTP 500"}
    assert resp.headers["x-cache"] == "miss"  # looked up, not found, then the worker failed


async def test_worker_dropping_the_connection_is_502() -> None:
    async def drop(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        await asyncio.sleep(0.1)
        return web.Response()

    async with one_worker(drop) as (_, client):
        resp = await client.post("/v1/images/generations", json=body())
    assert resp.status_code == 502
    assert resp.json()["detail"].startswith("adapter 'base': worker p-0:")


async def test_in_flight_returns_to_zero_after_failures() -> None:
    async with fake_worker(answers(500, "{}")) as worker:
        registry = make_registry({"p": [worker.url, dead_url()]}, ADAPTERS)
        async with gateway(registry) as gw:
            app, client = gw.app, gw.client
            replies = await asyncio.gather(
                *(client.post("/v1/images/generations", json=body()) for _ in range(20))
            )
            pool = served_of(app).pipeline.balancer.pool("p")
            assert [w.in_flight for w in pool.workers] == [0, 0]
    assert {r.status_code for r in replies} == {502}
