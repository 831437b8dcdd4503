"""The GPU-worker simulator: deterministic pictures, GPU-like timing and limits."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image

from gateway.schema import ImageGenerationBody
from gateway.simworker import SimConfig, create_sim_app, render, start_sim, stop, wait_healthy
from gateway.testing import registry_yaml
from tests.support import body, dead_url, gateway_process


@asynccontextmanager
async def sim(**options: object) -> AsyncIterator[httpx.AsyncClient]:
    app = create_sim_app(SimConfig(**options))  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
        yield client


async def generate(client: httpx.AsyncClient, **overrides: object) -> httpx.Response:
    return await client.post("/v1/images/generations", json=body(**overrides))


def test_render_is_a_pure_function_of_the_inputs() -> None:
    one = ImageGenerationBody.model_validate(body(seed=1))
    assert render(one, 64) == render(one, 64)
    for change in (
        {"seed": 2},
        {"prompt": "a blue fox"},
        {"num_inference_steps": 5},
        {"guidance_scale": 3.0},
        {"model": "pixel-art"},
    ):
        other = ImageGenerationBody.model_validate({**body(seed=1), **change})
        assert render(other, 64) != render(one, 64), change


async def test_formats_and_size() -> None:
    async with sim(step_ms=0, size=96) as client:
        jpeg = await generate(client, seed=1)
        png = await generate(client, seed=1, response_format="raw")
    for resp, fmt in ((jpeg, "JPEG"), (png, "PNG")):
        image = Image.open(io.BytesIO(base64.b64decode(resp.json()["image"])))
        assert (image.format, image.size) == (fmt, (96, 96))


async def test_takes_steps_times_step_ms_and_holds_concurrency() -> None:
    async with sim(step_ms=20, concurrency=2, size=32) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.gather(*(generate(client, num_inference_steps=5, seed=i) for i in range(4)))
        elapsed = loop.time() - started
        stats = (await client.get("/stats")).json()
    # 4 jobs of 100 ms with 2 at a time: two rounds, so at least 200 ms.
    assert elapsed >= 0.2
    assert stats["max_in_flight"] == 2
    assert stats["generations"] == 4


async def test_stats_report_peak_concurrency_and_requests_queued_inside() -> None:
    # 5 at once on 2 slots: 2 run, 3 wait inside the worker (what a gateway that
    # overcommits it causes); then 2 at once: none waits, the peaks stay.
    async with sim(step_ms=20, concurrency=2, size=32) as client:
        await asyncio.gather(*(generate(client, num_inference_steps=3, seed=i) for i in range(5)))
        await asyncio.gather(*(generate(client, num_inference_steps=3, seed=i) for i in range(2)))
        stats = (await client.get("/stats")).json()
    assert (stats["peak_concurrency"], stats["queued_peak"], stats["served"]) == (2, 3, 7)


async def test_stats_show_no_queue_when_never_overcommitted() -> None:
    async with sim(step_ms=5, concurrency=2, size=32) as client:
        for _ in range(3):
            await asyncio.gather(*(generate(client, seed=i) for i in range(2)))
        stats = (await client.get("/stats")).json()
    assert (stats["peak_concurrency"], stats["queued_peak"], stats["served"]) == (2, 0, 6)


async def test_adapter_loads_are_paid_once_while_loaded() -> None:
    async with sim(step_ms=0, adapter_load_ms=1, max_loaded_adapters=2, size=32) as client:
        for model in ["a", "a", "b", "a", "c", "b"]:
            assert (await generate(client, model=model)).status_code == 200
        stats = (await client.get("/stats")).json()
    # a (load), a, b (load), a, c (load, evicts b), b (load, evicts a)
    assert stats["adapter_loads"] == 4
    assert stats["loaded"] == ["c", "b"]


async def test_unserved_adapter_is_400_and_bad_body_is_422() -> None:
    async with sim(step_ms=0, adapters=("pixel-art",), size=32) as client:
        unknown = await generate(client, model="watercolor")
        bad = await client.post("/v1/images/generations", json={"prompt": "x"})
    assert unknown.status_code == 400
    assert "watercolor" in unknown.json()["detail"]
    assert bad.status_code == 422


async def test_fail_rate_one_always_fails() -> None:
    async with sim(step_ms=0, fail_rate=1.0, size=32) as client:
        resp = await generate(client)
        health = await client.get("/health")
        stats = (await client.get("/stats")).json()
    assert resp.status_code == 500
    assert json.loads(resp.content) == {"detail": "simulated worker failure"}
    assert health.status_code == 200
    assert stats["failures"] == 1


# -- openai-images: vLLM-Omni's / SGLang's request and answer ---------------------------


async def openai_generate(client: httpx.AsyncClient, **fields: object) -> httpx.Response:
    return await client.post("/v1/images/generations", json={"prompt": "a red fox", **fields})


async def test_openai_answers_the_servers_shape_png_unless_asked() -> None:
    async with sim(step_ms=0, protocol="openai-images", size=32) as client:
        plain = await openai_generate(client, seed=1, size="40x24")
        jpeg = await openai_generate(client, seed=1, size="40x24", output_format="jpeg")
        two = await openai_generate(client, seed=1, n=2)
        models = await client.get("/v1/models")
    answer = plain.json()
    assert set(answer) == {"created", "data"}
    assert set(answer["data"][0]) == {"b64_json", "url", "revised_prompt"}
    for resp, fmt in ((plain, "PNG"), (jpeg, "JPEG")):
        image = Image.open(io.BytesIO(base64.b64decode(resp.json()["data"][0]["b64_json"])))
        assert (image.format, image.size) == (fmt, (40, 24))
    images = [item["b64_json"] for item in two.json()["data"]]
    assert len(set(images)) == 2
    assert models.json()["object"] == "list"


async def test_openai_refuses_what_the_servers_refuse() -> None:
    async with sim(step_ms=0, protocol="openai-images", adapters=("m",), size=32) as client:
        unknown_field = await openai_generate(client, steps=4)
        too_much_guidance = await openai_generate(client, guidance_scale=25.0)
        url = await openai_generate(client, response_format="url")
        unknown_model = await openai_generate(client, model="other")
        no_prompt = await client.post("/v1/images/generations", json={"n": 1})
    assert [r.status_code for r in (unknown_field, too_much_guidance, url)] == [422, 422, 400]
    assert unknown_field.json()["detail"][0]["loc"] == ["body", "steps"]
    assert unknown_model.status_code == 404
    assert unknown_model.json()["error"]["message"] == "The model `other` does not exist."
    assert no_prompt.status_code == 422


async def test_openai_without_a_seed_draws_a_random_one() -> None:
    async with sim(step_ms=0, protocol="openai-images", size=32) as client:
        images = {(await openai_generate(client)).json()["data"][0]["b64_json"] for _ in range(3)}
        seeded = {
            (await openai_generate(client, seed=9)).json()["data"][0]["b64_json"] for _ in range(3)
        }
    assert len(images) == 3
    assert len(seeded) == 1


# -- a1111: AUTOMATIC1111's txt2img ------------------------------------------------------


async def test_a1111_answers_its_shape_png_with_its_parameters() -> None:
    async with sim(step_ms=0, protocol="a1111", adapters=("pixel-art",)) as client:
        resp = await client.post(
            "/sdapi/v1/txt2img",
            json={"prompt": "a fox <lora:pixel-art:0.8>", "seed": 3, "width": 64, "height": 72},
        )
        unknown = await client.post(
            "/sdapi/v1/txt2img", json={"prompt": "a fox <lora:nope:1>", "seed": 3}
        )
        stats = (await client.get("/stats")).json()
        progress = await client.get("/sdapi/v1/progress?skip_current_image=true")
    answer = resp.json()
    assert list(answer) == ["images", "parameters", "info"]
    assert json.loads(answer["info"])["seed"] == 3
    image = Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))
    assert (image.format, image.size) == ("PNG", (64, 72))
    assert "Seed: 3" in image.info["parameters"]
    assert unknown.status_code == 200  # A1111 skips a LoRA it cannot find
    assert stats["requests_by_adapter"] == {"pixel-art:0.8": 1, "": 1}
    assert progress.json()["state"]["job_count"] == 0


async def test_a1111_refuses_what_a1111_refuses() -> None:
    async with sim(step_ms=0, protocol="a1111") as client:
        sampler = await client.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Z"})
        steps = await client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": "many"})
        random_seed = [
            (await client.post("/sdapi/v1/txt2img", json={"prompt": "x", "seed": -1})).json()
            for _ in range(2)
        ]
    assert sampler.status_code == 400
    assert sampler.json() == {
        "error": "HTTPException",
        "detail": "Sampler not found",
        "body": "",
        "errors": "400: Sampler not found",
    }
    assert steps.status_code == 422
    seeds = [json.loads(answer["info"])["seed"] for answer in random_seed]
    assert seeds[0] != seeds[1]


def test_a_child_on_port_0_says_where_it_listens_and_answers_as_itself() -> None:
    child = start_sim("--step-ms", "0")
    try:
        url = child.wait_ready()  # the URL the child wrote once bound, checked by its id
        instance = httpx.get(url + "/health", timeout=5).json()["instance"]
        assert len(instance) == 16
        # A server at that URL that is not the one we started does not pass for it.
        with pytest.raises(TimeoutError, match="not instance"):
            wait_healthy(url, instance="someone-else", timeout_s=0.3)
    finally:
        stop(child.proc)


def test_a_served_gateway_answers_healthz_with_its_instance(tmp_path: Path) -> None:
    config = tmp_path / "adapters.yaml"
    config.write_text(registry_yaml({"p": [dead_url()]}))
    with gateway_process(str(config)) as url:
        first = httpx.get(url + "/healthz", timeout=5).json()
    with gateway_process(str(config)) as url:
        second = httpx.get(url + "/healthz", timeout=5).json()
    assert first["status"] == second["status"] == "ok"
    assert first["instance"] != second["instance"], "one id per run"


def test_a_dead_url_refuses_and_its_port_stays_ours() -> None:
    url = dead_url()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=5)
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as other, pytest.raises(OSError, match="in use"):
        other.bind(("127.0.0.1", port))  # nobody else can take it and answer
