"""OpenAI's Images API as image servers speak it: vLLM-Omni, SGLang diffusion, LocalAI,
NVIDIA NIM, OpenAI itself. docs/protocols.md cites what each server accepts.

    POST /v1/images/generations
    {"prompt": ..., "n": 1, "response_format": "b64_json", "size": "1024x1024",
     "model": <served model name>, "num_inference_steps": 20, "guidance_scale": 7.5,
     "seed": 7, "output_format": "jpeg", ...extra_fields}
    -> 200 {"created": ..., "data": [{"b64_json": "<base64 image>", ...}]}

The vendor fields' names come from the pool's `openai:` block (null: not sent). The
adapter is chosen by `model`: the adapter's upstream_model (its served model name), else
the block's `model`, else no `model` field. The image passes through when it is in the
format the client asked, and is re-encoded otherwise (gateway.protocols.imaging).

Seeds: servers differ on a seed of 0 (LocalAI's diffusers backend draws a random one
for it; vLLM-Omni and SGLang use it), so a seed of 0 is sent as 2**32-1: the same image
each time for seed 0, never a random one. -1 is never sent (seeds are 0..2**32-1).

Errors: OpenAI's `{"error": {"message"}}` and FastAPI's `{"detail"}` are read into the
detail; a 4xx but 408/429 is the client's input (a prompt the server refuses); 429 and
503 with Retry-After are busy (retried on another worker, no ejection).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import aiohttp

from gateway.protocols.call import Call, Probe
from gateway.protocols.http import post_json, probe_get, refusal
from gateway.protocols.imaging import bad_answer, parse_json, string_at, to_answer
from gateway.registry import AdapterSpec, OpenAIImagesSettings, PoolSpec
from gateway.schema import MAX_SEED, WorkerRequest

_B64_JSON = re.compile(rb'"b64_json"[ \t\r\n]*:[ \t\r\n]*"')
_FORMATS = {"jpeg": "jpeg", "raw": "png"}


class OpenAIImages:
    name = "openai-images"
    takes_control_images = False
    deterministic_seeds = True

    async def generate(self, call: Call) -> bytes:
        settings = call.pool.openai
        answer = await post_json(
            call.session,
            call.base_url + settings.path,
            request_body(call.job, settings),
            worker=call.worker,
            timeout=call.timeout,
            headers=call.headers,
            max_bytes=call.max_bytes,
        )
        if answer.status != 200:
            raise refusal(answer, call.worker)
        encoded = image_b64(answer.body, call.worker)
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
        """The pool's health_path: 200 ok; 429, or 503 with Retry-After, busy; else down."""
        answer = await probe_get(
            session, base_url + pool.openai.health_path, timeout=timeout, headers=headers, pool=pool
        )
        if answer is None:
            return "down"
        if answer.status == 200:
            return "ok"
        busy = answer.status == 429 or (answer.status == 503 and answer.retry_after)
        return "busy" if busy else "down"

    def honours_seed(self, pool: PoolSpec) -> bool:
        return pool.openai.seed_field is not None

    def selection(self, adapter: AdapterSpec, pool: PoolSpec) -> str:
        model = served_model(adapter.upstream_model, pool.openai)
        return f"model={model}" if model is not None else "no model field (the server's own)"

    def variant(self, adapter: AdapterSpec, pool: PoolSpec) -> str | None:
        # Size, field names and extra fields shape the image; the paths do not.
        shaping = pool.openai.model_dump_json(exclude={"path", "health_path"})
        return f"{self.name}:{shaping}"


def served_model(upstream_model: str | None, settings: OpenAIImagesSettings) -> str | None:
    return upstream_model if upstream_model is not None else settings.model


def request_body(job: WorkerRequest, settings: OpenAIImagesSettings) -> dict[str, Any]:
    """The request for `job` on a server set up as `settings` says."""
    body: dict[str, Any] = {"prompt": job.prompt, "n": 1, "response_format": "b64_json"}
    if settings.size is not None:
        body["size"] = settings.size
    if (model := served_model(job.model, settings)) is not None:
        body["model"] = model
    sent = {
        settings.steps_field: job.num_inference_steps,
        settings.guidance_field: job.guidance_scale,
        settings.seed_field: job.seed or MAX_SEED,  # 0 is "random" to some servers
        settings.format_field: _FORMATS[job.response_format],
    }
    body.update((name, value) for name, value in sent.items() if name is not None)
    body.update(settings.extra_fields)
    return body


def image_b64(body: bytes, worker: str) -> bytes:
    """The base64 text of `data[0].b64_json`; Cause.BAD_ANSWER when there is none."""
    encoded = string_at(body, _B64_JSON)
    if encoded is not None:
        return encoded
    data = parse_json(body, worker)
    items = data.get("data") if isinstance(data, dict) else None
    first = items[0] if isinstance(items, list) and items else None
    if not isinstance(first, dict):
        raise bad_answer(worker, "without an image (no data[0])")
    image = first.get("b64_json")
    if not isinstance(image, str) or not image:
        what = "a URL, not b64_json" if first.get("url") else "no b64_json"
        raise bad_answer(worker, f"without an image (data[0] has {what})")
    try:
        return image.encode("ascii")
    except UnicodeEncodeError:
        raise bad_answer(worker, "with an image that is not base64 (non-ASCII text)") from None
