"""The HTTP front, in memory through httpx.ASGITransport, with real sim workers."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from gateway.registry import Registry
from gateway.testing import ServedSim, gateway_client
from tests.support import body, make_registry


def sim_registry(sims: list[ServedSim]) -> Registry:
    return make_registry(
        {"sdxl": [s.url for s in sims]},
        adapters=[
            {"name": "sdxl-base", "pool": "sdxl", "default": True},
            {
                "name": "pixel-art",
                "pool": "sdxl",
                "upstream_model": "pixel-art",
                "aliases": ["pixelart"],
            },
        ],
    )


def decode(payload: bytes) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(json.loads(payload)["image"])))


async def test_round_trip_jpeg_and_png(fast_sims: list[ServedSim]) -> None:
    async with gateway_client(sim_registry(fast_sims)) as client:
        jpeg = await client.post("/v1/images/generations", json=body(model="pixel-art"))
        png = await client.post("/v1/images/generations", json=body(response_format="raw"))
    assert jpeg.status_code == 200, jpeg.text
    assert jpeg.headers["content-type"] == "application/json"
    image = decode(jpeg.content)
    assert (image.format, image.size) == ("JPEG", (128, 128))
    assert decode(png.content).format == "PNG"
    assert jpeg.headers["x-adapter"] == "pixel-art"
    assert png.headers["x-adapter"] == "sdxl-base"
    assert int(jpeg.headers["x-seed"]) >= 0
    assert jpeg.headers["x-cache"] in ("hit", "miss", "bypass")
    assert jpeg.headers["x-request-id"]


async def test_same_seed_same_bytes_and_seed_is_echoed(fast_sims: list[ServedSim]) -> None:
    async with gateway_client(sim_registry(fast_sims)) as client:
        first = await client.post("/v1/images/generations", json=body(seed=7, model="pixelart"))
        second = await client.post("/v1/images/generations", json=body(seed=7, model="pixel-art"))
        other = await client.post("/v1/images/generations", json=body(seed=8, model="pixel-art"))
    assert first.headers["x-seed"] == "7"
    assert first.content == second.content
    assert other.content != first.content


async def test_request_without_seed_gets_one_that_reproduces_the_image(
    fast_sims: list[ServedSim],
) -> None:
    async with gateway_client(sim_registry(fast_sims)) as client:
        first = await client.post("/v1/images/generations", json=body())
        seed = int(first.headers["x-seed"])
        again = await client.post("/v1/images/generations", json=body(seed=seed))
    assert again.content == first.content


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_inference_steps": 20.5}, "num_inference_steps"),
        ({"num_inference_steps": "20"}, "num_inference_steps"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 51}, "num_inference_steps"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"response_format": "webp"}, "response_format"),
    ],
)
async def test_validation_is_422_naming_the_field(
    fast_sims: list[ServedSim], overrides: dict[str, object], field: str
) -> None:
    async with gateway_client(sim_registry(fast_sims)) as client:
        resp = await client.post("/v1/images/generations", json=body(**overrides))
    assert resp.status_code == 422
    assert ["body", field] in [err["loc"] for err in resp.json()["detail"]]


async def test_missing_prompt_is_422(fast_sims: list[ServedSim]) -> None:
    payload = body()
    del payload["prompt"]
    async with gateway_client(sim_registry(fast_sims)) as client:
        resp = await client.post("/v1/images/generations", json=payload)
    assert resp.status_code == 422
    assert resp.json()["detail"][0] == {
        "loc": ["body", "prompt"],
        "msg": "Field required",
        "type": "missing",
    }


async def test_non_json_and_wrong_content_type_are_clear_4xx(fast_sims: list[ServedSim]) -> None:
    async with gateway_client(sim_registry(fast_sims)) as client:
        garbage = await client.post(
            "/v1/images/generations",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        form = await client.post("/v1/images/generations", data={"prompt": "fox"})
        empty = await client.post(
            "/v1/images/generations", content=b"", headers={"content-type": "application/json"}
        )
        array = await client.post("/v1/images/generations", json=[1, 2])
    assert garbage.status_code == 422
    assert garbage.json()["detail"][0]["type"] == "json_invalid"
    assert form.status_code == 415
    assert "application/json" in form.json()["detail"]
    assert empty.status_code == 422
    assert array.status_code == 422


async def test_unknown_model_is_404_listing_known_models(fast_sims: list[ServedSim]) -> None:
    async with gateway_client(sim_registry(fast_sims)) as client:
        resp = await client.post("/v1/images/generations", json=body(model="sd15"))
    assert resp.status_code == 404
    assert resp.json() == {"detail": "unknown model 'sd15'; known models: pixel-art, sdxl-base"}
    assert resp.headers["x-cache"] == "bypass"  # on errors too: the cache was not consulted


async def test_unknown_route_and_method_are_json(fast_sims: list[ServedSim]) -> None:
    async with gateway_client(sim_registry(fast_sims)) as client:
        missing = await client.get("/v1/nothing")
        wrong = await client.get("/v1/images/generations")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "Not Found"}
    assert wrong.status_code == 405
    assert "detail" in wrong.json()


async def test_models_health_and_ready(fast_sims: list[ServedSim]) -> None:
    async with gateway_client(sim_registry(fast_sims)) as client:
        models = (await client.get("/v1/models")).json()
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["sdxl-base", "pixel-art"]
    assert models["data"][1]["aliases"] == ["pixelart"]
    assert all(m["object"] == "model" for m in models["data"])
    assert health.status_code == 200
    assert ready.status_code == 200


async def test_request_id_is_echoed_when_safe_and_replaced_when_not(
    fast_sims: list[ServedSim],
) -> None:
    async with gateway_client(sim_registry(fast_sims)) as client:
        kept = await client.get("/healthz", headers={"x-request-id": "abc-123"})
        replaced = await client.get("/healthz", headers={"x-request-id": "bad id\twith spaces"})
        error = await client.post(
            "/v1/images/generations", json=body(model="x"), headers={"x-request-id": "err-1"}
        )
    assert kept.headers["x-request-id"] == "abc-123"
    assert replaced.headers["x-request-id"] != "bad id\twith spaces"
    assert len(replaced.headers["x-request-id"]) == 32
    assert error.headers["x-request-id"] == "err-1"


async def test_a_prompt_over_max_prompt_chars_is_422_naming_the_field(
    fast_sims: list[ServedSim],
) -> None:
    registry = make_registry(
        {"sdxl": [fast_sims[0].url]}, sections={"limits": {"max_prompt_chars": 100}}
    )
    async with gateway_client(registry) as client:
        long = await client.post("/v1/images/generations", json=body(prompt="é" * 101))
        fits = await client.post("/v1/images/generations", json=body(prompt="é" * 100))
    assert long.status_code == 422
    assert long.json() == {
        "detail": [
            {
                "loc": ["body", "prompt"],
                "msg": "String should have at most 100 characters",
                "type": "string_too_long",
            }
        ]
    }
    assert fits.status_code == 200  # characters, not bytes: 100 of them are 200 bytes
