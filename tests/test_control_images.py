"""Friendli's `control_images` and `controlnet_weights`: validated at the door, URLs only
from hosts the registry lists (and never fetched by the gateway), forwarded intact to
friendli-container workers, refused for pools of other protocols, and in the cache key
only when given."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
from friendli.models import ImageInput
from pydantic import ValidationError

from gateway.cache import cache_key
from gateway.registry import AdapterSpec, Registry
from gateway.schema import (
    MAX_CONTROL_IMAGE_BYTES,
    MAX_CONTROL_IMAGES,
    ImageGenerationBody,
    WorkerRequest,
    error_list,
)
from gateway.testing import fake_worker, image_bytes, served_gateway
from tests.support import api_key, body, make_registry
from tests.test_friendli_sdk import TOKEN, async_sdk, draws_image

PNG = base64.b64encode(image_bytes("raw")).decode()
JPEG = base64.b64encode(image_bytes("jpeg")).decode()
WEBP = base64.b64encode(b"RIFF\x10\x00\x00\x00WEBPVP8 " + bytes(20)).decode()
URL = "https://images.example.com/pose.png"


def parse(**fields: Any) -> ImageGenerationBody:
    return ImageGenerationBody.model_validate_json(json.dumps(body(**fields)))


def refused(**fields: Any) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as info:
        parse(**fields)
    return error_list(info.value)


def images(*texts: str) -> list[dict[str, str]]:
    return [{"image": text} for text in texts]


def test_control_images_and_weights_are_read_as_the_sdk_sends_them() -> None:
    parsed = parse(control_images=images(PNG, JPEG, WEBP, URL), controlnet_weights=[0, 0.5, 1, 1])
    assert [c.image for c in parsed.control_images or ()] == [PNG, JPEG, WEBP, URL]
    assert parsed.controlnet_weights == (0.0, 0.5, 1.0, 1.0)
    assert parse(control_images=images(PNG)).controlnet_weights is None  # weights optional
    # [] asks for nothing: the same request as none at all.
    assert parse(control_images=[], controlnet_weights=[]).control_images is None


TOO_BIG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(MAX_CONTROL_IMAGE_BYTES)).decode()


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"control_images": images(PNG) * (MAX_CONTROL_IMAGES + 1)}, ["control_images"]),
        ({"control_images": images(TOO_BIG)}, ["control_images", 0, "image"]),
        (
            {"control_images": images(base64.b64encode(b"<html>not an image</html>").decode())},
            ["control_images", 0, "image"],
        ),
        ({"control_images": images(PNG[:-1])}, ["control_images", 0, "image"]),  # cut short
        ({"control_images": images(PNG.replace("A", "-"))}, ["control_images", 0, "image"]),
        ({"control_images": images(PNG[:20] + "\n" + PNG[20:])}, ["control_images", 0, "image"]),
        ({"control_images": images("ftp://example.com/a.png")}, ["control_images", 0, "image"]),
        ({"control_images": images("https:///no-host")}, ["control_images", 0, "image"]),
        ({"control_images": images("https://a b/c")}, ["control_images", 0, "image"]),
        ({"control_images": [PNG]}, ["control_images", 0]),  # a bare string, not the SDK's
        ({"control_images": images(PNG), "controlnet_weights": [1.5]}, ["controlnet_weights", 0]),
        ({"control_images": images(PNG), "controlnet_weights": [-0.1]}, ["controlnet_weights", 0]),
        ({"control_images": images(PNG), "controlnet_weights": ["1"]}, ["controlnet_weights", 0]),
        ({"control_images": images(PNG), "controlnet_weights": [1, 1]}, ["controlnet_weights"]),
        ({"controlnet_weights": [1]}, ["controlnet_weights"]),  # weights without images
    ],
)
def test_each_rule_is_a_422_naming_the_field(fields: dict[str, Any], loc: list[Any]) -> None:
    assert ["body", *loc] in [err["loc"] for err in refused(**fields)]


def test_without_control_images_the_workers_request_is_the_six_fields() -> None:
    job = WorkerRequest.from_body(parse(seed=1), upstream_model=None)
    sent = json.loads(job.to_json())
    assert set(sent) == {
        "prompt",
        "num_inference_steps",
        "guidance_scale",
        "model",
        "response_format",
        "seed",
    }


def key_of(**fields: Any) -> str:
    job = WorkerRequest.from_body(parse(seed=7, **fields), upstream_model=None)
    return cache_key(AdapterSpec(name="a", pool="p"), job, namespace="ns")


def test_the_cache_key_holds_each_control_image_and_weight() -> None:
    plain = key_of()
    keys = {
        plain,
        key_of(control_images=images(PNG)),
        key_of(control_images=images(JPEG)),
        key_of(control_images=images(PNG, JPEG)),
        key_of(control_images=images(JPEG, PNG)),
        key_of(control_images=images(PNG), controlnet_weights=[0.5]),
        key_of(control_images=images(PNG), controlnet_weights=[1]),
    }
    assert len(keys) == 7
    assert key_of(control_images=[], controlnet_weights=[]) == plain
    assert key_of(control_images=images(PNG), controlnet_weights=[1]) == key_of(
        control_images=images(PNG), controlnet_weights=[1.0]
    )


def gateway_registry(url: str, *, hosts: list[str] | None = None, **pool: Any) -> Registry:
    limits: dict[str, Any] = {"max_body_bytes": 2**20}
    if hosts is not None:
        limits["control_image_url_hosts"] = hosts
    return make_registry(
        {"p": [{"url": url, "max_concurrency": 1}]},
        [{"name": "base", "pool": "p", "default": True, "upstream_model": "cn"}],
        sections={"limits": limits},
        **pool,
    )


async def post(url: str, **fields: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(f"{url}/v1/images/generations", json=body(**fields))


async def test_control_images_reach_a_friendli_container_worker_intact() -> None:
    controls = images(PNG, URL)
    async with fake_worker() as worker:
        registry = gateway_registry(worker.url, hosts=["Images.Example.com"])
        async with served_gateway(registry) as url:
            answer = await post(url, control_images=controls, controlnet_weights=[0.25, 1])
            await post(url, seed=3)
    assert answer.status_code == 200, answer.text
    sent, without = worker.received
    assert sent["control_images"] == controls
    assert sent["controlnet_weights"] == [0.25, 1.0]
    assert "control_images" not in without
    assert "controlnet_weights" not in without


@pytest.mark.parametrize(
    ("hosts", "says"),
    [
        (None, "control images must be base64: this gateway takes no image URLs"),
        (["other.example.com"], "control image URLs from 'images.example.com' are not allowed"),
    ],
)
async def test_a_url_from_a_host_not_listed_is_a_422_and_never_fetched(
    hosts: list[str] | None, says: str
) -> None:
    async with (
        fake_worker() as worker,
        served_gateway(gateway_registry(worker.url, hosts=hosts)) as url,
    ):
        answer = await post(url, control_images=images(PNG, URL))
    assert answer.status_code == 422
    (error,) = answer.json()["detail"]
    assert error["loc"] == ["body", "control_images", 1, "image"]
    assert error["msg"] == says
    assert worker.received == []


async def test_a_pool_of_another_protocol_refuses_control_images_with_a_422() -> None:
    async with fake_worker(path="/sdapi/v1/txt2img", health_path="/sdapi/v1/progress") as worker:
        registry = gateway_registry(worker.url, protocol="a1111")
        async with served_gateway(registry) as url:
            answer = await post(url, control_images=images(PNG))
    assert answer.status_code == 422
    (error,) = answer.json()["detail"]
    assert error["loc"] == ["body", "control_images"]
    assert error["msg"] == "pool 'p' speaks a1111, which takes no control_images"
    assert worker.received == []


async def test_the_friendli_sdk_sends_control_images_that_reach_the_worker_intact() -> None:
    async with fake_worker(draws_image) as worker:
        registry = make_registry(
            {"p": [{"url": worker.url, "max_concurrency": 1}]},
            [{"name": "base", "pool": "p", "default": True}],
            sections={
                "auth": {"keys": [api_key("sdk-client", TOKEN)]},
                "limits": {"max_body_bytes": 2**20},
            },
        )
        async with served_gateway(registry) as url, async_sdk() as (sdk, seen):
            result = await sdk.container.image.generate(
                server_url=url,
                prompt="a red fox",
                num_inference_steps=4,
                control_images=[ImageInput(image=PNG), ImageInput(image=JPEG)],
                controlnet_weights=[0.5, 1.0],
                seed=9,
            )
    assert base64.b64decode(result.image)
    sent = seen.sent_body()
    (received,) = worker.received
    assert received["control_images"] == sent["control_images"] == images(PNG, JPEG)
    assert received["controlnet_weights"] == sent["controlnet_weights"] == [0.5, 1.0]
