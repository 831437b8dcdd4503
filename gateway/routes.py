"""The HTTP endpoints: a request in, a pipeline call, a response out.

Handlers read their dependencies from the typed `gateway.state` (built in the
lifespan) and raise `gateway.errors` exceptions; `app.py` turns those into responses
in one place.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.auth import authenticate, holds_key, require_key
from gateway.balancer import Pool
from gateway.cache import policy_from_cache_control
from gateway.coordination import shared_view
from gateway.errors import (
    ConfigError,
    ReloadRefused,
    UnknownPool,
    UnsupportedMediaType,
    ValidationFailed,
)
from gateway.metrics import CONTENT_TYPE
from gateway.openapi import openapi_json
from gateway.pipeline import Pipeline
from gateway.registry import KeySpec, LimitsSpec, Registry
from gateway.schema import (
    ImageGenerationBody,
    ModelCard,
    ModelList,
    PoolStatus,
    Status,
    WorkerStatus,
    error_list,
    is_image_url,
)
from gateway.server import CUTOFFS
from gateway.state import app_state, served


async def generate_image(request: Request) -> Response:
    found = served(request)
    pipeline = found.pipeline
    key = authenticate(request, pipeline.registry.auth)
    if key is None:  # an open gateway: no per-key limits to keep
        return await _generate(request, pipeline, key)
    async with found.key_limits.admit(key):
        return await _generate(request, pipeline, key)


async def _generate(request: Request, pipeline: Pipeline, key: KeySpec | None) -> Response:
    try:
        body = await _parse_body(request, limits=pipeline.registry.limits)
    except ClientDisconnect:  # gone before its body came, or cut off for it (server.py)
        return Response(status_code=499)
    state = request.state
    policy = policy_from_cache_control(request.headers.get("cache-control"))
    deadline_s = _deadline_s(request.headers.get(DEADLINE_HEADER))
    try:
        async with _DisconnectWatch(request) as watch:
            result = await pipeline.generate(
                body,
                request_id=state.request_id,
                key=key,
                trace=state.trace,
                cache_policy=policy,
                on_queued=watch.start,
                deadline_s=deadline_s,
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


DEADLINE_HEADER = "x-request-deadline-ms"
MAX_DEADLINE_MS = 3_600_000


def _deadline_s(value: str | None) -> float | None:
    """X-Request-Deadline-Ms: when, in milliseconds from now, the client wants the
    image; None when not sent (the key's default applies)."""
    if value is None:
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_DEADLINE_MS:
        msg = f"X-Request-Deadline-Ms must be a whole number of milliseconds, 1..{MAX_DEADLINE_MS}"
        loc = ["header", "X-Request-Deadline-Ms"]
        raise ValidationFailed([{"loc": loc, "msg": msg, "type": "deadline_invalid"}])
    return int(text) / 1000


async def _parse_body(request: Request, *, limits: LimitsSpec) -> ImageGenerationBody:
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
    if len(body.prompt) > limits.max_prompt_chars:
        # The limit is the registry's, so it is checked here rather than in the model;
        # the error has pydantic's own shape for a string too long.
        msg = f"String should have at most {limits.max_prompt_chars} characters"
        raise ValidationFailed([{"loc": ["body", "prompt"], "msg": msg, "type": "string_too_long"}])
    _check_image_urls(body, limits.url_hosts)
    return body


def _check_image_urls(body: ImageGenerationBody, allowed: frozenset[str]) -> None:
    """A control image given as a URL only from a host the registry lists: the gateway
    never fetches it, but a worker would, from inside the operator's network."""
    for index, control in enumerate(body.control_images or ()):
        if not is_image_url(control.image):
            continue
        host = urlsplit(control.image).hostname or ""
        if host.lower() not in allowed:
            msg = (
                f"control image URLs from {host!r} are not allowed"
                if allowed
                else "control images must be base64: this gateway takes no image URLs"
            )
            loc = ["body", "control_images", index, "image"]
            raise ValidationFailed([{"loc": loc, "msg": msg, "type": "url_not_allowed"}])


async def list_models(request: Request) -> Response:
    """The adapters this caller may use (every adapter on an open gateway)."""
    registry = served(request).pipeline.registry
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
    found = served(request)
    registry = found.pipeline.registry
    digest, document = found.openapi
    if digest != registry.digest:
        digest, document = found.openapi = (registry.digest, openapi_json(registry))
    return Response(document, media_type="application/json")


async def healthz(request: Request) -> Response:
    return _status_json(Status(status="ok", instance=app_state(request).instance), 200)


async def readyz(request: Request) -> Response:
    """Ready while this process can serve: registry loaded, not draining. A pool with
    no healthy worker leaves it ready, since it still serves every other pool (taking
    every replica out of rotation for one dead pool would fail them all); that pool
    shows in `?pool=NAME`, in `/status` and in the GatewayPoolWithoutHealthyWorker alert.

    `?pool=NAME`: 200 while that pool has a worker in service, else 503; 404 for a
    name that is no pool. `?verbose`: `/status`'s body with this route's status code.
    """
    pipeline, state = _process_state(request)
    if pipeline is None:
        return _status_json(Status(status=state), 503)
    code = 200 if state == "ready" else 503
    params = request.query_params
    if "verbose" in params:
        return _status_json(_full_status(request, pipeline, state), code)
    name = params.get("pool")
    pool = None if name is None else _pool(pipeline, name)  # a wrong name: 404 even draining
    if code != 200:
        return _status_json(Status(status=state), code)
    if pool is None:
        return _status_json(Status(status=state, registry=pipeline.registry.digest), code)
    view = shared_view(pool)
    healthy = pool.healthy_count() if view is None else view.healthy()
    ready = Status(status="ready" if healthy else "unready", pool=pool.name, healthy=healthy)
    return _status_json(ready, 200 if healthy else 503)


async def status(request: Request) -> Response:
    """Every pool's workers, health, queue and ejections, as this process sees them, or
    as the pool's dispatcher does where this process follows one (coordination.py):
    200 whenever there is a report (`status` says whether the process is draining)."""
    pipeline, state = _process_state(request)
    if pipeline is None:
        return _status_json(Status(status=state), 503)
    return _status_json(_full_status(request, pipeline, state), 200)


ProcessState = Literal["starting", "draining", "ready"]


def _process_state(request: Request) -> tuple[Pipeline | None, ProcessState]:
    state = app_state(request)
    if state.served is None:
        return None, "starting"
    return state.served.pipeline, "draining" if state.drain.draining else "ready"


def _pool(pipeline: Pipeline, name: str) -> Pool:
    pools = pipeline.balancer.pools
    if name not in pools:
        raise UnknownPool(name, pools)
    return pools[name]


def _full_status(request: Request, pipeline: Pipeline, state: ProcessState) -> Status:
    """Guarded as /metrics is (it holds the same facts); worker addresses only for the
    admin key, whose holder may see the registry's internals anyway."""
    registry = pipeline.registry
    admin = holds_key(request, "admin", registry.auth)
    if not admin:
        require_key(request, "metrics", registry.auth)
    pools = {
        pool.name: _pool_status(pool, registry, addresses=admin)
        for pool in pipeline.balancer.pools.values()
    }
    return Status(status=state, registry=registry.digest, pools=pools)


def _pool_status(pool: Pool, registry: Registry, *, addresses: bool) -> PoolStatus:
    """This process's view of `pool`, or the dispatcher's when this process follows
    one (coordination.py): then workers, health and queue are the whole pool's."""
    view = shared_view(pool)
    workers = []
    for worker in pool.workers:
        seen = {} if view is None else view.workers.get(worker.url, {})
        workers.append(
            WorkerStatus(
                name=worker.name,
                state=seen.get("state", worker.health.state.value),
                in_flight=seen.get("in_flight", worker.in_flight),
                max_concurrency=worker.spec.max_concurrency,
                ejections=seen.get("ejections", worker.stats.ejections),
                address=_address(worker.url) if addresses else None,
            )
        )
    return PoolStatus(
        protocol=pool.spec.protocol,
        healthy=pool.healthy_count() if view is None else view.healthy(),
        queue_depth=len(pool.queue) if view is None else view.queue,
        ejections=pool.stats.ejections,
        adapters=[adapter.name for adapter in registry.adapters if adapter.pool == pool.name],
        workers=workers,
    )


def _address(url: str) -> str:
    """scheme://host:port: no userinfo, path or query, where credentials could hide."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{host}"


def _status_json(body: Status, code: int) -> Response:
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), code)


async def metrics(request: Request) -> Response:
    pipeline = served(request).pipeline
    require_key(request, "metrics", pipeline.registry.auth)
    metrics = app_state(request).metrics
    metrics.sync_balancer(pipeline.balancer)  # this process's state, as of now
    metrics.sync_cutoffs(CUTOFFS)
    return Response(metrics.exposition(), media_type=CONTENT_TYPE)


async def admin_reload(request: Request) -> Response:
    found = served(request)
    require_key(request, "admin", found.pipeline.registry.auth)
    reloader = found.reloader
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
    Route("/status", status, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/admin/reload", admin_reload, methods=["POST"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
