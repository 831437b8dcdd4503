"""The gateway's OpenAPI 3.1 document (`GET /openapi.json`), generated from the pydantic
models of `schema.py` so that the document and the parser cannot drift apart.

Built once at start: the prompt's `maxLength` and the security requirement come from
the registry (its `limits` and whether it has an `auth` section).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway.registry import Registry
from gateway.schema import (
    ErrorBody,
    ImageGenerationBody,
    ImageResponse,
    ModelList,
    Status,
    ValidationErrorBody,
)

_MODELS: list[type[BaseModel]] = [
    ImageGenerationBody,
    ImageResponse,
    ModelList,
    Status,
    ErrorBody,
    ValidationErrorBody,
]

_ERRORS = {
    "401": "no API key, or an unknown one",
    "403": "the key may not use this adapter",
    "404": "`model` names no adapter",
    "408": "the request head or body came too slowly (`limits.head_timeout_s`, ...)",
    "413": "the body is larger than `limits.max_body_bytes`",
    "415": "the body is not JSON",
    "429": "the key is over its rate limit or `max_concurrent` (see Retry-After)",
    "431": "the request line and headers are larger than `limits.max_header_bytes`",
    "4XX": "a worker refused the request's input; its status, one line of its reason",
    "502": "no worker produced an image",
    "503": "no capacity now, or none in time for X-Request-Deadline-Ms (see Retry-After)",
    "504": "a worker ran past its pool's deadline",
}

_IMAGE_HEADERS = {
    "X-Seed": "the seed used: send it back to get the same image",
    "X-Cache": "hit, miss or bypass",
    "X-Adapter": "the adapter that served the request",
    "X-Request-ID": "yours if it was safe, else a new one",
}


def openapi_json(registry: Registry) -> bytes:
    return json.dumps(openapi_document(registry), separators=(",", ":")).encode()


def openapi_document(registry: Registry) -> dict[str, Any]:
    schemas = _component_schemas()
    prompt = schemas["ImageGenerationBody"]["properties"]["prompt"]
    prompt["maxLength"] = registry.limits.max_prompt_chars
    security: list[dict[str, list[str]]] = [{"bearer": []}] if registry.auth else []
    return {
        "openapi": "3.1.0",
        "info": {"title": "image-gateway", "version": "1"},
        "paths": {
            "/v1/images/generations": {"post": _generate_operation(security)},
            "/v1/models": {"get": _models_operation(security)},
            "/healthz": {"get": _status_operation("the process is alive", ready=False)},
            "/readyz": {"get": _readyz_operation()},
            "/status": {"get": _report_operation(registry)},
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _component_schemas() -> dict[str, Any]:
    _, top = models_json_schema(
        [(model, "validation") for model in _MODELS],
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = top["$defs"]
    return schemas


def _generate_operation(security: list[dict[str, list[str]]]) -> dict[str, Any]:
    responses = {
        "200": {
            "description": "the image",
            "headers": {
                name: {"description": text, "schema": {"type": "string"}}
                for name, text in _IMAGE_HEADERS.items()
            },
            "content": _json("ImageResponse"),
        },
        "422": {
            "description": "the body broke a rule (or a worker refused it with 422)",
            "content": {
                "application/json": {
                    "schema": {"anyOf": [_ref("ValidationErrorBody"), _ref("ErrorBody")]}
                }
            },
        },
        **{
            code: {"description": text, "content": _json("ErrorBody")}
            for code, text in _ERRORS.items()
        },
    }
    return {
        "summary": "Generate an image (Friendli Container's image API)",
        "operationId": "generateImage",
        "parameters": [
            {
                "name": "X-Request-Deadline-Ms",
                "in": "header",
                "required": False,
                "description": (
                    "when, in ms from now, the image is wanted: refused at once (503) if "
                    "the queue cannot start it in time; default: the key's deadline_ms"
                ),
                "schema": {"type": "integer", "minimum": 1, "maximum": 3_600_000},
            }
        ],
        "requestBody": {"required": True, "content": _json("ImageGenerationBody")},
        "responses": responses,
        "security": security,
    }


def _models_operation(security: list[dict[str, list[str]]]) -> dict[str, Any]:
    return {
        "summary": "The adapters a `model` may name",
        "operationId": "listModels",
        "responses": {
            "200": {"description": "the adapters", "content": _json("ModelList")},
            "401": {"description": _ERRORS["401"], "content": _json("ErrorBody")},
        },
        "security": security,
    }


def _status_operation(summary: str, *, ready: bool) -> dict[str, Any]:
    responses = {"200": {"description": summary, "content": _json("Status")}}
    if ready:
        responses["503"] = {
            "description": "starting or draining (or, with `pool`, that pool has no worker)",
            "content": _json("Status"),
        }
    return {"summary": summary, "responses": responses, "security": []}


def _readyz_operation() -> dict[str, Any]:
    operation = _status_operation("registry loaded and not draining", ready=True)
    operation["parameters"] = [
        {
            "name": "pool",
            "in": "query",
            "required": False,
            "description": "ready only while this pool has a worker in service",
            "schema": {"type": "string"},
        },
        {
            "name": "verbose",
            "in": "query",
            "required": False,
            "description": "answer with /status's body (needs the key /status needs)",
            "allowEmptyValue": True,
            "schema": {"type": "string"},
        },
    ]
    operation["responses"]["404"] = {
        "description": "`pool` names no pool (the detail lists them)",
        "content": _json("ErrorBody"),
    }
    return operation


def _report_operation(registry: Registry) -> dict[str, Any]:
    """`/status` takes a key only where `/metrics` does: when a metrics key is set."""
    guarded = registry.auth is not None and registry.auth.metrics_key_sha256 is not None
    responses: dict[str, Any] = {
        "200": {
            "description": "the report; each worker's address only for the admin key",
            "content": _json("Status"),
        },
        "503": {"description": "still starting", "content": _json("Status")},
    }
    if guarded:
        responses["401"] = {"description": "no metrics or admin key", "content": _json("ErrorBody")}
    return {
        "summary": "Each pool's workers, health, queue depth and ejections",
        "operationId": "status",
        "responses": responses,
        "security": [{"bearer": []}] if guarded else [],
    }


def _json(model: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(model)}}


def _ref(model: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model}"}
