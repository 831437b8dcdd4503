"""Request and response bodies of the image API, and the 422 error shape.

`ImageGenerationBody` is Friendli Container's `ContainerImageGenerationBody`: an
existing client pointed at the gateway works unchanged. The simulator imports this
module (and nothing else from the gateway), so both sides agree on one contract.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import secrets
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
)
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

# Control images (ControlNet inputs). Friendli documents up to 50 MiB an image; the
# gateway holds a whole body in memory and hashes every image for the cache key, so it
# takes fewer and smaller ones. A body carrying them also needs `limits.max_body_bytes`
# raised (64 KiB by default): base64 is 4/3 of the image.
MAX_CONTROL_IMAGES = 4
MAX_CONTROL_IMAGE_BYTES = 8 * 2**20  # decoded
MAX_CONTROL_IMAGE_URL_CHARS = 2048
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
# What an image file starts with: enough to tell one from text, HTML or garbage
# without decoding it (as gateway.answers checks a worker's image).
_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", b""),
    (b"\xff\xd8\xff", b""),
    (b"RIFF", b"WEBP"),  # WebP: "WEBP" at bytes 8..12
    (b"GIF87a", b""),
    (b"GIF89a", b""),
)


def is_image_url(text: str) -> bool:
    """Is a control image given as an http(s) URL (rather than as base64)?"""
    return text[:8].lower().startswith(("http://", "https://"))


def _control_image(text: str) -> str:
    if is_image_url(text):
        _check_url(text)
    else:
        _check_base64_image(text)
    return text


def _check_url(text: str) -> None:
    if len(text) > MAX_CONTROL_IMAGE_URL_CHARS:
        raise ValueError(f"a control image URL must be at most {MAX_CONTROL_IMAGE_URL_CHARS} chars")
    if not text.isascii() or not text.isprintable() or " " in text:
        raise ValueError("a control image URL must be printable ASCII without spaces")
    try:
        host = urlsplit(text).hostname
    except ValueError:
        host = None
    if not host:
        raise ValueError("a control image URL must name a host")


def _check_base64_image(text: str) -> None:
    """Standard base64 of a PNG, JPEG, WebP or GIF of at most MAX_CONTROL_IMAGE_BYTES,
    checked by its length, alphabet and first bytes: never decoded whole."""
    size = len(text) // 4 * 3 - (len(text) - len(text.rstrip("=")))
    if size > MAX_CONTROL_IMAGE_BYTES:
        raise ValueError(f"a control image must be at most {MAX_CONTROL_IMAGE_BYTES} bytes")
    raw = text.encode("ascii", errors="replace")
    if (
        len(raw) < 16
        or len(raw) % 4
        or raw.translate(None, _B64_ALPHABET)
        or b"=" in raw.rstrip(b"=")
        or len(raw) - len(raw.rstrip(b"=")) > 2
    ):
        raise ValueError("a control image must be an http(s) URL or standard base64")
    try:
        head = base64.b64decode(raw[:16], validate=True)
    except binascii.Error as exc:
        raise ValueError("a control image must be an http(s) URL or standard base64") from exc
    if not any(head.startswith(a) and head[8:12].startswith(b) for a, b in _IMAGE_MAGIC):
        raise ValueError("a control image must be a PNG, JPEG, WebP or GIF")


class ControlImage(BaseModel):
    """One control image, as the `friendli` SDK sends it (its `ImageInput`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    image: Annotated[str, AfterValidator(_control_image)]


ControlImages = Annotated[tuple[ControlImage, ...], Field(max_length=MAX_CONTROL_IMAGES)]
ControlnetWeights = Annotated[
    tuple[Annotated[StrictFloat, Field(ge=0, le=1)], ...],  # NaN fails both bounds
    Field(max_length=MAX_CONTROL_IMAGES),
]


class ImageGenerationBody(BaseModel):
    """What a client sends. Unknown fields are dropped here and never forwarded."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    prompt: Prompt
    num_inference_steps: Steps
    guidance_scale: Guidance
    model: str | None = None
    response_format: ResponseFormat | None = None
    seed: Seed | None = None
    control_images: ControlImages | None = None
    controlnet_weights: ControlnetWeights | None = None

    @field_validator("control_images", "controlnet_weights", mode="after")
    @classmethod
    def _empty_is_none(cls, value: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
        return value or None  # [] asks for nothing: the same request (and key) as none

    @field_validator("controlnet_weights", mode="after")
    @classmethod
    def _one_per_image(
        cls, weights: tuple[float, ...] | None, info: ValidationInfo
    ) -> tuple[float, ...] | None:
        if weights is None:
            return None
        images = info.data.get("control_images")
        if "control_images" not in info.data:
            return weights  # control_images was refused itself: that error says why
        count = len(images or ())
        if count == 0:
            raise ValueError("controlnet_weights were given without control_images")
        if len(weights) != count:
            raise ValueError(
                f"controlnet_weights must have one weight per control image: "
                f"{len(weights)} weights for {count} images"
            )
        return weights


# WorkerRequest's fields that a worker's JSON carries only when given: a request
# without them is byte for byte what it was before they existed.
_ONLY_WHEN_GIVEN = ("control_images", "controlnet_weights")


class WorkerRequest(BaseModel):
    """What the gateway sends a worker: every optional field decided, nothing else."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    num_inference_steps: int
    guidance_scale: float
    model: str | None
    response_format: ResponseFormat
    seed: int
    control_images: tuple[ControlImage, ...] | None = None
    controlnet_weights: tuple[float, ...] | None = None

    @classmethod
    def from_body(cls, body: ImageGenerationBody, *, upstream_model: str | None) -> WorkerRequest:
        return cls(
            prompt=body.prompt,
            num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale,
            model=upstream_model,
            response_format=body.response_format or DEFAULT_FORMAT,
            seed=new_seed() if body.seed is None else body.seed,
            control_images=body.control_images,
            controlnet_weights=body.controlnet_weights,
        )

    def to_json(self) -> bytes:
        """The friendli-container worker's request body."""
        absent = {name for name in _ONLY_WHEN_GIVEN if getattr(self, name) is None}
        return self.model_dump_json(exclude=absent).encode()


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
