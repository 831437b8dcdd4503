"""Replicate Cog: `POST /predictions {"input": {...}}`, answered when the prediction ends.

The request is synchronous (no `Prefer: respond-async`, no webhook), so one exchange
is the whole try: Cog answers when `run()` returns, with `{"status": "succeeded",
"output": "data:image/png;base64,..."}` (a list of them for models that return a list:
the first is ours). The input names are the pool's (`CogSettings`): every model names
its inputs as it likes. Which Cog answers what (docs/http.md and, before 0.17,
python/cog/server/http.py; since, crates/coglet/src/transport/http/routes.rs):

    200 {"status": "succeeded", "output": ...}     the image, as a data URL
    200 {"status": "failed", "error": ...}         run() raised: Cause.JOB_FAILED (the
                                                   model's words are not shown: they
                                                   may name files and devices; they
                                                   are logged, for the operators)
    409 {"error": "At capacity ...", ...}          every slot in use: Cause.BUSY
    422 {"detail": [{"loc", "msg", "type"}]}       bad input: the client's 422
    503 {"error": ..., "status": "failed"}         setup not done: Cause.HTTP_503

An output that is an http(s) URL (a server started with `--upload-url`) is refused as
a bad answer, never fetched: the gateway reaches its workers and nothing else.

`GET /health-check` always answers 200; its `status` says READY (ok), BUSY (ok, full),
or STARTING, SETUP_FAILED, DEFUNCT, UNHEALTHY (down).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp

from gateway.causes import Cause
from gateway.errors import UpstreamError
from gateway.protocols.call import Call, Probe
from gateway.protocols.http import post_json, probe_get, refusal
from gateway.protocols.imaging import to_answer
from gateway.registry import AdapterSpec, CogSettings, PoolSpec
from gateway.schema import WorkerRequest

log = logging.getLogger(__name__)

_HEALTH: Mapping[str, Probe] = {"READY": "ok", "BUSY": "busy"}
# A failed prediction's `error` as logged: str(exception) of the model's run(), which
# can be a whole traceback or a model's dump of its inputs; this much is the reason.
MAX_LOGGED_ERROR = 1000


class Cog:
    name = "cog"
    path = "/predictions"
    health_path = "/health-check"
    takes_control_images = False
    deterministic_seeds = True

    async def generate(self, call: Call) -> bytes:
        settings = call.pool.cog
        answer = await post_json(
            call.session,
            call.base_url + self.path,
            prediction(call.job, call.adapter, settings),
            worker=call.worker,
            timeout=call.timeout,
            headers=call.headers,
            max_bytes=call.max_bytes,
        )
        if answer.status == 409:
            raise UpstreamError(Cause.BUSY, f"worker {call.worker}")
        if answer.status != 200:
            raise refusal(answer, call.worker)
        encoded = output_image(answer.body, call.worker)
        return await to_answer(
            encoded,
            call.job.response_format,
            jpeg_quality=call.pool.jpeg_quality,
            worker=call.worker,
        )

    async def probe(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        timeout: aiohttp.ClientTimeout,
        headers: Mapping[str, str],
        pool: PoolSpec,
    ) -> Probe:
        answer = await probe_get(
            session, base_url + self.health_path, timeout=timeout, headers=headers, pool=pool
        )
        return health(answer.body) if answer is not None and answer.status == 200 else "down"

    def honours_seed(self, pool: PoolSpec) -> bool:
        return self.deterministic_seeds and pool.cog.seed_input is not None

    def selection(self, adapter: AdapterSpec, pool: PoolSpec) -> str:
        settings = pool.cog
        if adapter.upstream_model is None or settings.adapter_input is None:
            return "the image's own weights (no adapter input)"
        chosen = f"{settings.adapter_input}={adapter.upstream_model}"
        if settings.lora_scale_input is not None:
            chosen += f", {settings.lora_scale_input}={lora_weight(adapter, settings):g}"
        return chosen

    def variant(self, adapter: AdapterSpec, pool: PoolSpec) -> str | None:
        # Every input mapping and fixed input shapes the picture, and the LoRA weight.
        settings = pool.cog.model_dump(mode="json")
        text = json.dumps([settings, lora_weight(adapter, pool.cog)], sort_keys=True)
        return "cog:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def lora_weight(adapter: AdapterSpec, settings: CogSettings) -> float:
    return settings.lora_weight if adapter.lora_weight is None else adapter.lora_weight


def prediction(job: WorkerRequest, adapter: AdapterSpec, settings: CogSettings) -> dict[str, Any]:
    """The body of `POST /predictions`: our six fields under the model's input names."""
    inputs: dict[str, Any] = dict(settings.inputs)
    inputs[settings.prompt_input] = job.prompt
    optional = (
        (settings.steps_input, job.num_inference_steps),
        (settings.guidance_input, job.guidance_scale),
        (settings.seed_input, job.seed),  # always explicit: never the model's "random"
        (
            settings.output_format_input,
            settings.jpeg_value if job.response_format == "jpeg" else settings.png_value,
        ),
    )
    for name, value in optional:
        if name is not None:
            inputs[name] = value
    if settings.adapter_input is not None and job.model is not None:
        inputs[settings.adapter_input] = job.model
        if settings.lora_scale_input is not None:
            inputs[settings.lora_scale_input] = lora_weight(adapter, settings)
    return {"input": inputs}


def output_image(body: bytes, worker: str) -> bytes:
    """The base64 text of the image in a prediction's 200 answer; a failed prediction
    is Cause.JOB_FAILED, anything else without a data URL Cause.BAD_ANSWER."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise _bad(worker, "with a body that is not JSON") from None
    if not isinstance(data, dict):
        raise _bad(worker, "with JSON that is not a prediction")
    status = data.get("status")
    if status in ("failed", "canceled"):
        _log_failure(worker, str(status), data.get("error"))
        raise UpstreamError(Cause.JOB_FAILED, f"worker {worker}", f"prediction {status}")
    if status != "succeeded":
        raise _bad(worker, f"with a prediction in status {str(status)[:20]!r}")
    output = data.get("output")
    if isinstance(output, list):
        output = output[0] if output else None
    if not isinstance(output, str):
        raise _bad(worker, f"without an image (output: {type(output).__name__})")
    if output.startswith(("http://", "https://")):
        raise _bad(worker, "with a URL, not a data URL (a server started with --upload-url?)")
    head, comma, payload = output.partition(",")
    if not (head.startswith("data:") and head.endswith(";base64") and comma):
        raise _bad(worker, "with an output that is not a base64 data URL")
    return payload.encode("ascii", "replace")


def _log_failure(worker: str, status: str, error: Any) -> None:
    """Why the model failed, for the operators (the client's detail never has it): on
    one line, at most MAX_LOGGED_ERROR characters."""
    text = " ".join(str(error).split()) if error else "(no error text)"
    if len(text) > MAX_LOGGED_ERROR:
        text = text[:MAX_LOGGED_ERROR] + f"... ({len(text) - MAX_LOGGED_ERROR} more characters)"
    fields = {"worker": worker, "status": status}
    log.warning("cog: prediction %s: %s", status, text, extra={"fields": fields})


def health(body: bytes) -> Probe:
    """`GET /health-check`'s `status` as a probe's word."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return "down"
    status = data.get("status") if isinstance(data, dict) else None
    return _HEALTH.get(status, "down") if isinstance(status, str) else "down"


def _bad(worker: str, what: str) -> UpstreamError:
    return UpstreamError(Cause.BAD_ANSWER, f"worker {worker}", f"answered 200 {what}")
