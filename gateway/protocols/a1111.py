"""AUTOMATIC1111's web UI API, which Forge and SD.Next serve too (docs/protocols.md
cites the code this follows: modules/api/api.py and models.py).

    POST /sdapi/v1/txt2img
    {"prompt": "a red fox <lora:pixel-art:0.8>", "seed": 7, "steps": 20,
     "cfg_scale": 7.5, "width": 512, "height": 512, "sampler_name": "Euler",
     "batch_size": 1, "n_iter": 1, "send_images": true, "save_images": false, ...}
    -> 200 {"images": ["<base64 PNG>"], "parameters": {...}, "info": "<JSON text>"}

The adapter is a LoRA tag appended to the prompt, `<lora:NAME:WEIGHT>`: NAME its
upstream_model, WEIGHT its lora_weight or the pool's. A client's own extra-network tags
(`<lora:...>`, `<hypernet:...>`: A1111 reads any `<word:args>`) are refused with a 422:
they would load whatever LoRA the client names, past the registry and its API keys.

The server encodes images in its `samples_format` (PNG unless set otherwise) and writes
the generation parameters into them (prompt, model name and hash, its version): an
image of the format asked passes with that metadata gone, pixels untouched (a PNG's
text chunks blanked where they stand, in its base64: no decode of the whole image; a
JPEG's Exif and comment segments cut out); another is re-encoded (which drops it too).
A PNG whose chunks do not parse is a bad answer.

Seeds: -1 (and a missing seed) is "random" to A1111, 0 is a seed like any other, so
the request's seed (0..2**32-1) is sent as it is. A server runs one job at a time (its
queue lock): give its workers `max_concurrency: 1`. It has no health route; the probe
reads `GET /sdapi/v1/progress?skip_current_image=true` (skip: no in-progress preview is
encoded for it), "busy" while a job runs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any

import aiohttp

from gateway.answers import FORMATS
from gateway.errors import UpstreamError, UpstreamRejected
from gateway.protocols.call import Call, Probe
from gateway.protocols.http import post_json, probe_get, refusal
from gateway.protocols.imaging import (
    BadImage,
    b64_image_response,
    bad_answer,
    blank_png_text,
    parse_json,
    sniff_b64,
    string_at,
    strip_jpeg_metadata,
)
from gateway.registry import A1111Settings, AdapterSpec, PoolSpec
from gateway.schema import ResponseFormat, WorkerRequest

PATH = "/sdapi/v1/txt2img"
PROGRESS = "/sdapi/v1/progress?skip_current_image=true"
# A1111's modules/extra_networks.py: re_extra_net = re.compile(r"<(\w+):([^>]+)>")
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_FIRST_IMAGE = re.compile(rb'"images"[ \t\r\n]*:[ \t\r\n]*\[[ \t\r\n]*"')


class A1111:
    name = "a1111"
    takes_control_images = False
    deterministic_seeds = True

    async def generate(self, call: Call) -> bytes:
        job, pool = call.job, call.pool
        if (tag := EXTRA_NETWORK.search(job.prompt)) is not None:
            raise UpstreamRejected(
                422,
                f"prompt: extra-network tags such as <{tag.group(1)}:...> are not allowed; "
                "the adapter (model) chooses the LoRA",
            )
        answer = await post_json(
            call.session,
            call.base_url + PATH,
            request_body(job, call.adapter, pool.a1111),
            worker=call.worker,
            timeout=call.timeout,
            headers=call.headers,
            max_bytes=call.max_bytes,
        )
        if answer.status != 200:
            raise refusal(answer, call.worker)
        encoded = first_image(answer.body, call.worker)
        if sniff_b64(encoded) == "PNG" and job.response_format == "raw":
            # Blanking a PNG's text costs per chunk, not per byte: the loop can take it.
            return client_body(encoded, job.response_format, pool.jpeg_quality, call.worker)
        return await asyncio.to_thread(
            client_body, encoded, job.response_format, pool.jpeg_quality, call.worker
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
        """`/sdapi/v1/progress` answered 200: busy while a job runs, else ok."""
        answer = await probe_get(
            session, base_url + PROGRESS, timeout=timeout, headers=headers, pool=pool
        )
        if answer is None or answer.status != 200:
            return "down"
        try:
            state = parse_json(answer.body, "probe").get("state") or {}
            running = int(state.get("job_count") or 0) > 0
        except (UpstreamError, AttributeError, TypeError, ValueError):
            return "down"  # a 200 that is not A1111's progress: not the server we want
        return "busy" if running else "ok"

    def honours_seed(self, pool: PoolSpec) -> bool:
        return self.deterministic_seeds

    def selection(self, adapter: AdapterSpec, pool: PoolSpec) -> str:
        tag = lora_tag(adapter, pool.a1111)
        return f"prompt + {tag}" if tag else "no LoRA tag (the checkpoint alone)"

    def variant(self, adapter: AdapterSpec, pool: PoolSpec) -> str | None:
        # Sampler, size, negative prompt, extra fields and the LoRA's weight shape the
        # image: all of them, and nothing else, are in the key.
        return f"{self.name}:{pool.a1111.model_dump_json()}:{lora_tag(adapter, pool.a1111)}"


def lora_tag(adapter: AdapterSpec, settings: A1111Settings) -> str:
    if adapter.upstream_model is None:
        return ""
    weight = adapter.lora_weight if adapter.lora_weight is not None else settings.lora_weight
    return f"<lora:{adapter.upstream_model}:{weight:g}>"


def request_body(
    job: WorkerRequest, adapter: AdapterSpec, settings: A1111Settings
) -> dict[str, Any]:
    tag = lora_tag(adapter, settings)
    body: dict[str, Any] = {
        "prompt": f"{job.prompt} {tag}" if tag else job.prompt,
        "seed": job.seed,  # never -1: that is A1111's "random"
        "steps": job.num_inference_steps,
        "cfg_scale": job.guidance_scale,
        "width": settings.width,
        "height": settings.height,
        "sampler_name": settings.sampler_name,
        "batch_size": 1,
        "n_iter": 1,
        "send_images": True,
        "save_images": False,  # the server's disk is not ours to fill
    }
    if settings.scheduler is not None:
        body["scheduler"] = settings.scheduler
    if settings.negative_prompt is not None:
        body["negative_prompt"] = settings.negative_prompt
    body.update(settings.extra_fields)
    return body


def first_image(body: bytes, worker: str) -> bytes:
    """The base64 text of `images[0]`; Cause.BAD_ANSWER when there is none."""
    encoded = string_at(body, _FIRST_IMAGE)
    if encoded is not None:
        return encoded
    data = parse_json(body, worker)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not images or not isinstance(images[0], str):
        raise bad_answer(worker, "without an image (no images[0])")
    try:
        return images[0].encode("ascii")
    except UnicodeEncodeError:
        raise bad_answer(worker, "with an image that is not base64 (non-ASCII text)") from None


def client_body(
    encoded: bytes, response_format: ResponseFormat, jpeg_quality: int, worker: str
) -> bytes:
    """The client's body: the server's image without its metadata when it is in the
    format asked (a PNG's text chunks blanked in place, a JPEG's segments cut out),
    re-encoded otherwise (gateway.protocols.imaging)."""
    kind = sniff_b64(encoded)
    if kind == FORMATS[response_format].name == "PNG":
        try:
            encoded = blank_png_text(encoded)
        except BadImage as exc:
            raise bad_answer(worker, str(exc)) from None
    elif kind == FORMATS[response_format].name:
        try:
            image = base64.b64decode(encoded, validate=True)
        except binascii.Error as exc:
            raise bad_answer(worker, f"with an image that is not base64 ({exc})") from None
        encoded = base64.b64encode(strip_jpeg_metadata(image))
    return b64_image_response(encoded, response_format, jpeg_quality=jpeg_quality, worker=worker)
