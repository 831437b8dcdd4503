"""Servers for the protocol tests, on 127.0.0.1 and stopped at exit: a sim worker of
one protocol under uvicorn, and scripted aiohttp apps whose every answer a test writes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from gateway.simservers import create_app
from gateway.simworker import SimConfig, SimWorker
from gateway.testing import serve

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def sim_server(protocol: str, **options: Any) -> AsyncIterator[tuple[str, SimWorker]]:
    """A sim worker of `protocol`, served in this process on a port the kernel picked."""
    config = SimConfig(**{"step_ms": 1.0, "adapter_load_ms": 1.0, **options}, protocol=protocol)
    app = create_app(config)
    async with serve(app) as url:
        yield url, app.state.worker


@asynccontextmanager
async def scripted(routes: Mapping[tuple[str, str], Handler]) -> AsyncIterator[str]:
    """An aiohttp app answering (method, path) with its handler; yields its URL."""
    app = web.Application()
    for (method, path), handler in routes.items():
        app.router.add_route(method, path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def json_answer(data: Any, status: int = 200) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(data, status=status)

    return handler
