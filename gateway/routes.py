"""The HTTP endpoints: a request in, a pipeline call, a response out.

Handlers read their dependencies from `request.app.state` (set by the lifespan) and
raise `gateway.errors` exceptions; `app.py` turns those into responses in one place.
"""

from __future__ import annotations

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.auth import authenticate
from gateway.errors import UnsupportedMediaType, ValidationFailed
from gateway.pipeline import Pipeline
from gateway.ratelimit import KeyLimits
from gateway.registry import KeySpec
from gateway.schema import ImageGenerationBody, ModelCard, ModelList, error_list


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
    body = await _parse_body(request, max_prompt_chars=max_chars)
    result = await pipeline.generate(body, request_id=request.state.request_id, key=key)
    headers = {"X-Seed": str(result.seed), "X-Cache": result.cache, "X-Adapter": result.adapter}
    # The worker's bytes as they came: never parsed, never re-encoded.
    return Response(result.body, media_type="application/json", headers=headers)


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
    document: bytes = request.app.state.openapi
    return Response(document, media_type="application/json")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when the registry is loaded and every adapter has a healthy worker."""
    pipeline: Pipeline | None = getattr(request.app.state, "pipeline", None)
    if pipeline is None:
        return JSONResponse({"status": "starting"}, 503)
    balancer, registry = pipeline.balancer, pipeline.registry
    unserved = sorted(
        adapter.name
        for adapter in registry.adapters
        if balancer.pool(adapter.pool).healthy_count() == 0
    )
    if unserved:
        return JSONResponse({"status": "unready", "adapters_without_workers": unserved}, 503)
    return JSONResponse({"status": "ready", "registry": registry.digest})


ROUTES = [
    Route("/v1/images/generations", generate_image, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
