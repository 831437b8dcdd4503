"""The README's promise, "an existing Friendli client works unchanged", kept by the real
`friendli` SDK (PyPI) against the real gateway on loopback, in front of a worker that
answers a real JPEG or PNG and records what it was sent.

What reaches the worker is checked against the SDK's own request model
(`ContainerImageGenerationBody`), not the gateway's schema: a drift between the two
fails here. The SDK's retries are off unless a test is about them (by default it retries
429 and 5xx, see the README).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

# What `from friendli import` gives, from where mypy sees it exported.
from friendli.friendli import AsyncFriendli, SyncFriendli
from friendli.models import ContainerImageGenerationBody, SDKError
from friendli.types import UNSET
from friendli.utils import BackoffStrategy, RetryConfig
from PIL import Image

from gateway.registry import Registry
from gateway.testing import (
    FakeWorker,
    fake_worker,
    held,
    released_at_exit,
    served_gateway,
)
from tests.support import (
    api_key,
    eventually,
    make_registry,
    sim_workers,
)

TOKEN = "gw_sdk-client-key"
ADAPTERS: list[dict[str, Any]] = [
    {"name": "base", "pool": "p", "default": True},
    {"name": "pixel-art", "pool": "p", "upstream_model": "pixel", "aliases": ["px"]},
]
# The SDK's RetryConfig "none" strategy: one try, whatever the status.
NO_RETRIES = RetryConfig("none", BackoffStrategy(0, 0, 1, 0), False)
PIL_FORMAT = {"jpeg": "JPEG", "raw": "PNG"}


def image_answer(response_format: str = "jpeg") -> bytes:
    """A worker's success body: a real 8x8 picture in the format asked for (JPEG, PNG
    for `raw`)."""
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 60, 20)).save(
        out, format=PIL_FORMAT.get(response_format, "JPEG")
    )
    return json.dumps({"image": base64.b64encode(out.getvalue()).decode()}).encode()


async def draws_image(request: web.Request) -> web.StreamResponse:
    """Answers `image_answer` in the format asked for. Lenient in what it reads, so that
    a malformed request reaches the test's check against the SDK's model rather than
    failing here."""
    asked = json.loads(await request.read())
    payload = image_answer(str(asked.get("response_format")))
    return web.Response(body=payload, content_type="application/json")


def registry(worker_url: str, *, slots: int = 1, **key_options: Any) -> Registry:
    keys = [api_key("sdk-client", TOKEN, **key_options)]
    worker = {"url": worker_url, "max_concurrency": slots}
    return make_registry({"p": [worker]}, ADAPTERS, sections={"auth": {"keys": keys}})


@dataclass
class Exchange:
    """What went over the wire between the SDK and the gateway, seen by httpx's own
    event hooks on the client handed to the SDK (its documented `client=` option)."""

    sent: list[httpx.Request] = field(default_factory=list)
    answered: list[httpx.Response] = field(default_factory=list)

    def on_request(self, request: httpx.Request) -> None:
        self.sent.append(request)

    def on_response(self, response: httpx.Response) -> None:
        self.answered.append(response)

    async def on_request_async(self, request: httpx.Request) -> None:
        self.on_request(request)

    async def on_response_async(self, response: httpx.Response) -> None:
        self.on_response(response)

    def sent_body(self) -> dict[str, Any]:
        (request,) = self.sent
        data: dict[str, Any] = json.loads(request.content)
        return data

    def last_headers(self) -> httpx.Headers:
        return self.answered[-1].headers


@contextmanager
def sync_sdk() -> Iterator[tuple[SyncFriendli, Exchange]]:
    seen = Exchange()
    hooks: Any = {"request": [seen.on_request], "response": [seen.on_response]}
    with (
        httpx.Client(event_hooks=hooks, timeout=30) as client,
        SyncFriendli(token=TOKEN, client=client, retry_config=NO_RETRIES) as sdk,
    ):
        yield sdk, seen


@asynccontextmanager
async def async_sdk(
    *, token: str = TOKEN, sdk_retries: bool = False, timeout_ms: int | None = None
) -> AsyncIterator[tuple[AsyncFriendli, Exchange]]:
    """The async client; `sdk_retries`: the SDK's default retries, else none;
    `timeout_ms`: the SDK's own (else the client's 30 s)."""
    seen = Exchange()
    hooks: Any = {"request": [seen.on_request_async], "response": [seen.on_response_async]}
    async with httpx.AsyncClient(event_hooks=hooks, timeout=30) as client:
        with httpx.Client() as unused:  # the SDK makes one if not given; given, we close it
            async with AsyncFriendli(
                token=token,
                client=unused,
                async_client=client,
                retry_config=UNSET if sdk_retries else NO_RETRIES,
                timeout_ms=timeout_ms,
            ) as sdk:
                yield sdk, seen


Generate = Callable[..., Awaitable[bytes]]


@asynccontextmanager
async def sdk_calls(kind: str, url: str) -> AsyncIterator[tuple[Generate, Exchange]]:
    """`generate(**fields)` through the sync or the async client: the decoded image.
    The gateway's URL goes with every call: `container.image.generate` ignores the
    client-wide `server_url` (see test_the_client_wide_server_url_is_not_used)."""
    if kind == "sync":
        with sync_sdk() as (sdk, seen):

            def call(fields: dict[str, Any]) -> bytes:
                res = sdk.container.image.generate(server_url=url, **fields)
                return base64.b64decode(res.image)

            async def generate_sync(**fields: Any) -> bytes:
                # In a thread: the served gateway runs on this test's event loop.
                return await asyncio.to_thread(call, fields)

            yield generate_sync, seen
    else:
        async with async_sdk() as (asdk, seen):

            async def generate_async(**fields: Any) -> bytes:
                res = await asdk.container.image.generate(server_url=url, **fields)
                return base64.b64decode(res.image)

            yield generate_async, seen


def assert_worker_got_what_the_sdk_sent(
    worker: FakeWorker, sent: dict[str, Any], *, model: str | None, fmt: str, seed: int
) -> None:
    """The worker's request is one the SDK's own model accepts, field for field and
    strictly, and it is the SDK's body with the gateway's decisions filled in."""
    (received,) = worker.received
    assert set(received) <= set(ContainerImageGenerationBody.model_fields)
    ContainerImageGenerationBody.model_validate(received, strict=True)
    assert received == {**sent, "model": model, "response_format": fmt, "seed": seed}


CASES = [
    # (fields beyond the prompt, worker's model, format, X-Adapter)
    ({}, None, "jpeg", "base"),
    ({"model": "pixel-art", "response_format": "raw", "seed": 12345}, "pixel", "raw", "pixel-art"),
    ({"model": "px", "response_format": "jpeg", "seed": 0}, "pixel", "jpeg", "pixel-art"),
    (
        {"response_format": "raw", "num_inference_steps": 4, "guidance_scale": 7.5},
        None,
        "raw",
        "base",
    ),
]


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(("fields", "upstream", "fmt", "adapter"), CASES)
async def test_an_sdk_generation_through_the_gateway(
    kind: str, fields: dict[str, Any], upstream: str | None, fmt: str, adapter: str
) -> None:
    async with (
        fake_worker(draws_image) as worker,
        served_gateway(registry(worker.url)) as url,
        sdk_calls(kind, url) as (generate, seen),
    ):
        image = await generate(prompt=f"a red fox, {kind}", **fields)
    headers = seen.last_headers()
    seed = int(headers["x-seed"])  # the raw response, through the client's event hook
    if "seed" in fields:
        assert seed == fields["seed"]
    assert headers["x-adapter"] == adapter
    assert headers["x-cache"] == "miss"
    assert Image.open(io.BytesIO(image)).format == PIL_FORMAT[fmt]
    assert seen.sent[0].headers["authorization"] == f"Bearer {TOKEN}"  # the SDK's token
    assert_worker_got_what_the_sdk_sent(
        worker, seen.sent_body(), model=upstream, fmt=fmt, seed=seed
    )


COMFY_WORKFLOW = {
    "workflow": str(Path(__file__).parent.parent / "examples" / "comfyui-sd15-lora.json"),
    "prompt_node": "6",
    "sampler_node": "3",
    "lora_node": "10",
    "output_node": "9",
}


@pytest.mark.parametrize(
    ("protocol", "settings"),
    [
        ("friendli-container", {}),
        ("openai-images", {"openai": {"size": "64x64"}}),
        ("a1111", {"a1111": {"width": 64, "height": 64}}),
        ("comfyui", {"comfyui": COMFY_WORKFLOW}),
        ("cog", {"cog": {"inputs": {"width": 64, "height": 64}}}),
    ],
)
async def test_the_sdk_gets_jpeg_and_png_from_pools_of_every_protocol(
    protocol: str, settings: dict[str, Any]
) -> None:
    """The same SDK call, whatever the pool's workers speak (here their simulators, with
    the real servers' shapes): the image comes back in the format asked for."""
    options = ["--protocol", protocol, "--step-ms", "0", "--size", "64"]
    with sim_workers(options) as (sim,):
        registry = make_registry(
            {"p": [{"url": sim.url, "max_concurrency": 1}]},
            [{"name": "base", "pool": "p", "default": True}],
            sections={"auth": {"keys": [api_key("sdk-client", TOKEN)]}},
            protocol=protocol,
            **settings,
        )
        async with served_gateway(registry) as url, sdk_calls("async", url) as (generate, seen):
            for fmt in ("jpeg", "raw"):
                image = await generate(
                    prompt="a red fox",
                    num_inference_steps=4,
                    guidance_scale=7.5,
                    response_format=fmt,
                    seed=3,
                )
                picture = Image.open(io.BytesIO(image))
                assert (picture.format, picture.size) == (PIL_FORMAT[fmt], (64, 64))
                assert seen.last_headers()["x-seed"] == "3"


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_errors_surface_as_the_sdks_exception_with_the_detail_intact(kind: str) -> None:
    async with (
        fake_worker(draws_image) as worker,
        served_gateway(registry(worker.url)) as url,
        sdk_calls(kind, url) as (generate, _),
    ):
        with pytest.raises(SDKError) as unknown:
            await generate(prompt="a fox", model="sd15")
        with pytest.raises(SDKError) as invalid:
            await generate(prompt="a fox", num_inference_steps=0)  # the SDK does not check
    assert unknown.value.status_code == 404
    assert json.loads(unknown.value.body) == {
        "detail": "unknown model 'sd15'; known models: base, pixel-art"
    }
    assert invalid.value.status_code == 422
    (item,) = json.loads(invalid.value.body)["detail"]
    assert item["loc"] == ["body", "num_inference_steps"]
    assert "greater than or equal to 1" in item["msg"]
    assert "num_inference_steps" in str(invalid.value)  # the SDK's message shows the body
    assert worker.received == []


async def test_a_wrong_token_is_the_sdks_401() -> None:
    async with (
        fake_worker(draws_image) as worker,
        served_gateway(registry(worker.url)) as url,
        async_sdk(token="gw_wrong") as (sdk, _),
    ):
        with pytest.raises(SDKError) as refused:
            await sdk.container.image.generate(prompt="a fox", server_url=url)
    assert refused.value.status_code == 401
    assert refused.value.headers["www-authenticate"].startswith("Bearer")
    assert json.loads(refused.value.body)["detail"]
    assert worker.received == []


async def test_the_sdks_default_retries_wait_out_a_429_as_retry_after_says() -> None:
    """What a client with the SDK's defaults sees of a rate limit: nothing but the wait.
    The key allows one request every 2 s; of two calls sent together one is refused
    with `Retry-After`, and the SDK sends it again after that wait, successfully."""
    async with (
        fake_worker(draws_image) as worker,
        served_gateway(registry(worker.url, rate={"per_s": 0.5, "burst": 1})) as url,
        async_sdk(sdk_retries=True) as (sdk, seen),
    ):
        calls = (sdk.container.image.generate(prompt=p, server_url=url) for p in "ab")
        await asyncio.wait_for(asyncio.gather(*calls), timeout=30)
    statuses = [r.status_code for r in seen.answered]
    assert sorted(statuses) == [200, 200, 429]
    refused = seen.answered[statuses.index(429)]
    assert int(refused.headers["retry-after"]) >= 1
    assert sorted(r["prompt"] for r in worker.received) == ["a", "b"]


async def test_after_its_timeout_the_sdk_resends_and_only_a_seed_saves_the_generation() -> None:
    """What the README warns of: the SDK times out (httpx's 5 s unless `timeout_ms` is
    set; 500 ms here) and by default sends the request again. Without a seed each
    resend is a new generation on a worker (the gateway draws a new seed each time);
    with one, the resends join the generation in flight or hit the cache: one
    generation, and the call succeeds once the worker answers."""
    release = asyncio.Event()
    async with (
        fake_worker(held(release, image_answer())) as worker,
        released_at_exit(release),
        served_gateway(registry(worker.url, slots=4)) as url,
        async_sdk(sdk_retries=True, timeout_ms=500) as (sdk, seen),
    ):
        unseeded = asyncio.create_task(sdk.container.image.generate(prompt="a", server_url=url))
        await eventually(lambda: len(worker.received) >= 2, within_s=30)
        unseeded.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await unseeded
        seeds = {r["seed"] for r in worker.received}
        assert len(seeds) == len(worker.received)  # each resend: a new image

        worker.received.clear()
        seen.sent.clear()
        seeded = asyncio.create_task(
            sdk.container.image.generate(prompt="b", seed=5, server_url=url)
        )
        await eventually(lambda: len(seen.sent) >= 2, within_s=30)  # a resend
        release.set()
        res = await asyncio.wait_for(seeded, timeout=30)
    assert base64.b64decode(res.image).startswith(b"\xff\xd8")  # the worker's JPEG
    assert [r["prompt"] for r in worker.received] == ["b"]


def test_the_client_wide_server_url_is_not_used() -> None:
    """Why the README says to pass `server_url=` with each call: the SDK's container
    operations start from their own server (http://localhost:8000) and ignore the
    client's `server_url`. Seen without sending anything: a request hook stops it."""

    class Stopped(Exception):
        pass

    def stop(request: httpx.Request) -> None:
        raise Stopped(str(request.url))

    with (
        httpx.Client(event_hooks={"request": [stop]}) as client,
        SyncFriendli(
            token=TOKEN, server_url="http://127.0.0.1:1", client=client, retry_config=NO_RETRIES
        ) as sdk,
    ):
        with pytest.raises(Stopped) as default:
            sdk.container.image.generate(prompt="a fox")
        with pytest.raises(Stopped) as given:
            sdk.container.image.generate(prompt="a fox", server_url="http://127.0.0.1:2")
    assert str(default.value) == "http://localhost:8000/v1/images/generations"
    assert str(given.value) == "http://127.0.0.1:2/v1/images/generations"
