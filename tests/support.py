"""Real servers on loopback for tests: sim workers, a scripted worker, the gateway.

Every server here listens on 127.0.0.1 on a free port and is stopped by its owner.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis
import uvicorn
import yaml
from aiohttp import web
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.auth import hash_key
from gateway.cli import _fast, free_port
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
    pools: Mapping[str, Sequence[str | dict[str, Any]]],
    adapters: Sequence[dict[str, Any]] | None = None,
    *,
    sections: Mapping[str, Any] | None = None,
    **pool_options: Any,
) -> str:
    """adapters.yaml text: each pool's workers by URL (or full dict), same options each;
    `sections` adds top-level sections (`auth`, `limits`)."""
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
        **(sections or {}),
    }
    return yaml.safe_dump(data, sort_keys=False)


def make_registry(
    pools: Mapping[str, Sequence[str | dict[str, Any]]],
    adapters: Sequence[dict[str, Any]] | None = None,
    *,
    sections: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    **pool_options: Any,
) -> Registry:
    text = registry_yaml(pools, adapters, sections=sections, **pool_options)
    return parse_registry(text, env=env)


def api_key(name: str, key: str, **options: Any) -> dict[str, Any]:
    """One entry of `auth.keys`: the key's name and the sha256 of `key`."""
    return {"name": name, "sha256": hash_key(key), **options}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@asynccontextmanager
async def gateway_app(registry: Registry) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    """The gateway app in memory (lifespan run) and a client driving it through
    httpx.ASGITransport; the app, to look at its state."""
    app = create_app(registry)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield app, client


@asynccontextmanager
async def gateway_client(registry: Registry) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_app(registry) as (_, client):
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
def gateway_process(
    config_path: str, *extra: str, log_level: str = "warning", **popen: Any
) -> Iterator[str]:
    """The real gateway under uvicorn in a child process; yields its base URL.
    `popen` goes to subprocess.Popen (`env`, `stderr` to capture its log)."""
    port = free_port()
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", config_path]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--log-level", log_level, *extra],
        stdin=subprocess.DEVNULL,
        **popen,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc=proc, path="/healthz")
        yield url
    finally:
        stop(proc)


@asynccontextmanager
async def served_gateway(registry: Registry) -> AsyncIterator[str]:
    """The gateway served in this process's loop by uvicorn on a loopback port, with the
    same server settings as `gateway serve` (bounded httptools, no Server header);
    quicker to start than `gateway_process`. Yields its base URL."""
    config = _fast(
        create_app(registry),
        log_level="warning",
        port=free_port(),
        max_header_bytes=registry.limits.max_header_bytes,
        configure_logging=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
                raise RuntimeError("gateway server exited during start-up")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        await task


@contextmanager
def redis_server(port: int | None = None) -> Iterator[str]:
    """A real redis-server on a loopback port (a free one unless given), no persistence;
    yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("install redis-server (apt-get install -y redis-server)")
    port = port or free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_redis(url, proc)
        yield url
    finally:
        stop(proc)


def _wait_redis(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {proc.returncode}")
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise TimeoutError(f"{url}: redis-server not answering after {timeout_s}s")
    finally:
        client.close()


async def raw_exchange(url: str, request: bytes, *, timeout_s: float = 5.0) -> bytes:
    """Send raw bytes to a served gateway; everything it answers until it closes (or
    until `timeout_s` passes, which fails the test: a hang)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()


def parse_raw(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-cased names) and body of a raw HTTP/1.1 answer."""
    head, _, payload = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, payload
