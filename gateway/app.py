"""Assembles the Starlette app from its parts; no logic of its own."""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware

from gateway.auth import log_auth_mode
from gateway.balancer import Balancer
from gateway.errors import EXCEPTION_HANDLERS
from gateway.middleware import BodyLimitMiddleware, RequestIdMiddleware
from gateway.openapi import openapi_json
from gateway.pipeline import Pipeline
from gateway.protocols import open_worker_session
from gateway.ratelimit import KeyLimits, open_rate_limiter, redis_url_for
from gateway.registry import Registry, load_registry
from gateway.routes import ROUTES


def create_app(registry: Registry) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with (
            open_worker_session(registry) as session,
            open_rate_limiter(redis_url_for(registry)) as rate_limiter,
        ):
            app.state.pipeline = Pipeline(
                registry=registry, balancer=Balancer(registry), session=session
            )
            app.state.key_limits = KeyLimits(rate=rate_limiter)
            app.state.openapi = openapi_json(registry)
            log_auth_mode(registry)
            # Start-up objects live for the process: keep them out of every GC pass.
            gc.freeze()
            yield

    # The body limit is read once here: a reload that changes it needs a restart.
    body_limit = Middleware(BodyLimitMiddleware, max_bytes=registry.limits.max_body_bytes)
    return Starlette(
        routes=ROUTES,
        middleware=[Middleware(RequestIdMiddleware), body_limit],
        exception_handlers=dict(EXCEPTION_HANDLERS),
        lifespan=lifespan,
    )


def app_from_env() -> Starlette:
    """Factory for `uvicorn --factory gateway.app:app_from_env` (GATEWAY_CONFIG)."""
    return create_app(load_registry(os.environ.get("GATEWAY_CONFIG", "adapters.yaml")))
