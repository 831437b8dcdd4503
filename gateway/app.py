"""Assembles the Starlette app from its parts; no logic of its own."""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware

from gateway.balancer import Balancer
from gateway.cache import open_cache
from gateway.coalesce import Coalescer
from gateway.errors import EXCEPTION_HANDLERS
from gateway.middleware import RequestIdMiddleware
from gateway.pipeline import Pipeline
from gateway.protocols import open_worker_session
from gateway.registry import Registry, load_registry, with_redis_url
from gateway.routes import ROUTES


def create_app(registry: Registry) -> Starlette:
    # An env URL wins over the file's, as deployments set secrets (and a password is one).
    spec = with_redis_url(
        registry.cache, os.environ.get("GATEWAY_REDIS_URL"), source="GATEWAY_REDIS_URL"
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The cache's store is chosen once per process: a reload that changes the cache
        # section takes effect at the next restart.
        async with open_worker_session(registry) as session, open_cache(spec) as cache:
            app.state.pipeline = Pipeline(
                registry=registry,
                balancer=Balancer(registry),
                session=session,
                cache=cache,
                coalescer=Coalescer(cache=cache),
            )
            # Start-up objects live for the process: keep them out of every GC pass.
            gc.freeze()
            yield

    return Starlette(
        routes=ROUTES,
        middleware=[Middleware(RequestIdMiddleware)],
        exception_handlers=dict(EXCEPTION_HANDLERS),
        lifespan=lifespan,
    )


def app_from_env() -> Starlette:
    """Factory for `uvicorn --factory gateway.app:app_from_env` (GATEWAY_CONFIG)."""
    return create_app(load_registry(os.environ.get("GATEWAY_CONFIG", "adapters.yaml")))
