"""Assembles the Starlette app from its parts; no logic of its own."""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware

from gateway.auth import log_auth_mode
from gateway.balancer import Balancer, Clock
from gateway.cache import open_cache
from gateway.coalesce import Coalescer
from gateway.coordination import open_coordination
from gateway.discovery import Discovery, Resolver, resolve_dns
from gateway.drain import Drain
from gateway.errors import EXCEPTION_HANDLERS
from gateway.metrics import CacheMetrics, CoordinationMetrics, Metrics
from gateway.middleware import GatewayMiddleware
from gateway.openapi import openapi_json
from gateway.pipeline import Pipeline
from gateway.prober import Prober
from gateway.protocols import open_worker_session
from gateway.ratelimit import open_key_limits, redis_for
from gateway.registry import Registry, load_registry
from gateway.reload import RegistryFile, Reloader
from gateway.routes import ROUTES, generate_image
from gateway.server import CUTOFFS, use_served_limits
from gateway.settings import Settings
from gateway.state import AppState, Served


def create_app(
    registry: Registry,
    *,
    source: RegistryFile | None = None,
    drain: Drain | None = None,
    metrics: Metrics | None = None,
    reload_every_s: float = 2.0,
    signals: bool = False,
    resolver: Resolver = resolve_dns,
    clock: Clock = time.monotonic,
    instance: str | None = None,
) -> Starlette:
    """`instance`: the id /healthz answers (`gateway serve` gives one per run), by
    default a new one for this app; `source`: the registry's file, for reloads;
    `signals`: take SIGHUP (reload) and SIGTERM (drain) — only for a served process,
    never inside tests' event loops; `resolver` and `clock`: DNS discovery and health
    timing (fakes in tests).
    `registry` is served as given: the environment's overrides (`Settings.over`) are
    the caller's to apply, so nothing here reads the environment."""
    state = AppState(metrics=metrics or Metrics(), drain=drain or Drain(grace_s=0.0))
    if instance is not None:
        state.instance = instance
    metrics = state.metrics

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The cache's store is chosen once per process, from the registry it started
        # with: a reload that changes the cache section applies at the next restart.
        cache_observer = CacheMetrics(metrics)
        limiter_url, limiter_timeout_s = redis_for(registry)
        balancer = Balancer(registry, clock=clock)
        coordination_observer = CoordinationMetrics(metrics)
        async with (
            open_worker_session(slots=registry.worker_slots) as session,
            open_coordination(registry, balancer, observer=coordination_observer) as coordination,
            open_key_limits(
                limiter_url,
                timeout_s=limiter_timeout_s,
                lease_s=registry.coordination.lease_s,
                replicas=coordination.replicas if coordination is not None else lambda: 1,
            ) as key_limits,
            open_cache(registry.cache, observer=cache_observer) as cache,
        ):
            discovery = Discovery(balancer=balancer, resolver=resolver, clock=clock)
            await discovery.refresh_due()  # DNS pools start with their workers, if any
            prober = Prober(balancer=balancer, session=session, clock=clock)
            pipeline = Pipeline(
                registry=registry,
                balancer=balancer,
                session=session,
                metrics=metrics,
                cache=cache,
                coalescer=Coalescer(cache=cache),
            )
            reloader = _reloader(source, pipeline, metrics)
            state.served = Served(
                pipeline=pipeline,
                key_limits=key_limits,
                reloader=reloader,
                openapi=(registry.digest, openapi_json(registry)),
            )
            log_auth_mode(registry)
            metrics.set_registry(registry.digest)
            jobs = [prober.run(), discovery.run(), _sync_metrics(metrics, pipeline)]
            if reloader is not None:
                jobs.append(reloader.watch(every_s=reload_every_s))
            if coordination is not None:
                await coordination.beat()  # joined (or alone) before the first request
                jobs.append(coordination.run())
            if key_limits.shared is not None:
                jobs.append(key_limits.shared.renew())
            async with _background(*jobs), _signals(reloader, state.drain, enabled=signals):
                # Start-up objects live for the process: keep them out of every GC pass.
                gc.freeze()
                yield

    # The body limit is read once here: a reload that changes it needs a restart.
    max_bytes = registry.limits.max_body_bytes
    app = Starlette(
        routes=ROUTES,
        middleware=[
            Middleware(
                GatewayMiddleware, metrics=metrics, max_bytes=max_bytes, generation=generate_image
            )
        ],
        exception_handlers=dict(EXCEPTION_HANDLERS),
        lifespan=lifespan,
    )
    app.state.gateway = state  # the one attribute: see gateway.state
    return app


def _reloader(source: RegistryFile | None, pipeline: Pipeline, metrics: Metrics) -> Reloader | None:
    if source is None:
        return None
    return Reloader(
        source, current=lambda: pipeline.registry, apply=pipeline.use_registry, metrics=metrics
    )


async def _sync_metrics(metrics: Metrics, pipeline: Pipeline, every_s: float = 1.0) -> None:
    """Live balancer state and the server's cut-off connections into the metrics, in
    every process (see Metrics.sync_balancer)."""
    while True:
        metrics.sync_balancer(pipeline.balancer)
        metrics.sync_cutoffs(CUTOFFS)
        await asyncio.sleep(every_s)


@asynccontextmanager
async def _signals(
    reloader: Reloader | None, drain: Drain, *, enabled: bool
) -> AsyncIterator[None]:
    """SIGHUP reloads, SIGTERM drains: only in a served process (`enabled`)."""
    if not enabled:
        yield
        return
    loop = asyncio.get_running_loop()
    drain.install(loop)
    if reloader is not None:
        loop.add_signal_handler(signal.SIGHUP, reloader.reload_quietly)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        drain.uninstall()


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
    """The served app (`gateway serve`, each of its `--processes N`): every setting from
    `Settings.from_env()`, which `serve` filled from its flags."""
    settings = Settings.from_env()
    registry = settings.over(load_registry(settings.config))
    use_served_limits(registry.limits)  # the connections of this process, from now on
    metrics = Metrics(multiprocess_dir=settings.metrics_dir)
    return create_app(
        registry,
        source=RegistryFile(settings.config, prepare=settings.over),
        metrics=metrics,
        drain=Drain(grace_s=settings.drain_grace_s, metrics=metrics),
        reload_every_s=settings.reload_every_s,
        signals=True,
        instance=settings.instance,
    )
