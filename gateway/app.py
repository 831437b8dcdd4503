"""Assembles the Starlette app from its parts; no logic of its own."""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware

from gateway.balancer import Balancer, Clock
from gateway.discovery import Discovery, Resolver, resolve_dns
from gateway.errors import EXCEPTION_HANDLERS
from gateway.health import Prober
from gateway.middleware import RequestIdMiddleware
from gateway.pipeline import Pipeline
from gateway.protocols import open_worker_session
from gateway.registry import Registry, load_registry
from gateway.routes import ROUTES


def create_app(
    registry: Registry, *, resolver: Resolver = resolve_dns, clock: Clock = time.monotonic
) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with open_worker_session(registry) as session:
            balancer = Balancer(registry, clock=clock)
            discovery = Discovery(balancer=balancer, resolver=resolver, clock=clock)
            await discovery.refresh_due()  # DNS pools start with their workers, if any
            prober = Prober(balancer=balancer, session=session, clock=clock)
            app.state.pipeline = Pipeline(registry=registry, balancer=balancer, session=session)
            async with _background(prober.run(), discovery.run()):
                # Start-up objects live for the process: keep them out of every GC pass.
                gc.freeze()
                yield

    return Starlette(
        routes=ROUTES,
        middleware=[Middleware(RequestIdMiddleware)],
        exception_handlers=dict(EXCEPTION_HANDLERS),
        lifespan=lifespan,
    )


@asynccontextmanager
async def _background(*jobs: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run `jobs` as tasks for the life of the block; cancel and await them after."""
    tasks = [asyncio.create_task(job) for job in jobs]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def app_from_env() -> Starlette:
    """Factory for `uvicorn --factory gateway.app:app_from_env` (GATEWAY_CONFIG)."""
    return create_app(load_registry(os.environ.get("GATEWAY_CONFIG", "adapters.yaml")))
