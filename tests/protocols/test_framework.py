"""The parts every protocol shares: the HTTP exchange's error reading, the image
normalisation, the registry's protocol settings, the table of protocols."""

from __future__ import annotations

import base64
import io
import typing
import zlib
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web
from PIL import Image

from gateway.cache import cache_key
from gateway.causes import Cause
from gateway.cli import routing_table
from gateway.errors import ConfigError, UpstreamError, UpstreamRejected
from gateway.protocols import PROTOCOLS, deterministic, protocol_for
from gateway.protocols.http import Answer, error_message, refusal
from gateway.protocols.imaging import (
    MAX_PIXELS,
    b64_image_response,
    bytes_to_answer,
    image_response,
    sniff,
    to_answer,
)
from gateway.registry import AdapterSpec, PoolSpec, ProtocolName, parse_registry
from gateway.schema import WorkerRequest
from gateway.testing import (
    fake_worker,
    gateway,
    image_bytes,
    image_ok,
    registry_yaml,
)
from tests.support import (
    body,
    dead_url,
    local_pipeline,
    make_registry,
    the_pool,
)

PATH = "/v1/images/generations"


def test_every_protocol_name_has_a_protocol_and_back() -> None:
    assert set(typing.get_args(ProtocolName)) == set(PROTOCOLS)
    for name, protocol in PROTOCOLS.items():
        assert protocol.name == name


# -- error bodies, read into one line ---------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # OpenAI's shape (platform.openai.com/docs/guides/error-codes), vLLM's too
        (
            b'{"error": {"message": "Invalid size", "type": "invalid_request_error"}}',
            "Invalid size",
        ),
        # FastAPI's HTTPException (vLLM-Omni, AUTOMATIC1111 with its class name)
        (b'{"detail": "Sampler not found"}', "Sampler not found"),
        (
            b'{"error": "HTTPException", "detail": "Sampler not found", "body": "", '
            b'"errors": "400: Sampler not found"}',
            "Sampler not found",
        ),
        # FastAPI's 422: where and what, the body's location left out
        (
            b'{"detail": [{"loc": ["body", "guidance_scale"], "msg": "Input should be less '
            b'than or equal to 20", "type": "less_than_equal"}]}',
            "guidance_scale: Input should be less than or equal to 20",
        ),
        (b'{"message": "busy"}', "busy"),
        (b'{"error": "model not loaded"}', "model not loaded"),
        (b"plain words\n on two lines", "plain words on two lines"),
        (b'{"detail": "bad lora Traceback (most recent call last):\\n File /srv/x"}', "bad lora"),
        (b"", "(no message)"),
        (b"[[[[" * 10_000, "[[[[" * 75),  # not JSON (too deep): its text, cut short
    ],
)
def test_error_bodies_read_into_one_short_line(body: bytes, message: str) -> None:
    assert error_message(body) == message


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (400, {}, "rejected 400"),
        (422, {}, "rejected 422"),
        (404, {}, "rejected 404"),
        (429, {}, Cause.HTTP_429),
        (503, {"Retry-After": "3"}, Cause.HTTP_503_BUSY),
        (503, {}, Cause.HTTP_503),
        (500, {}, Cause.HTTP_5XX),
        (408, {}, Cause.BAD_ANSWER),
        (302, {}, Cause.BAD_ANSWER),
    ],
)
def test_a_refusal_is_the_client_s_4xx_or_a_cause(
    status: int, headers: dict[str, str], expected: object
) -> None:
    error = refusal(Answer(status, headers, b'{"detail": "no"}'), "w-0")
    if isinstance(expected, Cause):
        assert isinstance(error, UpstreamError)
        assert error.cause is expected
        assert "no" not in str(error.detail).removeprefix("worker w-0")  # body not shown
    else:
        assert isinstance(error, UpstreamRejected)
        assert f"rejected {error.status_code}" == expected
        assert error.detail == "worker rejected the request: no"


# -- images: passed through when they match, re-encoded when not -------------------------


def _decoded(body: bytes) -> bytes:
    assert body.startswith(b'{"image":"')
    return base64.b64decode(body[len(b'{"image":"') : -2])


@pytest.mark.parametrize("fmt", ["jpeg", "raw"])
def test_an_image_in_the_format_asked_passes_through_byte_for_byte(fmt: typing.Any) -> None:
    image = image_bytes(fmt, side=32)
    assert _decoded(image_response(image, fmt, jpeg_quality=90, worker="w")) == image
    encoded = base64.b64encode(image)
    assert b64_image_response(encoded, fmt, jpeg_quality=90, worker="w") == (
        b'{"image":"' + encoded + b'"}'
    )


@pytest.mark.parametrize(
    ("given", "asked", "name"), [("raw", "jpeg", "JPEG"), ("jpeg", "raw", "PNG")]
)
def test_an_image_in_the_other_format_is_re_encoded(
    given: typing.Any, asked: typing.Any, name: str
) -> None:
    image = image_bytes(given, side=32)
    body = b64_image_response(base64.b64encode(image), asked, jpeg_quality=80, worker="w")
    out = _decoded(body)
    assert sniff(out) == name
    assert Image.open(io.BytesIO(out)).size == (32, 32)


def test_webp_and_rgba_become_jpeg() -> None:
    out = io.BytesIO()
    Image.new("RGBA", (16, 16), (255, 0, 0, 128)).save(out, format="WEBP")
    body = image_response(out.getvalue(), "jpeg", jpeg_quality=90, worker="w")
    assert Image.open(io.BytesIO(_decoded(body))).mode == "RGB"


def test_jpeg_quality_is_the_pool_s() -> None:
    png = image_bytes("raw", side=64)
    low = image_response(png, "jpeg", jpeg_quality=10, worker="w")
    high = image_response(png, "jpeg", jpeg_quality=95, worker="w")
    assert len(low) < len(high)


def _pixels_claimed(width: int, height: int) -> bytes:
    """A real PNG whose header (IHDR, its checksum too) claims width x height."""
    png = bytearray(image_bytes("raw", side=8))
    png[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    png[29:33] = zlib.crc32(png[12:29]).to_bytes(4, "big")
    return bytes(png)


@pytest.mark.parametrize(
    ("image", "phrase"),
    [
        (b"GIF89a not really", "a GIF that does not decode"),
        (b"<html>oops</html>", "an image of no known format"),
        (b"", "an empty image"),
        (image_bytes("raw", side=32)[:200], "a PNG that does not decode"),
        (_pixels_claimed(9000, 9000), f"over {MAX_PIXELS} pixels"),
    ],
)
def test_an_image_that_does_not_decode_is_a_bad_answer(image: bytes, phrase: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        image_response(image, "jpeg", jpeg_quality=90, worker="w-1")
    assert caught.value.cause is Cause.BAD_ANSWER
    assert caught.value.detail.startswith("worker w-1: answered 200 with ")
    assert phrase in caught.value.detail


def test_base64_that_is_not_is_a_bad_answer() -> None:
    with pytest.raises(UpstreamError, match="not base64"):
        b64_image_response(b"iVBO%%%%", "jpeg", jpeg_quality=90, worker="w")
    # An image of the format asked, cut short: the answer check still reads its end.
    cut = base64.b64encode(image_bytes("jpeg", side=32))[:-40]
    with pytest.raises(UpstreamError, match="cut short"):
        b64_image_response(cut, "jpeg", jpeg_quality=90, worker="w")


# -- the registry's protocol settings ----------------------------------------------------


def test_jpeg_quality_is_validated() -> None:
    assert PoolSpec().jpeg_quality == 90
    for bad in (0, 96):
        text = registry_yaml({"p": [dead_url()]}, jpeg_quality=bad)
        with pytest.raises(ConfigError, match=r"pools\.p\.jpeg_quality"):
            parse_registry(text)


def test_a_lora_weight_where_no_protocol_takes_one_is_refused() -> None:
    adapters = [{"name": "a", "pool": "p", "upstream_model": "a", "lora_weight": 0.5}]
    text = registry_yaml({"p": [dead_url()]}, adapters)
    with pytest.raises(ConfigError, match=r":\d+: adapters\.0\.lora_weight: pool 'p' speaks"):
        parse_registry(text)


def test_deterministic_is_the_adapter_s_word_else_the_protocol_s() -> None:
    pool = PoolSpec()
    assert deterministic(AdapterSpec(name="a", pool="p"), pool)
    assert not deterministic(AdapterSpec(name="a", pool="p", deterministic=False), pool)


def test_a_pool_without_a_variant_keeps_the_key_it_had() -> None:
    adapter = AdapterSpec(name="a", pool="p")
    job = WorkerRequest(
        prompt="x",
        num_inference_steps=4,
        guidance_scale=7.5,
        model=None,
        response_format="jpeg",
        seed=1,
    )
    assert protocol_for("friendli-container").variant(adapter, PoolSpec()) is None
    plain = cache_key(adapter, job, namespace="n")
    assert cache_key(adapter, job, namespace="n", variant=None) == plain
    assert cache_key(adapter, job, namespace="n", variant="x") != plain


# -- probes send the pool's credentials ---------------------------------------------------


async def test_a_probe_carries_the_pool_s_headers() -> None:
    async def unused(request: web.Request) -> web.StreamResponse:
        raise AssertionError("no generation in this test")

    async with fake_worker(unused) as worker:
        registry = make_registry(
            {"p": [worker.url]}, headers={"Authorization": "Bearer pool-secret"}
        )
        async with local_pipeline(registry) as (pipeline, prober):
            assert await prober.probe_due() == 1
            assert [h.get("Authorization") for h in worker.probe_headers] == ["Bearer pool-secret"]
            assert the_pool(pipeline).workers[0].health.good_probes == 1


# -- seeds that a server does not honour: not cached ---------------------------------------


@pytest.mark.parametrize(("cache_anyway", "second"), [(False, "bypass"), (True, "hit")])
async def test_a_nondeterministic_adapter_is_not_cached_unless_told(
    cache_anyway: bool, second: str
) -> None:
    async with fake_worker(image_ok()) as worker:
        adapter = {
            "name": "a",
            "pool": "p",
            "default": True,
            "deterministic": False,
            "cache_nondeterministic": cache_anyway,
        }
        async with gateway(make_registry({"p": [worker.url]}, [adapter])) as gw:
            answers = [await gw.client.post(PATH, json=body(seed=3)) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    assert [a.headers["x-cache"] for a in answers] == [
        "bypass" if not cache_anyway else "miss",
        second,
    ]
    assert all(a.headers["x-seed"] == "3" for a in answers)
    assert len(worker.received) == (2 if not cache_anyway else 1)


def test_check_prints_how_each_adapter_is_chosen() -> None:
    adapters: list[dict[str, typing.Any]] = [
        {"name": "base", "pool": "p", "deterministic": False},
        {"name": "pix", "pool": "p", "upstream_model": "pixel-art"},
    ]
    table = routing_table(make_registry({"p": [dead_url()]}, adapters))
    assert (
        "base -> pool p (friendli-container), model=null (the base model); "
        "not deterministic: not cached" in table
    )
    assert "pix -> pool p (friendli-container), model=pixel-art\n" in table


async def test_a_probe_reads_an_answer_as_large_as_a_worker_may_send() -> None:
    """A health route that answers a lot (some echo a body, a static responder answers
    every route alike) is still healthy: probes read up to max_response_bytes."""

    async def health(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"x" * 200_000)

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            probe = protocol_for("friendli-container").probe
            timeout = aiohttp.ClientTimeout(total=5)
            big = await probe(session, url, timeout=timeout, headers={}, pool=PoolSpec())
            small = PoolSpec(max_response_bytes=100_000)
            over = await probe(session, url, timeout=timeout, headers={}, pool=small)
    finally:
        await runner.cleanup()
    assert (big, over) == ("ok", "down")


def test_a_registry_written_out_whole_loads_again() -> None:
    """Every settings block is in a dump (at its defaults where the pool's protocol is
    another): reading it back must not refuse them."""
    registry = parse_registry(Path("adapters.yaml").read_text())
    again = parse_registry(yaml.safe_dump(registry.model_dump(mode="json", exclude={"digest"})))
    assert again.pools == registry.pools


async def test_the_async_helpers_pass_through_or_re_encode() -> None:
    jpeg, png = image_bytes("jpeg", side=16), image_bytes("raw", side=16)
    same = await bytes_to_answer(jpeg, "jpeg", jpeg_quality=90, worker="w")
    other = await bytes_to_answer(jpeg, "raw", jpeg_quality=90, worker="w")
    assert _decoded(same) == jpeg
    assert sniff(_decoded(other)) == "PNG"
    assert await to_answer(base64.b64encode(png), "raw", jpeg_quality=90, worker="w") == (
        b'{"image":"' + base64.b64encode(png) + b'"}'
    )
    encoded = await to_answer(base64.b64encode(png), "jpeg", jpeg_quality=90, worker="w")
    assert sniff(_decoded(encoded)) == "JPEG"
