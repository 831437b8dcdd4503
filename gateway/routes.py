"""The HTTP endpoints: a request in, a pipeline call, a response out.

Handlers read their dependencies from `request.app.state` (set by the lifespan) and
raise `gateway.errors` exceptions; `app.py` turns those into responses in one place.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.auth import authenticate, require_key
from gateway.cache import policy_from_cache_control
from gateway.errors import ConfigError, ReloadRefused, UnsupportedMediaType, ValidationFailed
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.openapi import openapi_json
from gateway.pipeline import Pipeline
from gateway.ratelimit import KeyLimits
from gateway.registry import KeySpec, Reloader
from gateway.schema import ImageGenerationBody, ModelCard, ModelList, error_list
from gateway.server import CUTOFFS


async def generate_image(request: Request) -> Response:
    pipeline: Pipeline = request.app.state.pipeline
    key = authenticate(request, pipeline.registry.auth)
    if key is None:  # an open gateway: no per-key limits to keep
        return await _generate(request, pipeline, key)
    limits: KeyLimits = request.app.state.key_limits
    async with limits.admit(key):
        return await _generate(request, pipeline, key)


async def _generate(request: Request, pipeline: Pipeline, key: KeySpec | None) -> Response:
    max_chars = pipeline.registry.limits.max_prompt_chars
    try:
        body = await _parse_body(request, max_prompt_chars=max_chars)
    except ClientDisconnect:  # gone before its body came, or cut off for it (server.py)
        return Response(status_code=499)
    state = request.state
    policy = policy_from_cache_control(request.headers.get("cache-control"))
    try:
        async with _DisconnectWatch(request) as watch:
            result = await pipeline.generate(
                body,
                request_id=state.request_id,
                key=key,
                trace=state.trace,
                cache_policy=policy,
                on_queued=watch.start,
            )
    except ClientDisconnect:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    headers = {"X-Seed": str(result.seed), "X-Cache": result.cache, "X-Adapter": result.adapter}
    # The worker's bytes as they came: never parsed, never re-encoded.
    return Response(result.body, media_type="application/json", headers=headers)


class _DisconnectWatch:
    """Cancels the request's task if its client disconnects, once `start()` is called:
    a request waiting in a pool's queue must then leave it and never take a GPU slot.
    (uvicorn does not cancel a handler on disconnect; it only tells `receive`.)

    Started only when the request has to queue: watching means a task per request
    reading `receive()`, which requests that find a free worker do not need.
    """

    def __init__(self, request: Request) -> None:
        self.receive = request.receive
        task = asyncio.current_task()
        assert task is not None
        self.task: asyncio.Task[Any] = task
        self.watch: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.watch is None:
            self.watch = asyncio.create_task(self._cancel_on_disconnect())

    async def _cancel_on_disconnect(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.task.cancel()

    async def __aenter__(self) -> _DisconnectWatch:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        watch = self.watch
        if watch is None:
            return
        watch.cancel()
        fired = watch.done() and not watch.cancelled() and watch.exception() is None
        if kind is not None and issubclass(kind, asyncio.CancelledError) and fired:
            self.task.uncancel()  # our own cancel, not the server's: end as a disconnect
            raise ClientDisconnect from None


async def _parse_body(request: Request, *, max_prompt_chars: int) -> ImageGenerationBody:
    content_type = request.headers.get("content-type", "application/json")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {media_type or 'nothing'!r}"
        )
    try:
        body = ImageGenerationBody.model_validate_json(await request.body())
    except ValidationError as exc:
        raise ValidationFailed(error_list(exc)) from exc
    if len(body.prompt) > max_prompt_chars:
        # The limit is the registry's, so it is checked here rather than in the model;
        # the error has pydantic's own shape for a string too long.
        msg = f"String should have at most {max_prompt_chars} characters"
        raise ValidationFailed([{"loc": ["body", "prompt"], "msg": msg, "type": "string_too_long"}])
    return body


async def list_models(request: Request) -> Response:
    """The adapters this caller may use (every adapter on an open gateway)."""
    pipeline: Pipeline = request.app.state.pipeline
    registry = pipeline.registry
    key = authenticate(request, registry.auth)
    cards = [
        ModelCard(
            id=adapter.name,
            pool=adapter.pool,
            aliases=list(adapter.aliases),
            default=adapter.default,
        )
        for adapter in registry.adapters
        if key is None or key.may_use(adapter.name)
    ]
    return JSONResponse(ModelList(data=cards).model_dump(mode="json"))


async def openapi(request: Request) -> Response:
    """Made once per registry: it shows the prompt limit and auth, which a reload moves."""
    registry = request.app.state.pipeline.registry
    digest, document = request.app.state.openapi
    if digest != registry.digest:
        digest, document = request.app.state.openapi = (registry.digest, openapi_json(registry))
    return Response(document, media_type="application/json")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when the registry is loaded, every adapter has a healthy worker, and the
    process is not draining."""
    pipeline: Pipeline | None = getattr(request.app.state, "pipeline", None)
    if pipeline is None:
        return JSONResponse({"status": "starting"}, 503)
    if request.app.state.drain.draining:
        return JSONResponse({"status": "draining"}, 503)
    balancer, registry = pipeline.balancer, pipeline.registry
    unserved = sorted(
        adapter.name
        for adapter in registry.adapters
        if balancer.pool(adapter.pool).healthy_count() == 0
    )
    if unserved:
        return JSONResponse({"status": "unready", "adapters_without_workers": unserved}, 503)
    return JSONResponse({"status": "ready", "registry": registry.digest})


async def metrics(request: Request) -> Response:
    require_key(request, "metrics")
    metrics: Metrics = request.app.state.metrics
    pipeline: Pipeline | None = getattr(request.app.state, "pipeline", None)
    if pipeline is not None:
        metrics.sync_balancer(pipeline.balancer)  # this process's state, as of now
    metrics.sync_cutoffs(CUTOFFS)
    return Response(metrics.exposition(), media_type=CONTENT_TYPE)


async def admin_reload(request: Request) -> Response:
    require_key(request, "admin")
    reloader: Reloader | None = request.app.state.reloader
    if reloader is None:
        raise ReloadRefused("this gateway was not started from a registry file")
    try:
        result = reloader.reload()
    except ConfigError as exc:
        raise ReloadRefused(f"registry refused, the old one keeps serving: {exc}") from exc
    return JSONResponse({"status": result, "registry": reloader.current().digest})


ROUTES = [
    Route("/v1/images/generations", generate_image, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/admin/reload", admin_reload, methods=["POST"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
