"""Real servers on loopback for tests: sim workers, a scripted worker, the gateway.

Every server here listens on 127.0.0.1 on a free port and is stopped by its owner.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import yaml
from aiohttp import web

from gateway.app import create_app
from gateway.cli import free_port
from gateway.registry import Registry, parse_registry
from gateway.simworker import spawn, stop, wait_healthy


@dataclass
class SimWorker:
    url: str
    proc: subprocess.Popen[bytes]

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.url + "/stats", timeout=5).json()
        return data


@contextmanager
def sim_workers(*option_lists: Sequence[str]) -> Iterator[list[SimWorker]]:
    """One real `gateway sim-worker` process per option list, all stopped at exit."""
    workers: list[SimWorker] = []
    try:
        for options in option_lists:
            port = free_port()
            worker = SimWorker(f"http://127.0.0.1:{port}", spawn(port, *options))
            workers.append(worker)
        for worker in workers:
            wait_healthy(worker.url, proc=worker.proc)
        yield workers
    finally:
        for worker in workers:
            stop(worker.proc)


def registry_yaml(
    pools: dict[str, Sequence[str | dict[str, Any]]],
    adapters: Sequence[dict[str, Any]] | None = None,
    **pool_options: Any,
) -> str:
    """adapters.yaml text: each pool's workers by URL (or full dict), same options each."""
    data: dict[str, Any] = {
        "pools": {
            name: {
                "workers": [w if isinstance(w, dict) else {"url": w} for w in workers],
                **pool_options,
            }
            for name, workers in pools.items()
        },
        "adapters": list(adapters)
        if adapters is not None
        else [{"name": name, "pool": name, "default": i == 0} for i, name in enumerate(pools)],
    }
    return yaml.safe_dump(data, sort_keys=False)


def make_registry(
    pools: dict[str, Sequence[str | dict[str, Any]]],
    adapters: Sequence[dict[str, Any]] | None = None,
    **pool_options: Any,
) -> Registry:
    return parse_registry(registry_yaml(pools, adapters, **pool_options))


@asynccontextmanager
async def gateway_client(registry: Registry) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway app in memory (lifespan run), driven through httpx.ASGITransport."""
    app = create_app(registry)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client


def body(**overrides: Any) -> dict[str, Any]:
    """A valid request body, with overrides."""
    return {"prompt": "a red fox", "num_inference_steps": 4, "guidance_scale": 7.5, **overrides}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ScriptedWorker:
    """A worker whose every answer the test writes; it records what it was sent."""

    handler: Handler
    url: str = ""
    received: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append(json.loads(await request.read()))
        self.headers.append(dict(request.headers))
        return await self.handler(request)


@asynccontextmanager
async def scripted_worker(handler: Handler) -> AsyncIterator[ScriptedWorker]:
    worker = ScriptedWorker(handler)
    app = web.Application()
    app.router.add_post("/v1/images/generations", worker._handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    worker.url = f"http://127.0.0.1:{port}"
    try:
        yield worker
    finally:
        await runner.cleanup()


def image_ok(payload: bytes = b'{"image":"aGVsbG8="}') -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=payload, content_type="application/json")

    return handler


def sleeps(seconds: float) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(body=b'{"image":""}', content_type="application/json")

    return handler


def answers(status: int, text: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=text, content_type="application/json")

    return handler


def dead_url() -> str:
    """A loopback URL nothing listens on: connecting to it is refused."""
    return f"http://127.0.0.1:{free_port()}"


@contextmanager
def gateway_process(config_path: str, *extra: str) -> Iterator[str]:
    """The real gateway under uvicorn in a child process; yields its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", config_path]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--log-level", "warning", *extra], stdin=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc=proc, path="/healthz")
        yield url
    finally:
        stop(proc)


class FakeClock:
    """Time that moves only when the test says: `clock()` reads it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
