"""openai-images: OpenAI's Images API as vLLM-Omni, SGLang diffusion and friends speak it.

Translation both ways (unit), full requests through a served gateway to the simulated
server of this protocol, errors and busy answers, probes, and the cache key."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from PIL import Image

from gateway.cache import cache_key
from gateway.causes import Cause
from gateway.errors import ConfigError, UpstreamError
from gateway.protocols import protocol_for
from gateway.protocols.openai_images import image_b64, request_body
from gateway.registry import AdapterSpec, OpenAIImagesSettings, PoolSpec, parse_registry
from gateway.schema import MAX_SEED, WorkerRequest
from gateway.testing import (
    answers,
    fake_worker,
    fake_workers,
    image_bytes,
    registry_yaml,
    served_gateway,
)
from tests.support import (
    body,
    generate,
    local_pipeline,
    make_registry,
    sim_workers,
    the_pool,
)

PATH = "/v1/images/generations"
NO_STORE = {"Cache-Control": "no-store"}


def job(**overrides: Any) -> WorkerRequest:
    fields: dict[str, Any] = {
        "prompt": "a red fox",
        "num_inference_steps": 20,
        "guidance_scale": 7.5,
        "model": None,
        "response_format": "jpeg",
        "seed": 7,
    }
    return WorkerRequest(**{**fields, **overrides})


# -- our request -> theirs ---------------------------------------------------------------


def test_the_request_by_default_is_what_vllm_omni_and_sglang_take() -> None:
    assert request_body(job(model="qwen-pixel"), OpenAIImagesSettings()) == {
        "prompt": "a red fox",
        "n": 1,
        "response_format": "b64_json",
        "size": "1024x1024",
        "model": "qwen-pixel",
        "num_inference_steps": 20,
        "guidance_scale": 7.5,
        "seed": 7,
        "output_format": "jpeg",
    }


def test_vendor_fields_are_renamed_or_left_out_as_the_pool_says() -> None:
    # LocalAI's name for steps; OpenAI itself takes no seed, guidance or format.
    settings = OpenAIImagesSettings(
        size=None,
        model="base-model",
        steps_field="step",
        guidance_field=None,
        seed_field=None,
        format_field=None,
        extra_fields={"negative_prompt": "blurry", "quality": "hd"},
    )
    assert request_body(job(response_format="raw"), settings) == {
        "prompt": "a red fox",
        "n": 1,
        "response_format": "b64_json",
        "model": "base-model",  # no upstream_model: the pool's model
        "step": 20,
        "negative_prompt": "blurry",
        "quality": "hd",
    }


def test_a_seed_of_zero_is_never_sent() -> None:
    # LocalAI's diffusers backend draws a random seed for 0; 2**32-1 stands in for it.
    assert request_body(job(seed=0), OpenAIImagesSettings())["seed"] == MAX_SEED
    assert request_body(job(seed=1), OpenAIImagesSettings())["seed"] == 1


# -- their answer -> ours ----------------------------------------------------------------

PNG = image_bytes("raw", side=16)
PNG_B64 = base64.b64encode(PNG).decode()

# vLLM-Omni's docs/serving/image_generation_api.md, "Response Format", with a real PNG
# where it writes "<base64-encoded PNG>".
VLLM_OMNI_EXAMPLE = (
    '{\n  "created": 1701234567,\n  "data": [\n    {\n'
    '      "b64_json": "<base64-encoded PNG>",\n      "url": null,\n'
    '      "revised_prompt": null\n    }\n  ]\n}'
)
# SGLang's ImageResponse (multimodal_gen/runtime/entrypoints/openai/protocol.py): id
# first, then data, with its extra keys.
SGLANG_EXAMPLE = json.dumps(
    {
        "id": "9a0c",
        "created": 1,
        "data": [{"b64_json": "<base64-encoded PNG>", "url": None, "revised_prompt": None}],
        "peak_memory_mb": 1.5,
        "inference_time_s": 0.5,
    }
)


@pytest.mark.parametrize("example", [VLLM_OMNI_EXAMPLE, SGLANG_EXAMPLE])
def test_the_image_is_read_out_of_the_servers_answers(example: str) -> None:
    answer = example.replace("<base64-encoded PNG>", PNG_B64).encode()
    assert image_b64(answer, "w") == PNG_B64.encode()


def test_an_answer_with_escapes_is_parsed() -> None:
    # A JSON writer may escape "/" (base64 has it): the slice finds a backslash, parses.
    answer = json.dumps({"data": [{"b64_json": PNG_B64}]}).replace("/", "\\/").encode()
    assert "\\/" in answer.decode()
    assert image_b64(answer, "w") == PNG_B64.encode()


@pytest.mark.parametrize(
    ("answer", "phrase"),
    [
        (b'{"created": 1, "data": []}', "without an image (no data[0])"),
        (b'{"data": [{"url": "http://x/1.png"}]}', "without an image (data[0] has a URL"),
        (b'{"data": [{"b64_json": null}]}', "without an image (data[0] has no b64_json)"),
        (b'{"error": {"message": "x"}}', "without an image (no data[0])"),
        (b"<html>502</html>", "with HTML, not JSON"),
        (b"not json", "with a body that is not JSON"),
    ],
)
def test_an_answer_without_an_image_is_a_bad_answer(answer: bytes, phrase: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        image_b64(answer, "w-0")
    assert caught.value.cause is Cause.BAD_ANSWER
    assert caught.value.detail.startswith(f"worker w-0: answered 200 {phrase}")


# -- the pool's settings -------------------------------------------------------------------


def openai_yaml(url: str = "http://127.0.0.1:9", **openai: Any) -> str:
    return registry_yaml({"p": [url]}, None, protocol="openai-images", openai=openai)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            registry_yaml({"p": ["http://127.0.0.1:9"]}, openai={"size": "512x512"}),
            r":\d+: pools\.p\.openai: settings for openai-images, but this pool speaks "
            r"friendli-container",
        ),
        (openai_yaml(size="512"), r"pools\.p\.openai\.size: String should match"),
        (
            openai_yaml(extra_fields={"seed": 1}),
            r"pools\.p\.openai: .*extra_fields may not set seed",
        ),
        (
            openai_yaml(extra_fields={"n": 2}),
            r"pools\.p\.openai: .*extra_fields may not set n",
        ),
        (openai_yaml(steps_field="seed"), r"two inputs sent in one field"),
        (openai_yaml(seed_field="bad name"), r"pools\.p\.openai\.seed_field"),
        (openai_yaml(health_path="health"), r"pools\.p\.openai\.health_path"),
        (openai_yaml(colour="red"), r"pools\.p\.openai\.colour: Extra inputs"),
    ],
)
def test_bad_openai_settings_are_refused_naming_line_and_key(text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_registry(text)


def test_a_pool_that_sends_no_seed_is_not_deterministic() -> None:
    protocol = protocol_for("openai-images")
    assert protocol.honours_seed(PoolSpec(protocol="openai-images"))
    pool = PoolSpec(protocol="openai-images", openai=OpenAIImagesSettings(seed_field=None))
    assert not protocol.honours_seed(pool)


def test_the_cache_key_separates_protocols_and_image_settings() -> None:
    """One adapter name, one request: a friendli-container pool, an openai-images pool
    and another size each file the image under their own key."""
    adapter, request = AdapterSpec(name="a", pool="p"), job()
    pools = [
        PoolSpec(),
        PoolSpec(protocol="openai-images"),
        PoolSpec(protocol="openai-images", openai=OpenAIImagesSettings(size="512x512")),
        PoolSpec(protocol="openai-images", openai=OpenAIImagesSettings(extra_fields={"x": 1})),
    ]
    keys = {
        cache_key(
            adapter,
            request,
            namespace="n",
            variant=protocol_for(pool.protocol).variant(adapter, pool),
        )
        for pool in pools
    }
    assert len(keys) == len(pools)
    # What does not shape the image does not split the cache.
    moved = PoolSpec(
        protocol="openai-images", openai=OpenAIImagesSettings(health_path="/v1/models")
    )
    same = protocol_for("openai-images")
    assert same.variant(adapter, moved) == same.variant(adapter, pools[1])


# -- through a served gateway, to the simulated server ------------------------------------


async def post(url: str, payload: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(url + PATH, json=payload)


def decoded(resp: httpx.Response) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(resp.json()["image"])))


def sim_registry(url: str, **openai: Any) -> Any:
    adapters: list[dict[str, Any]] = [
        {"name": "qwen", "pool": "q", "default": True},
        {"name": "qwen-pixel", "pool": "q", "upstream_model": "qwen-pixel-lora"},
    ]
    settings = {"size": "64x48", "model": "Qwen/Qwen-Image", **openai}
    return make_registry({"q": [url]}, adapters, protocol="openai-images", openai=settings)


@pytest.mark.parametrize("format_field", ["output_format", None])
async def test_jpeg_and_png_through_the_gateway(format_field: str | None) -> None:
    """With `output_format` the server draws the format asked; without it, PNG, which
    the gateway re-encodes for a client that asked for JPEG."""
    options = ["--protocol", "openai-images", "--step-ms", "0"]
    with sim_workers([*options, "--adapters", "Qwen/Qwen-Image,qwen-pixel-lora"]) as (sim,):
        registry = sim_registry(sim.url, format_field=format_field)
        async with served_gateway(registry) as url, httpx.AsyncClient(base_url=url) as client:
            jpeg = await client.post(PATH, json=body(seed=5), headers=NO_STORE)
            png = await client.post(PATH, json=body(seed=5, response_format="raw"))
    for resp, fmt in ((jpeg, "JPEG"), (png, "PNG")):
        assert resp.status_code == 200, resp.text
        image = decoded(resp)
        assert (image.format, image.size) == (fmt, (64, 48))
        assert resp.headers["x-seed"] == "5"


async def test_the_seed_is_honoured_and_the_adapter_chosen_by_model() -> None:
    options = ["--protocol", "openai-images", "--step-ms", "0"]
    with sim_workers([*options, "--adapters", "Qwen/Qwen-Image,qwen-pixel-lora"]) as (sim,):
        async with (
            served_gateway(sim_registry(sim.url)) as url,
            httpx.AsyncClient(base_url=url) as client,
        ):

            async def image(**overrides: Any) -> bytes:
                resp = await client.post(PATH, json=body(**overrides), headers=NO_STORE)
                assert resp.status_code == 200, resp.text
                return base64.b64decode(resp.json()["image"])

            one, again = await image(seed=11), await image(seed=11)
            other = await image(seed=12)
            lora = await image(seed=11, model="qwen-pixel")
            stats = sim.stats()
    assert one == again != other
    assert lora != one
    assert stats["requests_by_adapter"] == {"Qwen/Qwen-Image": 3, "qwen-pixel-lora": 1}


async def test_a_model_the_server_does_not_serve_is_its_404() -> None:
    options = ["--protocol", "openai-images", "--step-ms", "0", "--adapters", "other"]
    with sim_workers(options) as (sim,):
        async with served_gateway(sim_registry(sim.url)) as url:
            resp = await post(url, body())
    assert resp.status_code == 404
    assert resp.json()["detail"] == (
        "adapter 'qwen': worker rejected the request: The model `Qwen/Qwen-Image` does not exist."
    )


# -- errors and busy answers, against scripted servers ---------------------------------------


def openai_answer(image: bytes) -> web.Response:
    data = {"created": 1, "data": [{"b64_json": base64.b64encode(image).decode(), "url": None}]}
    return web.json_response(data)


async def answers_png(request: web.Request) -> web.StreamResponse:
    return openai_answer(PNG)


@pytest.mark.parametrize(
    ("status", "headers"), [(429, {}), (503, {"Retry-After": "2"})], ids=["429", "503-retry-after"]
)
async def test_busy_is_retried_elsewhere_and_never_ejects(
    status: int, headers: dict[str, str]
) -> None:
    async def busy(request: web.Request) -> web.StreamResponse:
        error = {"error": {"message": "Server is busy", "type": "server_busy"}}
        return web.json_response(error, status=status, headers=headers)

    async with fake_workers(busy, answers_png) as (full, good):
        registry = make_registry(
            {"p": [full.url, good.url]},
            protocol="openai-images",
            health={"consecutive_failures": 1},
        )
        async with local_pipeline(registry) as (pipeline, _):
            results = [await generate(pipeline, seed=i) for i in range(6)]
            pool = the_pool(pipeline)
    assert set(results) == {"p-1"}
    assert full.received, "the busy worker was tried"
    # One failure would eject it (consecutive_failures: 1); busy is no failure.
    assert [(w.health.in_service, w.health.ejections) for w in pool.workers] == [(True, 0)] * 2


async def test_error_bodies_become_one_line_details() -> None:
    refused = {"error": {"message": "Prompt violates the content policy", "type": "invalid"}}
    handlers = [
        answers(400, json.dumps(refused)),
        answers(500, '{"detail": "Traceback (most recent call last):\\n File /srv/vllm.py"}'),
        answers(200, '{"created": 1, "data": [{"url": "http://10.0.0.5/x.png"}]}'),
    ]
    results = []
    for handler in handlers:
        async with fake_worker(handler) as worker:
            registry = make_registry({"p": [worker.url]}, protocol="openai-images", max_retries=0)
            async with served_gateway(registry) as url:
                results.append(await post(url, body()))
    assert [r.status_code for r in results] == [400, 502, 502]
    assert results[0].json()["detail"] == (
        "adapter 'p': worker rejected the request: Prompt violates the content policy"
    )
    assert results[1].json()["detail"] == "adapter 'p': worker p-0: HTTP 500"
    assert results[2].json()["detail"] == (
        "adapter 'p': worker p-0: answered 200 without an image (data[0] has a URL, not b64_json)"
    )
    assert "10.0.0.5" not in results[2].text


async def test_what_is_sent_is_the_openai_shape_with_the_pool_s_credentials() -> None:
    async with fake_worker(answers_png) as worker:
        registry = make_registry(
            {"p": [worker.url]},
            [{"name": "a", "pool": "p", "upstream_model": "served-a", "default": True}],
            protocol="openai-images",
            headers={"Authorization": "Bearer k"},
            openai={"size": "512x512", "seed_field": "random_seed"},
        )
        async with served_gateway(registry) as url:
            resp = await post(url, body(seed=3, response_format="raw"))
    assert resp.status_code == 200
    assert worker.received == [
        {
            "prompt": "a red fox",
            "n": 1,
            "response_format": "b64_json",
            "size": "512x512",
            "model": "served-a",
            "num_inference_steps": 4,
            "guidance_scale": 7.5,
            "random_seed": 3,
            "output_format": "png",
        }
    ]
    assert worker.headers[0]["Authorization"] == "Bearer k"
    assert base64.b64decode(resp.json()["image"]) == PNG  # the server's PNG, untouched


# -- probes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "said"),
    [(200, {}, "ok"), (503, {"Retry-After": "1"}, "busy"), (429, {}, "busy"), (503, {}, "down")],
)
async def test_probe_reads_the_health_path(status: int, headers: dict[str, str], said: str) -> None:
    seen: list[str] = []

    async def models(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        return web.json_response({"object": "list", "data": []}, status=status, headers=headers)

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        registry = make_registry(
            {"p": [url]}, protocol="openai-images", openai={"health_path": "/v1/models"}
        )
        async with local_pipeline(registry) as (pipeline, _):
            pool = the_pool(pipeline)
            probe = protocol_for("openai-images").probe
            result = await probe(
                pipeline.session,
                url,
                timeout=aiohttp.ClientTimeout(total=5),
                headers={},
                pool=pool.spec,
            )
    finally:
        await runner.cleanup()
    assert (result, seen) == (said, ["/v1/models"])
