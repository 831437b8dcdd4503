"""The cog protocol: translation both ways, a full request through a served gateway to
a sim Cog worker, busy and failed answers, health, and the cache key's variant."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web

from gateway.causes import Cause
from gateway.errors import ConfigError, UpstreamError
from gateway.protocols import protocol_for
from gateway.protocols.cog import MAX_LOGGED_ERROR, health, output_image, prediction
from gateway.protocols.imaging import sniff
from gateway.registry import AdapterSpec, CogSettings, PoolSpec
from gateway.schema import WorkerRequest
from gateway.testing import image_bytes, served_gateway
from tests.protocols.servers import json_answer, scripted, sim_server
from tests.support import body, dead_url, make_registry

PATH = "/v1/images/generations"
PNG = image_bytes("raw", side=16)
JOB = WorkerRequest(
    prompt="a fox",
    num_inference_steps=4,
    guidance_scale=7.5,
    model="claymation",
    response_format="jpeg",
    seed=0,
)
DEMO_COG = {"adapter_input": "lora_weights", "lora_scale_input": "lora_scale"}
ADAPTERS: list[dict[str, Any]] = [
    {"name": "clay", "pool": "p", "upstream_model": "claymation", "lora_weight": 0.7},
    {"name": "base", "pool": "p", "default": True},
]


# -- our request as Cog inputs ------------------------------------------------------------


def test_the_six_fields_go_to_the_model_s_input_names() -> None:
    adapter = AdapterSpec(name="clay", pool="p", upstream_model="claymation", lora_weight=0.7)
    settings = CogSettings(**DEMO_COG, inputs={"width": 768})
    assert prediction(JOB, adapter, settings) == {
        "input": {
            "width": 768,
            "prompt": "a fox",
            "num_inference_steps": 4,
            "guidance_scale": 7.5,
            "seed": 0,  # explicit, 0 included: never left to the model's "random"
            "output_format": "jpg",
            "lora_weights": "claymation",
            "lora_scale": 0.7,
        }
    }
    renamed = CogSettings(steps_input="steps", guidance_input=None, png_value="PNG")
    raw = JOB.model_copy(update={"response_format": "raw", "model": None})
    assert prediction(raw, AdapterSpec(name="b", pool="p"), renamed) == {
        "input": {"prompt": "a fox", "steps": 4, "seed": 0, "output_format": "PNG"}
    }


def test_input_names_are_checked() -> None:
    with pytest.raises(ValueError, match="mapped twice"):
        CogSettings(steps_input="prompt")
    with pytest.raises(ValueError, match="both mapped and fixed"):
        CogSettings(inputs={"seed": 1})


# -- Cog's answers as ours ------------------------------------------------------------------


def _data_url(image: bytes, mime: str = "png") -> str:
    return f"data:image/{mime};base64," + base64.b64encode(image).decode()


def test_a_succeeded_prediction_s_data_url_is_the_image() -> None:
    # docs/http.md's example answer, with a real image in it
    answer = {"status": "succeeded", "output": _data_url(PNG), "metrics": {"predict_time": 4.52}}
    assert base64.b64decode(output_image(_dumps(answer), "w")) == PNG
    listed = {**answer, "output": [_data_url(PNG), _data_url(b"second")]}
    assert base64.b64decode(output_image(_dumps(listed), "w")) == PNG


@pytest.mark.parametrize(
    ("answer", "cause", "words"),
    [
        # coglet's routes.rs: a run() that raised is a 200 with status "failed"
        (
            {
                "id": "x",
                "error": "CUDA out of memory at /srv/model.py",
                "logs": "",
                "status": "failed",
                "metrics": {"predict_time": 1.0},
            },
            Cause.JOB_FAILED,
            "prediction failed",
        ),
        ({"status": "canceled"}, Cause.JOB_FAILED, "prediction canceled"),
        ({"status": "starting"}, Cause.BAD_ANSWER, "status 'starting'"),
        (
            {"status": "succeeded", "output": "https://example.com/upload/image.png"},
            Cause.BAD_ANSWER,
            "a URL, not a data URL",
        ),
        ({"status": "succeeded", "output": []}, Cause.BAD_ANSWER, "without an image"),
        (
            {"status": "succeeded", "output": "data:image/png,raw"},
            Cause.BAD_ANSWER,
            "not a base64 data URL",
        ),
    ],
)
def test_answers_without_an_image(answer: dict[str, Any], cause: Cause, words: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        output_image(_dumps(answer), "cog-0")
    assert caught.value.cause is cause
    assert words in caught.value.detail
    assert "CUDA" not in caught.value.detail  # the model's words stay on the worker


@pytest.mark.parametrize(
    ("status", "probe"),
    [
        ("READY", "ok"),
        ("BUSY", "busy"),
        ("STARTING", "down"),
        ("SETUP_FAILED", "down"),
        ("DEFUNCT", "down"),
        ("UNHEALTHY", "down"),
        (None, "down"),
    ],
)
def test_health_check_status_is_the_probe_s_word(status: str | None, probe: str) -> None:
    # docs/http.md's example, its status replaced
    answer = {
        "status": status,
        "setup": {"status": "succeeded", "logs": ""},
        "version": {"coglet": "0.17.0", "cog": "0.14.0", "python": "3.13.0"},
    }
    assert health(_dumps(answer)) == probe
    assert health(b"<html>") == "down"


# -- through a served gateway ------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "kind"), [("jpeg", "JPEG"), ("raw", "PNG")])
async def test_a_request_through_the_gateway_to_a_sim_cog_worker(fmt: str, kind: str) -> None:
    async with sim_server("cog", adapters=("claymation",)) as (url, worker):
        registry = make_registry({"p": [url]}, ADAPTERS, protocol="cog", cog=DEMO_COG)
        async with served_gateway(registry) as gw, httpx.AsyncClient(base_url=gw) as client:
            first = await client.post(PATH, json=body(model="clay", seed=11, response_format=fmt))
            again = await client.post(PATH, json=body(model="clay", seed=11, response_format=fmt))
            other = await client.post(PATH, json=body(model="clay", seed=12, response_format=fmt))
    assert [a.status_code for a in (first, again, other)] == [200, 200, 200]
    image = base64.b64decode(first.json()["image"])
    assert sniff(image) == kind
    assert first.headers["x-seed"] == "11"
    assert [first.headers["x-cache"], again.headers["x-cache"]] == ["miss", "hit"]
    assert other.json() != first.json()  # the seed reached the model
    assert worker.stats.requests_by_adapter == {"claymation": 2}  # the adapter chosen


async def test_a_409_is_busy_and_retried_on_another_worker() -> None:
    at_capacity = {"error": "At capacity - all prediction slots busy", "status": "failed"}
    refused = json_answer(at_capacity, 409)
    tried: list[int] = []

    async def counted(request: web.Request) -> web.StreamResponse:
        tried.append(1)
        return await refused(request)

    routes = {
        ("POST", "/predictions"): counted,
        ("GET", "/health-check"): json_answer({"status": "BUSY"}),
    }
    async with scripted(routes) as busy, sim_server("cog") as (good, _):
        registry = make_registry({"p": [busy, good]}, ADAPTERS[1:], protocol="cog")
        async with served_gateway(registry) as gw, httpx.AsyncClient(base_url=gw) as client:
            answers: list[httpx.Response] = []
            while len(answers) < 4 or not tried:  # ties go at random: on till busy is tried
                answers.append(await client.post(PATH, json=body(seed=len(answers))))
                assert len(answers) < 100, "the busy worker was never tried"
            metrics = (await client.get("/metrics")).text
            status = (await client.get("/status")).json()
    assert {a.status_code for a in answers} == {200}
    assert 'reason="busy"' in metrics
    assert status["pools"]["p"]["ejections"] == 0  # busy is never a reason to eject


async def test_a_failed_prediction_is_502_without_the_model_s_words(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.protocols.cog")
    failed = {"error": "Traceback: /srv/predict.py secret", "status": "failed", "logs": ""}
    routes = {
        ("POST", "/predictions"): json_answer(failed),
        ("GET", "/health-check"): json_answer({"status": "READY"}),
    }
    async with scripted(routes) as url:
        registry = make_registry(
            {"p": [url]}, ADAPTERS[1:], protocol="cog", max_retries=0, max_accepted_retries=0
        )
        async with served_gateway(registry) as gw, httpx.AsyncClient(base_url=gw) as client:
            answer = await client.post(PATH, json=body())
    assert answer.status_code == 502
    assert "prediction failed" in answer.json()["detail"]
    assert "secret" not in answer.text
    # The operators see why, and on which worker.
    (record,) = [r for r in caplog.records if r.name == "gateway.protocols.cog"]
    assert record.getMessage() == "cog: prediction failed: Traceback: /srv/predict.py secret"
    assert record.__dict__["fields"] == {"worker": "p-0", "status": "failed"}


def test_a_failed_prediction_s_error_is_logged_on_one_bounded_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.protocols.cog")
    error = "RuntimeError: CUDA out of memory\n" + "x " * 5000
    with pytest.raises(UpstreamError) as caught:
        output_image(_dumps({"status": "failed", "error": error}), "cog-0")
    assert caught.value.detail == "worker cog-0: prediction failed"
    (record,) = caplog.records
    logged = record.getMessage()
    assert logged.startswith("cog: prediction failed: RuntimeError: CUDA out of memory x x")
    assert "\n" not in logged
    assert logged.endswith("... (9032 more characters)")
    assert len(logged) < MAX_LOGGED_ERROR + 100


async def test_cog_s_422_is_the_client_s_422() -> None:
    invalid = {
        "detail": [
            {
                "loc": ["body", "input", "num_inference_steps"],
                "msg": "must be less than or equal to 8",
                "type": "value_error",
            }
        ]
    }
    routes = {
        ("POST", "/predictions"): json_answer(invalid, 422),
        ("GET", "/health-check"): json_answer({"status": "READY"}),
    }
    async with scripted(routes) as url:
        registry = make_registry({"p": [url]}, ADAPTERS[1:], protocol="cog")
        async with served_gateway(registry) as gw, httpx.AsyncClient(base_url=gw) as client:
            answer = await client.post(PATH, json=body(num_inference_steps=20))
    assert answer.status_code == 422
    assert "input.num_inference_steps: must be less than or equal to 8" in answer.json()["detail"]


async def test_a_busy_health_check_is_busy_not_down() -> None:
    async def probe(answer: dict[str, Any]) -> str:
        routes = {("GET", "/health-check"): json_answer(answer)}
        async with scripted(routes) as url, aiohttp.ClientSession() as session:
            timeout = aiohttp.ClientTimeout(total=2)
            return await protocol_for("cog").probe(
                session, url, timeout=timeout, headers={}, pool=PoolSpec(protocol="cog")
            )

    assert await probe({"status": "BUSY"}) == "busy"
    assert await probe({"status": "SETUP_FAILED"}) == "down"


# -- the cache key ------------------------------------------------------------------------


def test_the_variant_separates_settings_and_weights() -> None:
    cog = protocol_for("cog")
    adapter = AdapterSpec(name="clay", pool="p", upstream_model="claymation", lora_weight=0.7)
    pool = PoolSpec(protocol="cog", cog=CogSettings(**DEMO_COG))
    variant = cog.variant(adapter, pool)
    assert variant is not None
    assert variant.startswith("cog:")
    heavier = adapter.model_copy(update={"lora_weight": 0.9})
    wider = PoolSpec(protocol="cog", cog=CogSettings(**DEMO_COG, inputs={"width": 1024}))
    assert len({variant, cog.variant(heavier, pool), cog.variant(adapter, wider)}) == 3
    assert cog.variant(adapter, pool) == variant  # and it is stable
    assert protocol_for("friendli-container").variant(adapter, PoolSpec()) != variant


def test_an_adapter_with_a_lora_needs_an_adapter_input() -> None:
    with pytest.raises(ConfigError, match=r"adapters\.0\.upstream_model: pool 'p' \(cog\)"):
        make_registry({"p": [dead_url()]}, ADAPTERS, protocol="cog")


def _dumps(data: Any) -> bytes:
    return json.dumps(data).encode()
