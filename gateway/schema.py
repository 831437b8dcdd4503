"""Request and response bodies of the image API, and the 422 error shape.

`ImageGenerationBody` is Friendli Container's `ContainerImageGenerationBody`: an
existing client pointed at the gateway works unchanged. The simulator imports this
module (and nothing else from the gateway), so both sides agree on one contract.
"""

from __future__ import annotations

import math
import re
import secrets
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError
from pydantic.functional_validators import AfterValidator

MAX_SEED = 2**32 - 1
DEFAULT_FORMAT: Literal["jpeg"] = "jpeg"

ResponseFormat = Literal["raw", "jpeg"]


# One character that is not whitespace, whitespace being what `str.isspace` says,
# spelled out: JSON Schema's `\S` (ECMA regex) would let "\x1c" through, which Python
# counts as blank. The same pattern validates here and documents in /openapi.json.
VISIBLE_CHAR = r"[^\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_VISIBLE = re.compile(VISIBLE_CHAR)


def _not_blank(text: str) -> str:
    if not _VISIBLE.search(text):
        raise ValueError("prompt must contain non-whitespace text")
    return text


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("guidance_scale must be a finite number")
    return float(value)


Prompt = Annotated[
    str,
    Field(min_length=1, json_schema_extra={"pattern": VISIBLE_CHAR}),
    AfterValidator(_not_blank),
]
Steps = Annotated[StrictInt, Field(ge=1, le=50)]
# StrictFloat takes JSON integers (7 -> 7.0) but never strings or booleans.
Guidance = Annotated[StrictFloat, AfterValidator(_finite)]
Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]


class ImageGenerationBody(BaseModel):
    """What a client sends. Unknown fields are dropped here and never forwarded."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    prompt: Prompt
    num_inference_steps: Steps
    guidance_scale: Guidance
    model: str | None = None
    response_format: ResponseFormat | None = None
    seed: Seed | None = None


class WorkerRequest(BaseModel):
    """What the gateway sends a worker: every optional field decided, nothing else."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    num_inference_steps: int
    guidance_scale: float
    model: str | None
    response_format: ResponseFormat
    seed: int

    @classmethod
    def from_body(cls, body: ImageGenerationBody, *, upstream_model: str | None) -> WorkerRequest:
        return cls(
            prompt=body.prompt,
            num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale,
            model=upstream_model,
            response_format=body.response_format or DEFAULT_FORMAT,
            seed=new_seed() if body.seed is None else body.seed,
        )


class ImageResponse(BaseModel):
    """A success: base64 of the image bytes (JPEG, or PNG for `raw`)."""

    image: str


class ModelCard(BaseModel):
    """One adapter in `GET /v1/models` (OpenAI's model object, plus routing facts)."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "image-gateway"
    pool: str
    aliases: list[str]
    default: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# gateway.health.State's values (this module imports nothing from the gateway).
WorkerState = Literal["healthy", "unknown", "ejected", "down"]


class WorkerStatus(BaseModel):
    """One worker in `/status`: named as in logs and metrics, never by address unless
    the caller holds the admin key (then without userinfo, path or query)."""

    name: str
    state: WorkerState  # healthy and unknown are in service; ejected and down are out
    in_flight: int
    max_concurrency: int
    ejections: int
    address: str | None = None


class PoolStatus(BaseModel):
    """One pool in `/status`."""

    protocol: str
    healthy: int  # workers in service
    queue_depth: int
    ejections: int
    adapters: list[str]
    workers: list[WorkerStatus]


class Status(BaseModel):
    """`/healthz`, `/readyz` (with `pool` and `healthy` for `?pool=`) and `/status` (with
    `pools`). Fields that do not apply are left out."""

    status: Literal["ok", "ready", "unready", "starting", "draining"]
    registry: str | None = None
    pool: str | None = None
    healthy: int | None = None
    pools: dict[str, PoolStatus] | None = None
    instance: str | None = None  # /healthz: this server's id (see gateway.state)


class ErrorBody(BaseModel):
    """Every error but 422: one line saying what failed and why."""

    detail: str


class ValidationErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorBody(BaseModel):
    """422: FastAPI's shape, one item per broken rule."""

    detail: list[ValidationErrorItem]


def new_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


def error_list(exc: ValidationError) -> list[dict[str, Any]]:
    """pydantic's errors in FastAPI's shape: `{loc: ["body", field...], msg, type}`."""
    return [
        {"loc": ["body", *err["loc"]], "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_input=False, include_context=False)
    ]
