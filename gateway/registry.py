"""adapters.yaml -> a frozen, validated `Registry`.

A pool is a set of interchangeable GPU workers of one base model; an adapter is what a
client's `model` names: a route to a pool, plus the LoRA name the workers know it by.
The file is validated once, at start and at reload; a bad file is refused with a
`ConfigError` naming the file, line and key, and the caller keeps the old registry.

Two optional sections guard the front door: `limits` (sizes a request may have) and
`auth` (API keys, stored as sha256 hashes, each with its adapters and rate limits).
Values may name environment variables, `${NAME}`, for secrets that must not sit in
the file (a pool's worker credentials, a Redis password); they are expanded here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.functional_validators import AfterValidator

from gateway.errors import ConfigError, UnknownModel
from gateway.fairness import DEFAULT_TEAM, Priority

Loc = tuple[str | int, ...]
OTHER_TEAM = "other"  # the metric label of a team the registry does not name


def _worker_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"worker url must start with http:// or https://, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"worker url has no host: {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"worker url must not have a query or fragment: {url!r}")
    return url.rstrip("/")


Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/@+-]+$")]

# A sha256 hex digest; pydantic's message for a mismatch names the pattern, never the
# value, so a refused file does not echo a key hash into a log.
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$"), AfterValidator(str.lower)]

_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

# Headers that describe one connection, not the message (RFC 9110 7.6.1), and the ones
# the gateway sets itself: a pool's `headers` may not set them.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_GATEWAY_SET = frozenset({"host", "content-length", "content-type", "x-request-id"})
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _expand_env(value: str, info: ValidationInfo) -> str:
    """`${NAME}` -> the variable's value, read once here, at load."""
    env: Mapping[str, str] = (info.context or {}).get("env", os.environ)

    def lookup(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            raise ValueError(f"environment variable {name} is not set")
        return env[name]

    return _ENV_REF.sub(lookup, value)


def _header_name(name: str) -> str:
    if not _TOKEN.match(name):
        raise ValueError(f"{name!r} is not a valid header name")
    if name.lower() in HOP_BY_HOP or name.lower() in _GATEWAY_SET:
        raise ValueError(f"{name!r} is set by the gateway (or never forwarded); not configurable")
    return name


def _header_value(value: str) -> str:
    if any(ch in value for ch in "\r\n\0"):
        raise ValueError("a header value may not contain CR, LF or NUL")
    return value


HeaderName = Annotated[str, AfterValidator(_header_name)]
# Expanded first, then checked: a variable must not smuggle a line break either.
HeaderValue = Annotated[str, AfterValidator(_expand_env), AfterValidator(_header_value)]


def _redis_url(url: str) -> str:
    # The messages never repeat the URL: it may carry a password.
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("a Redis url must start with redis://, rediss:// or unix://")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError("a Redis url has no host")
    return url


def redacted(url: str) -> str:
    """`url` without its password, for logs and `gateway check`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else "***@"
    return parts._replace(netloc=user + netloc).geturl()


def redis_where(url: str) -> str:
    """Where a Redis URL points (host:port, or the socket path), for logs: no password."""
    parts = urlsplit(redacted(url))
    return parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port or 6379}"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class WorkerSpec(_Frozen):
    url: Annotated[str, AfterValidator(_worker_url)]
    max_concurrency: Annotated[int, Field(ge=1, le=1024)] = 1
    weight: Annotated[float, Field(gt=0, le=1000)] = 1.0
    adapters: tuple[Name, ...] = ()  # LoRA adapters already loaded at start (warm)


RetryOn = Literal["5xx", "timeout", "truncated", "bad_answer"]


class HealthSpec(_Frozen):
    """Passive ejection and active probes of one pool's workers (Envoy's outlier
    detection and health checks, with their defaults where they fit a GPU pool)."""

    # This many connection errors, 5xx or timeouts in a row eject a worker...
    consecutive_failures: Annotated[int, Field(ge=1, le=1000)] = 5
    # ...for base_ejection_s x (times it was ejected), at most max_ejection_s.
    base_ejection_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    max_ejection_s: Annotated[float, Field(gt=0, le=86400)] = 300.0
    # Never more than this share of the pool out at once; one worker always stays in
    # unless its own probes say it is down. 50, not Envoy's 10: GPU pools are small.
    max_ejection_percent: Annotated[int, Field(ge=0, le=100)] = 50
    # Ejected, down and not-yet-known workers are probed this often...
    probe_interval_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    probe_timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    # ...and come back after this many good probes in a row.
    healthy_threshold: Annotated[int, Field(ge=1, le=100)] = 2


class DiscoverSpec(_Frozen):
    """Workers from DNS: every A/AAAA record of `dns` is a worker (a Kubernetes
    headless Service); each gets the slots, weight and warm adapters given here."""

    dns: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.-]+$")]
    port: Annotated[int, Field(ge=1, le=65535)]
    every_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    scheme: Literal["http", "https"] = "http"
    max_concurrency: Annotated[int, Field(ge=1, le=1024)] = 1
    weight: Annotated[float, Field(gt=0, le=1000)] = 1.0
    adapters: tuple[Name, ...] = ()

    def url_for(self, address: str) -> str:
        host = f"[{address}]" if ":" in address else address  # IPv6 goes in brackets
        return f"{self.scheme}://{host}:{self.port}"

    def worker_spec(self, url: str) -> WorkerSpec:
        return WorkerSpec(
            url=url,
            max_concurrency=self.max_concurrency,
            weight=self.weight,
            adapters=self.adapters,
        )


# The protocols a pool may speak (gateway.protocols.PROTOCOLS implements each one).
ProtocolName = Literal["friendli-container", "openai-images", "a1111", "comfyui", "cog"]

# Each protocol's settings block on a pool: its key -> the protocol it is for. A block
# given on a pool of another protocol is refused (_cross_check), with its line.
SETTINGS_BLOCKS: Mapping[str, str] = {
    "openai": "openai-images",
    "a1111": "a1111",
    "comfyui": "comfyui",
    "cog": "cog",
}

# The protocols whose adapters may set `lora_weight`.
LORA_WEIGHT_PROTOCOLS: frozenset[str] = frozenset({"a1111", "comfyui", "cog"})


FieldName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
UrlPath = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^/[A-Za-z0-9._~/-]*$")]
ImageSize = Annotated[str, Field(pattern=r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$")]
OPENAI_FIELDS = ("prompt", "n", "response_format", "size", "model")  # the gateway's own


class OpenAIImagesSettings(_Frozen):
    """An `openai-images` pool: `POST /v1/images/generations` with `n: 1` and
    `response_format: b64_json`. The diffusion inputs OpenAI's own API lacks go in
    vendor fields; their names default to what vLLM-Omni and SGLang accept. Set one to
    null for a server that rejects it (OpenAI itself takes none of the four)."""

    size: ImageSize | None = "1024x1024"  # None: not sent (the server's default)
    # The served model name of adapters without upstream_model; None: no `model` field.
    model: Name | None = None
    steps_field: FieldName | None = "num_inference_steps"
    guidance_field: FieldName | None = "guidance_scale"
    seed_field: FieldName | None = "seed"  # None: no seed sent, so not deterministic
    # Asks for the client's format ("jpeg" / "png"); a server that ignores it answers
    # PNG, re-encoded here when the client asked for JPEG.
    format_field: FieldName | None = "output_format"
    extra_fields: Mapping[FieldName, JsonValue] = Field(default_factory=dict)  # sent as given
    path: UrlPath = "/v1/images/generations"
    health_path: UrlPath = "/health"  # or /v1/models

    @model_validator(mode="after")
    def _fields_apart(self) -> OpenAIImagesSettings:
        named = [self.steps_field, self.guidance_field, self.seed_field, self.format_field]
        mine = [name for name in named if name is not None]
        if len(set(mine)) != len(mine):
            raise ValueError(f"two inputs sent in one field: {', '.join(mine)}")
        taken = set(OPENAI_FIELDS) | set(mine)
        if clash := sorted(taken & set(self.extra_fields)):
            raise ValueError(f"extra_fields may not set {', '.join(clash)}: the gateway sets it")
        return self


A1111_FIELDS = (  # the gateway's own, in every txt2img request
    "prompt",
    "seed",
    "steps",
    "cfg_scale",
    "width",
    "height",
    "sampler_name",
    "scheduler",
    "negative_prompt",
    "batch_size",
    "n_iter",
    "send_images",
    "save_images",
)
Side = Annotated[int, Field(ge=64, le=8192, multiple_of=8)]


class A1111Settings(_Frozen):
    """An `a1111` pool (AUTOMATIC1111, Forge, SD.Next): `POST /sdapi/v1/txt2img`, one
    image, the adapter's LoRA as `<lora:NAME:WEIGHT>` at the end of the prompt."""

    sampler_name: Annotated[str, Field(min_length=1, max_length=64)] = "Euler"  # the API's
    scheduler: Annotated[str, Field(min_length=1, max_length=64)] | None = None  # None: its
    width: Side = 512
    height: Side = 512
    lora_weight: Annotated[float, Field(ge=-10, le=10, allow_inf_nan=False)] = 1.0
    negative_prompt: Annotated[str, Field(max_length=4000)] | None = None
    # More txt2img fields, sent as given (e.g. override_settings: {CLIP_stop_at_last_layers: 2}).
    extra_fields: Mapping[FieldName, JsonValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fields_apart(self) -> A1111Settings:
        if clash := sorted(set(A1111_FIELDS) & set(self.extra_fields)):
            raise ValueError(f"extra_fields may not set {', '.join(clash)}: the gateway sets it")
        return self


# -- comfyui and cog: their pool settings ---------------------------------------------------

InputName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
NodeId = Annotated[str, Field(min_length=1, max_length=64)]
LoraWeight = Annotated[float, Field(ge=-10, le=10, allow_inf_nan=False)]


class CogSettings(_Frozen):
    """A Cog model's input names (its `GET /openapi.json`, `Input` schema): each of our
    fields goes to the input named here; None: the model has no such input (it is not
    sent). The defaults are the names of Replicate's SDXL and Flux images."""

    prompt_input: InputName = "prompt"
    steps_input: InputName | None = "num_inference_steps"
    guidance_input: InputName | None = "guidance_scale"
    # None: the model takes no seed, so it draws a new image every time: not cached.
    seed_input: InputName | None = "seed"
    output_format_input: InputName | None = "output_format"
    jpeg_value: Annotated[str, Field(min_length=1, max_length=16)] = "jpg"  # for `jpeg`
    png_value: Annotated[str, Field(min_length=1, max_length=16)] = "png"  # for `raw`
    # The adapter: its upstream_model goes into this input (`lora_weights`,
    # `replicate_weights`: a name or URL the image loads); None: one image per adapter,
    # a pool each, and the adapters name no upstream_model.
    adapter_input: InputName | None = None
    lora_scale_input: InputName | None = None  # the adapter's lora_weight goes here
    lora_weight: LoraWeight = 1.0  # for adapters that set none
    # Inputs every prediction gets as they are (width, height, num_outputs: 1, ...).
    inputs: Mapping[InputName, str | int | float | bool] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _distinct_inputs(self) -> CogSettings:
        mapped = [name for name in self.mapped_inputs() if name is not None]
        for name in mapped:
            if mapped.count(name) > 1:
                raise ValueError(f"input {name!r} is mapped twice")
            if name in self.inputs:
                raise ValueError(f"input {name!r} is both mapped and fixed (in 'inputs')")
        return self

    def mapped_inputs(self) -> tuple[str | None, ...]:
        return (
            self.prompt_input,
            self.steps_input,
            self.guidance_input,
            self.seed_input,
            self.output_format_input,
            self.adapter_input,
            self.lora_scale_input,
        )


class ComfyuiSettings(_Frozen):
    """A ComfyUI pool's workflow: an API-format JSON file ("Save (API)" in ComfyUI: node
    id -> {class_type, inputs}) and the nodes and inputs our fields fill in. The file is
    read and checked at load (it exists, is JSON, and has every node and input named
    here); a changed file is read again at the next reload."""

    workflow: str  # its path: relative to the registry file, or absolute
    prompt_node: NodeId
    prompt_input: InputName = "text"
    sampler_node: NodeId  # the KSampler: seed, steps and cfg
    seed_input: InputName = "seed"
    steps_input: InputName = "steps"
    cfg_input: InputName = "cfg"
    # When the seed lives in another node (SamplerCustomAdvanced's RandomNoise:
    # seed_node: "25", seed_input: noise_seed).
    seed_node: NodeId | None = None
    lora_node: NodeId | None = None  # the LoraLoader; None: the workflow has no LoRA
    lora_name_input: InputName = "lora_name"
    lora_strength_inputs: tuple[InputName, ...] = ("strength_model", "strength_clip")
    lora_weight: LoraWeight = 1.0  # for adapters that set none
    # Whose images are the answer (a SaveImage node); None: the first with an image.
    output_node: NodeId | None = None
    # A probe says "busy" when more prompts than this wait in the server's queue.
    busy_queue: Annotated[int, Field(ge=0, le=10_000)] = 2
    # /history is polled first after poll_first_s, then at most every poll_max_s.
    poll_first_s: Annotated[float, Field(gt=0, le=60)] = 0.05
    poll_max_s: Annotated[float, Field(gt=0, le=60)] = 1.0

    _template: dict[str, Any] = PrivateAttr(default_factory=dict)
    _digest: str = PrivateAttr(default="")

    @field_validator("workflow")
    @classmethod
    def _resolve(cls, path: str, info: ValidationInfo) -> str:
        base = Path((info.context or {}).get("base_dir", "."))
        return str((base / path).resolve())

    @model_validator(mode="after")
    def _load(self) -> ComfyuiSettings:
        template = read_workflow(Path(self.workflow))
        for node, inputs in self.filled().items():
            if node not in template:
                raise ValueError(f"node {node!r} is not in the workflow {self.workflow}")
            have = template[node].get("inputs", {})
            for name in inputs:
                if name not in have:
                    kind = template[node].get("class_type", "?")
                    raise ValueError(
                        f"node {node!r} ({kind}) of the workflow has no input {name!r}"
                    )
        if self.output_node is not None and self.output_node not in template:
            raise ValueError(f"node {self.output_node!r} is not in the workflow {self.workflow}")
        self._template = template
        canonical = json.dumps(template, sort_keys=True, separators=(",", ":"))
        self._digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
        return self

    def filled(self) -> dict[str, list[str]]:
        """Node id -> the inputs of it we fill in."""
        nodes: dict[str, list[str]] = {}
        nodes.setdefault(self.prompt_node, []).append(self.prompt_input)
        nodes.setdefault(self.sampler_node, []).extend((self.steps_input, self.cfg_input))
        nodes.setdefault(self.seed_node or self.sampler_node, []).append(self.seed_input)
        if self.lora_node is not None:
            lora = (self.lora_name_input, *self.lora_strength_inputs)
            nodes.setdefault(self.lora_node, []).extend(lora)
        return nodes

    @property
    def template(self) -> dict[str, Any]:
        """The workflow as read at load (copy it before filling it in)."""
        return self._template

    @property
    def digest(self) -> str:
        """sha256 prefix of the workflow's content: part of the cache key's variant."""
        return self._digest


def read_workflow(path: Path) -> dict[str, Any]:
    """An API-format workflow: {node id: {"class_type": str, "inputs": {...}}}."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read the workflow {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError(f"the workflow {path} is not JSON") from None
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise ValueError(f"the workflow {path} is in the UI format: export it with 'Save (API)'")
    if (
        not isinstance(data, dict)
        or not data
        or not all(
            isinstance(node, dict)
            and isinstance(node.get("class_type"), str)
            and isinstance(node.get("inputs"), dict)
            for node in data.values()
        )
    ):
        raise ValueError(
            f"the workflow {path} is not an API-format workflow "
            "({node id: {class_type, inputs}})"
        )
    return data


# -- end comfyui and cog -----------------------------------------------------------------


class PoolSpec(_Frozen):
    protocol: ProtocolName = "friendli-container"
    workers: tuple[WorkerSpec, ...] = ()  # a static list, or...
    discover: DiscoverSpec | None = None  # ...workers from DNS; exactly one of the two
    # The overall deadline of one request in this pool: queue wait and every try.
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = 120.0
    # One try's limit; None: a try may use all that is left of timeout_s.
    per_try_timeout_s: Annotated[float, Field(gt=0, le=3600)] | None = None
    connect_timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    # Admission: requests beyond the free slots wait in a FIFO queue this long, at
    # most this many; past either they get 503 with Retry-After.
    max_queue: Annotated[int, Field(ge=0, le=100_000)] = 100
    queue_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    # Affinity: each worker is taken to hold its last `warm_adapters` adapters (its
    # LoRA cache); loading a cold one costs about adapter_load_s. A request waits for a
    # warm worker only while that is expected to cost less than a load.
    warm_adapters: Annotated[int, Field(ge=0, le=1000)] = 4
    adapter_load_s: Annotated[float, Field(ge=0, le=600)] = 1.0
    # Fair sharing (gateway/fairness.py): a batch request that has waited this long is
    # served as interactive from then on, so batch never starves.
    batch_aging_s: Annotated[float, Field(gt=0, le=86400)] = 60.0
    # A team that used less than its share (or none) may run ahead of the others by at
    # most this many GPU-seconds per unit of weight: room for a light team's bursts.
    share_credit_s: Annotated[float, Field(ge=0, le=86400)] = 60.0
    # How far affinity may hold a request back (passed over, or waiting for a warm
    # worker). Once its turn has come (the head, or fewer waiting than slots), for
    # adapter_load_s x waiters per slot (at least 1) at most, and never more than
    # affinity_wait_max_s (None: 4 x adapter_load_s). Anywhere in the queue, for at most
    # affinity_overtakes waiters behind it served first (None: 6 per slot in service).
    # A free slot looks at most affinity_lookahead waiters past the head of the queue.
    affinity_wait_max_s: Annotated[float, Field(ge=0, le=3600)] | None = None
    affinity_overtakes: Annotated[int, Field(ge=0, le=100_000)] | None = None
    affinity_lookahead: Annotated[int, Field(ge=0, le=1000)] = 32
    # Placement: the pool decides on which workers each adapter should be warm, from
    # its share of requests, counted with this half-life (gateway/placement.py).
    placement: bool = True
    placement_half_life_s: Annotated[float, Field(gt=0, le=86_400)] = 120.0
    # Retries go to another worker. Failures before a worker accepted the job
    # (connect error, reset before a response, 429, 503) are retried up to
    # max_retries; failures after it (500/502/504, a timeout, a cut-off body, a 200
    # without an image or over max_response_bytes: "bad_answer") only when listed in
    # retry_on, and at most max_accepted_retries times: a GPU generation is expensive.
    max_retries: Annotated[int, Field(ge=0, le=10)] = 2
    retry_on: tuple[RetryOn, ...] = ("5xx", "timeout", "truncated", "bad_answer")
    max_accepted_retries: Annotated[int, Field(ge=0, le=10)] = 1
    # Envoy's retry budget: retries in progress at most this share of the pool's
    # active requests, but always at least retry_budget_min.
    retry_budget_percent: Annotated[float, Field(ge=0, le=100)] = 20.0
    retry_budget_min: Annotated[int, Field(ge=0, le=1000)] = 3
    health: HealthSpec = HealthSpec()
    # The most a worker's answer may weigh: a 1024px PNG in base64 is ~2 MB; more is
    # a broken worker, refused before it fills the gateway's memory.
    max_response_bytes: Annotated[int, Field(ge=1024, le=2**30)] = 32 * 2**20
    # The pool's own credentials for its workers (`Authorization: "Bearer ${TOKEN}"`),
    # sent with every request to them; kept out of repr so no log line shows them.
    headers: Mapping[HeaderName, HeaderValue] = Field(default_factory=dict, repr=False)
    # When the gateway re-encodes a worker's image for a client that asked for JPEG
    # (the worker answered PNG, say), at this quality (Pillow's scale; 95 is its top).
    jpeg_quality: Annotated[int, Field(ge=1, le=95)] = 90
    # One settings block per protocol (SETTINGS_BLOCKS); only the pool's own may be given.
    openai: OpenAIImagesSettings = OpenAIImagesSettings()
    a1111: A1111Settings = A1111Settings()
    comfyui: ComfyuiSettings | None = None  # required on a comfyui pool: its workflow
    cog: CogSettings = CogSettings()


class AdapterSpec(_Frozen):
    name: Name
    pool: Name
    upstream_model: Name | None = None  # the LoRA name on the workers; None = base model
    aliases: tuple[Name, ...] = ()
    default: bool = False
    ignore: tuple[Literal["guidance_scale"], ...] = ()  # inputs that never change the image
    revision: Annotated[str, Field(min_length=1, max_length=64)] = "1"
    # The LoRA's strength, for protocols that take one (LORA_WEIGHT_PROTOCOLS); None:
    # the pool's default.
    lora_weight: Annotated[float, Field(ge=-10, le=10, allow_inf_nan=False)] | None = None
    # Does its server draw the same image for the same seed? None: what the pool's
    # protocol says (gateway.protocols.deterministic). Results of an adapter that is not
    # deterministic are not cached (a cached image would not be "the" image of that
    # seed), unless cache_nondeterministic says to cache them anyway.
    deterministic: bool | None = None
    cache_nondeterministic: bool = False


Seconds = Annotated[float, Field(gt=0, le=3600)]


class LimitsSpec(_Frozen):
    """What one request may weigh, and how long its client may take to send it. A
    prompt is text: 64 KiB of JSON is plenty. All but `max_prompt_chars` are read
    once, at start (the server's bounds: gateway/server.py)."""

    max_body_bytes: Annotated[int, Field(ge=256, le=64 * 2**20)] = 64 * 2**10
    max_prompt_chars: Annotated[int, Field(ge=1, le=2**20)] = 4000
    max_header_bytes: Annotated[int, Field(ge=1024, le=2**20)] = 16 * 2**10
    head_timeout_s: Seconds = 10.0  # request line + headers, from the first byte
    body_timeout_s: Seconds = 30.0  # the whole body, from the end of the head
    body_idle_s: Seconds = 10.0  # the longest gap between two reads of a body
    keepalive_idle_s: Seconds = 5.0  # an idle keep-alive connection (uvicorn's default)
    # Open client connections per process; None: sized from the fd limit at start.
    max_connections: Annotated[int, Field(ge=1, le=10**7)] | None = None
    # Hosts whose URLs a client may give as control images (exact names, any case).
    # Empty: only base64 images. The gateway never fetches a URL (no SSRF from it): it
    # forwards the URL to a friendli-container worker, which does; so list only hosts
    # that the workers may reach on a client's behalf.
    control_image_url_hosts: tuple[Annotated[str, Field(min_length=1, max_length=253)], ...] = ()

    @cached_property
    def url_hosts(self) -> frozenset[str]:
        return frozenset(host.lower() for host in self.control_image_url_hosts)


class RateSpec(_Frozen):
    per_s: Annotated[float, Field(gt=0, le=1e6)]
    burst: Annotated[int, Field(ge=1, le=10**6)] | None = None  # None: one second's worth

    @property
    def capacity(self) -> int:
        return self.burst if self.burst is not None else max(1, math.ceil(self.per_s))


class KeySpec(_Frozen):
    """One API key: known by its name everywhere (logs, errors); its sha256 only here."""

    name: Name
    sha256: Sha256 = Field(repr=False)
    adapters: tuple[Name, ...] | None = None  # adapter names it may use; None: all
    rate: RateSpec | None = None
    max_concurrent: Annotated[int, Field(ge=1, le=10**6)] | None = None
    # Fair sharing of GPU pools: whose share it uses (None: a team of its own, by its
    # name), its requests' priority, and the deadline given to requests that send no
    # X-Request-Deadline-Ms (None: no deadline).
    team: Name | None = None
    weight: Annotated[float, Field(gt=0, le=1000)] | None = None  # a key without a team
    priority: Priority = "interactive"
    deadline_ms: Annotated[int, Field(ge=1, le=3_600_000)] | None = None

    # cached_property, not PrivateAttr: these are read on every keyed request, and a
    # pydantic private attribute costs ~2 us a read (it goes through __getattr__).
    @cached_property
    def allowed(self) -> frozenset[str] | None:
        return None if self.adapters is None else frozenset(self.adapters)

    def may_use(self, adapter: str) -> bool:
        allowed = self.allowed
        return allowed is None or adapter in allowed


class TeamSpec(_Frozen):
    """A team's share of every pool it uses, relative to the other teams waiting."""

    weight: Annotated[float, Field(gt=0, le=1000)] = 1.0


class AuthSpec(_Frozen):
    keys: Annotated[tuple[KeySpec, ...], Field(min_length=1)]
    metrics_key_sha256: Sha256 | None = Field(default=None, repr=False)
    admin_key_sha256: Sha256 | None = Field(default=None, repr=False)
    # Where per-key rate limits are shared among replicas (may hold a password).
    redis_url: Annotated[str, AfterValidator(_expand_env), AfterValidator(_redis_url)] | None = (
        Field(default=None, repr=False)
    )
    # Each rate-limit call to Redis is cut off after this; a slow Redis then falls back
    # to per-process limits (logged, retried later) instead of holding the request.
    redis_timeout_ms: Annotated[float, Field(gt=0, le=60_000)] = 250.0

    @cached_property
    def by_hash(self) -> dict[str, KeySpec]:
        return {key.sha256: key for key in self.keys}

    def key_for(self, digest: str) -> KeySpec | None:
        """The key whose sha256 is `digest` (lower-case hex), if any."""
        return self.by_hash.get(digest)


Millis = Annotated[float, Field(gt=0, le=60_000)]


class CacheSpec(_Frozen):
    """The result cache: Redis when `url` is set (or GATEWAY_REDIS_URL), else a bounded
    in-process LRU. Every Redis call is cut off at `connect_timeout_ms` + `timeout_ms`;
    `failure_threshold` failures in a row bypass the cache for `cooldown_s`."""

    enabled: bool = True
    url: Annotated[str, AfterValidator(_redis_url)] | None = Field(None, repr=False)  # a secret
    cluster: bool = False  # Redis Cluster, through redis-py's RedisCluster
    namespace: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")] = (
        "gateway"
    )
    ttl_s: Annotated[float, Field(ge=0.01, le=365 * 86400)] = 86400.0
    max_entry_bytes: Annotated[int, Field(ge=1)] = 8 * 2**20
    memory_max_bytes: Annotated[int, Field(ge=0)] = 256 * 2**20  # the in-process LRU's bound
    timeout_ms: Millis = 50.0
    connect_timeout_ms: Millis = 50.0
    failure_threshold: Annotated[int, Field(ge=1, le=1000)] = 3
    cooldown_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    # Coalescing across replicas: the first to miss holds `lock_ttl_ms` (renewed while
    # it generates; a crashed holder's lock lapses), the others wait at most `lock_wait_s`.
    lock_ttl_ms: Annotated[int, Field(ge=100, le=600_000)] = 5000
    lock_wait_s: Annotated[float, Field(ge=0, le=3600)] = 30.0

    @model_validator(mode="after")
    def _cluster_over_tcp(self) -> CacheSpec:
        if self.cluster and self.url is not None and self.url.startswith("unix:"):
            raise ValueError("cluster: true needs a redis:// or rediss:// url")
        return self


class CoordinationSpec(_Frozen):
    """Several gateway processes sharing the pools' workers through Redis
    (gateway.coordination): one dispatcher per pool, elected. On when a Redis URL is
    set here or for the cache (or GATEWAY_REDIS_URL) and `enabled`; read at start."""

    enabled: bool = True
    url: Annotated[str, AfterValidator(_redis_url)] | None = Field(None, repr=False)  # a secret
    cluster: bool | None = None  # None: as the cache's `cluster` when `url` is the cache's
    # How long a silent process keeps its slots and a silent dispatcher its election:
    # a crashed process's slots come back within this; heartbeats run every third of it.
    lease_s: Annotated[float, Field(ge=0.3, le=600)] = 10.0
    timeout_ms: Millis = 500.0  # each Redis call; past it the process runs alone

    @model_validator(mode="after")
    def _cluster_over_tcp(self) -> CoordinationSpec:
        if self.cluster and self.url is not None and self.url.startswith("unix:"):
            raise ValueError("cluster: true needs a redis:// or rediss:// url")
        return self


class Registry(_Frozen):
    pools: Mapping[Name, PoolSpec]
    adapters: Annotated[tuple[AdapterSpec, ...], Field(min_length=1)]
    cache: CacheSpec = CacheSpec()
    coordination: CoordinationSpec = CoordinationSpec()
    log_prompts: bool = False  # prompts in the access log: off, they may be private
    limits: LimitsSpec = LimitsSpec()
    auth: AuthSpec | None = None  # None: the gateway is open to every caller
    teams: Mapping[Name, TeamSpec] = Field(default_factory=dict)  # weights; unlisted: 1
    digest: str = ""  # sha256 prefix of the file's text: which registry is serving

    # cached_property, not PrivateAttr: read on every request, and a pydantic private
    # attribute costs ~2 us a read (it goes through __getattr__).
    @cached_property
    def routes(self) -> dict[str, AdapterSpec]:
        """Every name and alias -> its adapter."""
        return {key: a for a in self.adapters for key in (a.name, *a.aliases)}

    @cached_property
    def default_adapter(self) -> AdapterSpec | None:
        return next((a for a in self.adapters if a.default), None)

    def resolve(self, model: str | None) -> AdapterSpec:
        """`model` -> adapter, by name or alias; None -> the default adapter."""
        adapter = self.default_adapter if model is None else self.routes.get(model)
        if adapter is None:
            raise UnknownModel(model, self.model_names())
        return adapter

    def model_names(self) -> list[str]:
        return [adapter.name for adapter in self.adapters]

    def pool_of(self, adapter: AdapterSpec) -> PoolSpec:
        return self.pools[adapter.pool]

    def team_of(self, key: KeySpec | None) -> str:
        """The team whose share `key`'s requests use: its `team`, else its name."""
        if key is None:
            return DEFAULT_TEAM
        return key.team if key.team is not None else key.name

    def team_weight(self, team: str) -> float:
        spec = self.teams.get(team)
        return 1.0 if spec is None else spec.weight

    def weight_of(self, key: KeySpec | None) -> float:
        """The weight `key`'s requests carry: its own (a key without a team), else
        its team's."""
        if key is not None and key.weight is not None:
            return key.weight
        return self.team_weight(self.team_of(key))

    @cached_property
    def team_names(self) -> frozenset[str]:
        """Every team a request can belong to: the bounded set of metric labels."""
        keys = self.auth.keys if self.auth is not None else ()
        return frozenset({DEFAULT_TEAM, *self.teams, *(self.team_of(key) for key in keys)})

    def team_label(self, team: str) -> str:
        """`team` as a metric label: one of `team_names`, else "other"."""
        return team if team in self.team_names else OTHER_TEAM

    def coordination_redis(self) -> tuple[str, bool] | None:
        """The Redis that replicas coordinate through (its URL, whether a cluster), or
        None: coordination off (disabled, or no Redis anywhere in the registry)."""
        spec = self.coordination
        if not spec.enabled:
            return None
        if spec.url is not None:
            return spec.url, bool(spec.cluster)
        if self.cache.url is None:
            return None
        return self.cache.url, self.cache.cluster if spec.cluster is None else spec.cluster

    @cached_property
    def worker_slots(self) -> int:
        """Generations every listed worker can run at once, summed over the pools."""
        return sum(w.max_concurrency for pool in self.pools.values() for w in pool.workers)


def with_redis_url(spec: CacheSpec, url: str | None, *, source: str) -> CacheSpec:
    """`spec` with its url replaced by `url` (GATEWAY_REDIS_URL), validated the same way."""
    if not url:
        return spec
    try:
        return CacheSpec.model_validate({**spec.model_dump(), "url": url})
    except ValidationError as exc:
        raise ConfigError(f"{source}: {exc.errors(include_url=False)[0]['msg']}") from exc


def load_registry(path: str | Path, *, env: Mapping[str, str] | None = None) -> Registry:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{path}: cannot read: {reason or exc}") from exc
    return parse_registry(text, source=str(path), env=env)


def parse_registry(
    text: str, *, source: str = "<adapters.yaml>", env: Mapping[str, str] | None = None
) -> Registry:
    """`env` (default: the process environment) fills `${NAME}` references."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None:
            _refuse_duplicate_keys(root, source)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    except RecursionError as exc:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{source}: nested too deeply") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with 'pools' and 'adapters'")
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    context = {"env": os.environ if env is None else env, "base_dir": _base_dir(source)}
    try:
        registry = Registry.model_validate({**data, "digest": digest}, context=context)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        raise ConfigError(_where(source, root, err["loc"], err["msg"])) from exc
    for loc, msg in _cross_check(registry):
        raise ConfigError(_where(source, root, loc, msg))
    return registry


def _base_dir(source: str) -> Path:
    """Where paths in the registry (a comfyui workflow) are relative to: the file's
    folder, or the working directory for text that came from no file."""
    path = Path(source)
    return path.resolve().parent if path.is_file() else Path.cwd()


def _cross_check(registry: Registry) -> Iterator[tuple[Loc, str]]:
    """The rules that span keys: names unique, pools exist, one default at most."""
    seen: dict[str, str] = {}
    defaults: list[str] = []
    for i, adapter in enumerate(registry.adapters):
        if adapter.pool not in registry.pools:
            known = ", ".join(sorted(registry.pools))
            yield ("adapters", i, "pool"), f"unknown pool {adapter.pool!r} (pools: {known})"
        for j, key in enumerate((adapter.name, *adapter.aliases)):
            loc: Loc = ("adapters", i, "name") if j == 0 else ("adapters", i, "aliases", j - 1)
            if key in seen:
                yield loc, f"{key!r} is already used by {seen[key]}"
            seen[key] = f"adapter {adapter.name!r}" if j == 0 else f"an alias of {adapter.name!r}"
        yield from _check_adapter_for_pool(registry, i, adapter)
        yield from _check_comfyui_cog_adapter(registry, i, adapter)  # h-proto2
        if adapter.default:
            defaults.append(adapter.name)
            if len(defaults) > 1:
                both = f"{defaults[0]!r} and {adapter.name!r}"
                yield ("adapters", i, "default"), f"two default adapters: {both}"
    for name, pool in registry.pools.items():
        for block, protocol in SETTINGS_BLOCKS.items():
            # A block left at its defaults does nothing anywhere: a registry dumped and
            # read again (every block written out) must load.
            settings = getattr(pool, block)
            if pool.protocol != protocol and settings != type(settings)():
                msg = f"settings for {protocol}, but this pool speaks {pool.protocol}"
                yield ("pools", name, block), msg
        if pool.protocol == "comfyui" and pool.comfyui is None:  # h-proto2
            yield ("pools", name), "a comfyui pool needs a 'comfyui' block with its workflow"
        if bool(pool.workers) == (pool.discover is not None):
            yield ("pools", name), "give either a 'workers' list or 'discover', not both or none"
        urls = [worker.url for worker in pool.workers]
        for k, url in enumerate(urls):
            if url in urls[:k]:
                yield ("pools", name, "workers", k, "url"), f"worker {url!r} is listed twice"
    if registry.auth is not None:
        yield from _check_auth(registry.auth, registry.model_names())
        yield from _check_teams(registry.auth, registry.teams)


def _check_adapter_for_pool(
    registry: Registry, i: int, adapter: AdapterSpec
) -> Iterator[tuple[Loc, str]]:
    pool = registry.pools.get(adapter.pool)
    if pool is None:
        return
    name = adapter.upstream_model
    if pool.protocol == "a1111" and name is not None and ":" in name:
        # <lora:NAME:WEIGHT> is split at colons: such a name would be read as NAME:te.
        msg = f"pool {adapter.pool!r} speaks a1111, whose LoRA tags cannot hold a ':'"
        yield ("adapters", i, "upstream_model"), msg
    if adapter.lora_weight is None:
        return
    if pool.protocol not in LORA_WEIGHT_PROTOCOLS:
        msg = f"pool {adapter.pool!r} speaks {pool.protocol}, which takes no LoRA weight"
        yield ("adapters", i, "lora_weight"), msg
    elif adapter.upstream_model is None:
        msg = "a LoRA weight needs the LoRA's name: set upstream_model"
        yield ("adapters", i, "lora_weight"), msg


# -- comfyui and cog --
def _check_comfyui_cog_adapter(
    registry: Registry, i: int, adapter: AdapterSpec
) -> Iterator[tuple[Loc, str]]:
    """An adapter with a LoRA (upstream_model) needs a place to put it on its pool."""
    pool = registry.pools.get(adapter.pool)
    if pool is None or adapter.upstream_model is None:
        return
    if pool.protocol == "comfyui" and pool.comfyui is not None and pool.comfyui.lora_node is None:
        msg = f"pool {adapter.pool!r} has no lora_node in its workflow for this LoRA"
        yield ("adapters", i, "upstream_model"), msg
    if pool.protocol == "cog" and pool.cog.adapter_input is None:
        msg = (
            f"pool {adapter.pool!r} (cog) has no adapter_input: give it one, or serve this "
            "adapter from an image of its own (a pool without upstream_model)"
        )
        yield ("adapters", i, "upstream_model"), msg


# -- end comfyui and cog --


def _check_auth(auth: AuthSpec, adapters: list[str]) -> Iterator[tuple[Loc, str]]:
    """Key names and hashes unique; a key's adapters exist (by name, not alias)."""
    names: set[str] = set()
    owner: dict[str, str] = {}  # digest -> who holds it, for the message
    for i, key in enumerate(auth.keys):
        if key.name in names:
            yield ("auth", "keys", i, "name"), f"key name {key.name!r} is used twice"
        names.add(key.name)
        for j, adapter in enumerate(key.adapters or ()):
            if adapter not in adapters:
                known = ", ".join(sorted(adapters))
                msg = f"unknown adapter {adapter!r} (adapter names: {known})"
                yield ("auth", "keys", i, "adapters", j), msg
        if key.sha256 == _EMPTY_SHA256:
            yield ("auth", "keys", i, "sha256"), "that is the hash of an empty key"
        if key.sha256 in owner:
            yield ("auth", "keys", i, "sha256"), f"same key hash as {owner[key.sha256]}"
        owner[key.sha256] = f"key {key.name!r}"
    for field in ("metrics_key_sha256", "admin_key_sha256"):
        digest = getattr(auth, field)
        if digest is not None and digest in owner:
            yield ("auth", field), f"same key hash as {owner[digest]}: give it its own key"
        if digest is not None:
            owner[digest] = field


def _check_teams(auth: AuthSpec, teams: Mapping[str, TeamSpec]) -> Iterator[tuple[Loc, str]]:
    """A key's weight is its team's when it has one; with a `teams` section, a key's
    team must be one of it (a typo would otherwise give that key a team of its own at
    weight 1, silently)."""
    for i, key in enumerate(auth.keys):
        if key.team is not None and key.weight is not None:
            msg = f"a key of team {key.team!r} has its team's weight: set it under teams"
            yield ("auth", "keys", i, "weight"), msg
        if teams and key.team is not None and key.team not in teams:
            known = ", ".join(sorted(teams))
            yield ("auth", "keys", i, "team"), f"unknown team {key.team!r} (teams: {known})"


def _where(source: str, root: yaml.Node | None, loc: Loc, msg: str) -> str:
    # pydantic marks an error in a mapping's key with a "[key]" step: the key says it.
    key = ".".join(str(part) for part in loc if part not in ("digest", "[key]")) or "(top level)"
    line = _line_of(root, loc)
    at = f"{source}:{line}" if line else source
    return f"{at}: {key}: {msg}"


def _line_of(node: yaml.Node | None, loc: Loc) -> int | None:
    """The 1-based line of the deepest node of `loc` that exists in the file."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        child = _child(node, part)
        if child is None:
            break
        node, line = child, child.start_mark.line + 1
    return line


def _child(node: yaml.Node | None, part: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        return next((v for k, v in node.value if k.value == str(part)), None)
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        child: yaml.Node = node.value[part]
        return child
    return None


MAX_NODES = 100_000


def _refuse_duplicate_keys(root: yaml.Node, source: str) -> None:
    """YAML lets a later key silently replace an earlier one; a registry must not.

    The walk counts nodes as aliases expand them, so a file whose aliases multiply
    ("billion laughs") or refer to themselves is refused here, in bounded time,
    instead of hanging the loader.
    """
    stack, visited = [root], 0
    while stack:
        node = stack.pop()
        visited += 1
        if visited > MAX_NODES:
            raise ConfigError(f"{source}: more than {MAX_NODES} values once aliases expand")
        if isinstance(node, yaml.MappingNode):
            seen: set[object] = set()
            for key, _ in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else id(key)
                if name in seen:
                    line = key.start_mark.line + 1
                    raise ConfigError(f"{source}:{line}: {name}: duplicate key")
                seen.add(name)
            stack.extend(value for _, value in reversed(node.value))  # in file order
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(reversed(node.value))
