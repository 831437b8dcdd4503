"""a1111: AUTOMATIC1111's txt2img API (also Forge and SD.Next).

Translation both ways (unit), full requests through a served gateway to the simulated
server of this protocol, errors, probes, one job at a time, and the cache key."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import zlib
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from PIL import Image, PngImagePlugin

from gateway.cache import cache_key
from gateway.causes import Cause
from gateway.errors import ConfigError, UpstreamError
from gateway.protocols import protocol_for
from gateway.protocols.a1111 import client_body, first_image, request_body
from gateway.protocols.imaging import PNG_BLANK, sniff, strip_jpeg_metadata
from gateway.registry import A1111Settings, AdapterSpec, PoolSpec, parse_registry
from gateway.schema import WorkerRequest
from gateway.testing import (
    answers,
    fake_worker,
    registry_yaml,
    served_gateway,
)
from tests.support import (
    body,
    dead_url,
    eventually,
    make_registry,
    sim_workers,
)

PATH = "/v1/images/generations"
TXT2IMG = "/sdapi/v1/txt2img"
PROGRESS = "/sdapi/v1/progress"
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


PIXEL = AdapterSpec(name="pixel", pool="p", upstream_model="pixel-art")
BASE = AdapterSpec(name="base", pool="p")


# -- our request -> theirs ---------------------------------------------------------------


def test_the_request_is_txt2img_with_the_lora_tag_appended() -> None:
    assert request_body(job(model="pixel-art"), PIXEL, A1111Settings(lora_weight=0.8)) == {
        "prompt": "a red fox <lora:pixel-art:0.8>",
        "seed": 7,
        "steps": 20,
        "cfg_scale": 7.5,
        "width": 512,
        "height": 512,
        "sampler_name": "Euler",
        "batch_size": 1,
        "n_iter": 1,
        "send_images": True,
        "save_images": False,
    }


def test_the_adapter_s_weight_wins_and_the_base_model_has_no_tag() -> None:
    settings = A1111Settings(
        sampler_name="DPM++ 2M",
        scheduler="Karras",
        width=1024,
        height=768,
        negative_prompt="blurry",
        extra_fields={"override_settings": {"CLIP_stop_at_last_layers": 2}},
    )
    own = AdapterSpec(name="pixel", pool="p", upstream_model="pixel-art", lora_weight=0.35)
    sent = request_body(job(seed=0), own, settings)
    assert sent["prompt"] == "a red fox <lora:pixel-art:0.35>"
    assert sent["seed"] == 0  # a seed like any other to A1111; -1 is its "random"
    assert (sent["sampler_name"], sent["scheduler"]) == ("DPM++ 2M", "Karras")
    assert (sent["width"], sent["height"], sent["negative_prompt"]) == (1024, 768, "blurry")
    assert sent["override_settings"] == {"CLIP_stop_at_last_layers": 2}
    assert request_body(job(), BASE, settings)["prompt"] == "a red fox"


# -- their answer -> ours ----------------------------------------------------------------


def a1111_png(text: str = "a red fox\nSteps: 20, Model: sd_xl_base_1.0, Version: v1.10.1") -> bytes:
    """A PNG as A1111 writes one: its generation parameters in a text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    out = io.BytesIO()
    Image.frombytes("RGB", (16, 16), bytes(range(256)) * 3).save(out, "PNG", pnginfo=info)
    return out.getvalue()


def txt2img_answer(image: bytes) -> bytes:
    """TextToImageResponse (modules/api/models.py): images, parameters, info (a JSON
    string of the processed job), in that order, as the API writes it."""
    info = {"prompt": "a red fox", "seed": 7, "infotexts": ["a red fox\nSteps: 20"]}
    answer = {
        "images": [base64.b64encode(image).decode()],
        "parameters": {"prompt": "a red fox", "seed": 7, "steps": 20},
        "info": json.dumps(info),
    }
    return json.dumps(answer).encode()


def test_the_first_image_is_read_out_of_the_answer() -> None:
    image = a1111_png()
    assert first_image(txt2img_answer(image), "w") == base64.b64encode(image)
    # Escaped slashes: sliced text with a backslash is parsed instead.
    escaped = txt2img_answer(image).replace(b"/", b"\\/")
    assert first_image(escaped, "w") == base64.b64encode(image)


@pytest.mark.parametrize(
    ("answer", "phrase"),
    [
        (b'{"images": [], "parameters": {}, "info": ""}', "without an image (no images[0])"),
        (b'{"images": null}', "without an image (no images[0])"),
        (b"<html>", "with HTML, not JSON"),
    ],
)
def test_an_answer_without_an_image_is_a_bad_answer(answer: bytes, phrase: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        first_image(answer, "w-0")
    assert caught.value.cause is Cause.BAD_ANSWER
    assert caught.value.detail == f"worker w-0: answered 200 {phrase}"


def decoded_body(answer: bytes) -> bytes:
    return base64.b64decode(json.loads(answer)["image"])


def test_a_png_passes_without_its_parameters_and_jpeg_is_re_encoded() -> None:
    image = a1111_png()
    png = decoded_body(client_body(base64.b64encode(image), "raw", 90, "w"))
    assert b"sd_xl_base_1.0" in image
    assert b"sd_xl_base_1.0" not in png
    assert Image.open(io.BytesIO(png)).tobytes() == Image.open(io.BytesIO(image)).tobytes()
    jpeg = decoded_body(client_body(base64.b64encode(image), "jpeg", 90, "w"))
    assert sniff(jpeg) == "JPEG"
    assert b"sd_xl_base_1.0" not in jpeg


def png_chunks(png: bytes) -> list[tuple[bytes, bytes, bool]]:
    """(type, data, CRC valid) of each chunk, in order."""
    chunks, at = [], 8
    while at < len(png):
        length = int.from_bytes(png[at : at + 4], "big")
        kind, data = png[at + 4 : at + 8], png[at + 8 : at + 8 + length]
        crc = int.from_bytes(png[at + 8 + length : at + 12 + length], "big")
        chunks.append((kind, data, zlib.crc32(kind + data) == crc))
        at += 12 + length
    return chunks


def chunk_offsets(png: bytes) -> list[tuple[bytes, int]]:
    offsets, at = [], 8
    for kind, data, _ in png_chunks(png):
        offsets.append((kind, at))
        at += 12 + len(data)
    return offsets


def test_a_png_s_text_chunks_are_blanked_in_place() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a red fox\nSteps: 20, Model: sd_xl_base_1.0..")
    info.add_itxt("Description", "a red fox, sd_xl_base_1.0", lang="en")
    info.add_text("Software", "sd_xl_base_1.0 " * 40, zip=True)  # zTXt
    info.add(b"gAMA", (45455).to_bytes(4, "big"))  # not text: stays as it is
    out = io.BytesIO()
    picture = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    picture.save(out, "PNG", pnginfo=info)
    image = out.getvalue()
    before = png_chunks(image)
    # The three text chunks start at byte offsets 0, 1 and 2 mod 3: each place a chunk
    # can stand in its base64 quanta.
    texts = [at % 3 for kind, at in chunk_offsets(image) if kind in (b"tEXt", b"iTXt", b"zTXt")]
    assert sorted(texts) == [0, 1, 2]
    assert {b"tEXt", b"iTXt", b"zTXt", b"gAMA"} <= {kind for kind, _, _ in before}
    png = decoded_body(client_body(base64.b64encode(image), "raw", 90, "w"))
    assert len(png) == len(image)
    after = png_chunks(png)
    assert all(valid for _, _, valid in after)
    for (kind, data, _), (new_kind, new_data, _) in zip(before, after, strict=True):
        if kind in (b"tEXt", b"iTXt", b"zTXt"):
            assert (new_kind, new_data) == (PNG_BLANK, bytes(len(data)))
        else:
            assert (new_kind, new_data) == (kind, data)
    assert b"sd_xl_base_1.0" not in png
    opened = Image.open(io.BytesIO(png))
    assert not {"parameters", "Description", "Software"} & set(opened.info)
    assert opened.tobytes() == picture.tobytes()


def test_a_png_without_text_passes_as_it_came() -> None:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out, "PNG")
    encoded = base64.b64encode(out.getvalue())
    assert client_body(encoded, "raw", 90, "w") == b'{"image":"' + encoded + b'"}'


def _cut_iend(png: bytes) -> bytes:
    return png[:-12]


def _huge_chunk(png: bytes) -> bytes:
    return png[:8] + (2**31).to_bytes(4, "big") + png[12:]


@pytest.mark.parametrize(
    ("broken", "phrase"),
    [
        (_cut_iend, "with a PNG cut short (no IEND chunk)"),
        (lambda png: png[:40], "with a PNG cut short (no IEND chunk)"),
        (lambda png: png[:8] + b"\x00\x00\xff\xff" + png[12:], "with a PNG whose chunks run"),
        (_huge_chunk, "with a PNG whose chunks run past its end"),
        (lambda png: png + b"junk", "with bytes after the PNG's IEND chunk"),
    ],
)
def test_a_png_whose_chunks_do_not_parse_is_a_bad_answer(broken: Any, phrase: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        client_body(base64.b64encode(broken(a1111_png())), "raw", 90, "w-0")
    assert caught.value.cause is Cause.BAD_ANSWER
    assert caught.value.detail is not None
    assert caught.value.detail.startswith(f"worker w-0: answered 200 {phrase}")


def test_a_png_that_is_not_base64_is_a_bad_answer() -> None:
    encoded = bytearray(base64.b64encode(a1111_png()))
    encoded[40:44] = b"!!!!"  # in the text chunk's head
    with pytest.raises(UpstreamError) as caught:
        client_body(bytes(encoded), "raw", 90, "w-0")
    assert caught.value.cause is Cause.BAD_ANSWER
    assert "not base64" in str(caught.value.detail)


async def test_a_malformed_png_through_the_gateway_is_a_502() -> None:
    answer = txt2img_answer(_cut_iend(a1111_png())).decode()
    async with fake_worker(answers(200, answer), path=TXT2IMG, health_path=PROGRESS) as worker:
        registry = make_registry({"p": [worker.url]}, protocol="a1111", max_retries=0)
        async with served_gateway(registry) as url, httpx.AsyncClient(timeout=30) as client:
            resp = await client.post(url + PATH, json=body(response_format="raw"))
    assert resp.status_code == 502
    assert resp.json()["detail"] == (
        "adapter 'p': worker p-0: answered 200 with a PNG cut short (no IEND chunk)"
    )


def test_a_jpeg_or_webp_server_is_served_too() -> None:
    """samples_format jpg or webp: A1111 writes the parameters into Exif."""
    exif = Image.Exif()
    exif[0x010E] = "Model: sd_xl_base_1.0"  # ImageDescription
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(out, "JPEG", exif=exif, comment=b"Version: v1")
    jpeg = out.getvalue()
    stripped = decoded_body(client_body(base64.b64encode(jpeg), "jpeg", 90, "w"))
    assert b"sd_xl_base_1.0" in jpeg
    assert b"sd_xl_base_1.0" not in stripped
    assert b"Version: v1" not in stripped
    assert stripped == strip_jpeg_metadata(jpeg)
    webp = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(webp, "WEBP")
    png = decoded_body(client_body(base64.b64encode(webp.getvalue()), "raw", 90, "w"))
    assert sniff(png) == "PNG"


# -- the pool's settings -------------------------------------------------------------------


def a1111_yaml(adapters: list[dict[str, Any]] | None = None, **a1111: Any) -> str:
    return registry_yaml({"p": [dead_url()]}, adapters, protocol="a1111", a1111=a1111)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            registry_yaml({"p": [dead_url()]}, a1111={"width": 1024}),
            r":\d+: pools\.p\.a1111: settings for a1111, but this pool speaks friendli-container",
        ),
        (a1111_yaml(width=500), r"pools\.p\.a1111\.width: Input should be a multiple of 8"),
        (a1111_yaml(extra_fields={"seed": 1}), r"extra_fields may not set seed"),
        (a1111_yaml(lora_weight=11), r"pools\.p\.a1111\.lora_weight"),
        (
            a1111_yaml([{"name": "a", "pool": "p", "upstream_model": "x:y"}]),
            r":\d+: adapters\.0\.upstream_model: .*cannot hold a ':'",
        ),
        (
            a1111_yaml([{"name": "a", "pool": "p", "lora_weight": 0.5}]),
            r"adapters\.0\.lora_weight: a LoRA weight needs the LoRA's name",
        ),
    ],
)
def test_bad_a1111_settings_are_refused_naming_line_and_key(text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_registry(text)


def test_check_shows_the_lora_tag() -> None:
    protocol, pool = protocol_for("a1111"), PoolSpec(protocol="a1111")
    assert protocol.selection(PIXEL, pool) == "prompt + <lora:pixel-art:1>"
    assert protocol.selection(BASE, pool) == "no LoRA tag (the checkpoint alone)"


def test_the_cache_key_holds_the_lora_weight_and_the_image_settings() -> None:
    protocol, request = protocol_for("a1111"), job(model="pixel-art")
    variants = [
        (PIXEL, PoolSpec(protocol="a1111")),
        (PIXEL, PoolSpec(protocol="a1111", a1111=A1111Settings(lora_weight=0.5))),
        (PIXEL.model_copy(update={"lora_weight": 0.7}), PoolSpec(protocol="a1111")),
        (PIXEL, PoolSpec(protocol="a1111", a1111=A1111Settings(sampler_name="DDIM"))),
        (PIXEL, PoolSpec()),  # the same adapter on a friendli-container pool
    ]
    keys = {
        cache_key(
            adapter,
            request,
            namespace="n",
            variant=protocol_for(pool.protocol).variant(adapter, pool),
        )
        for adapter, pool in variants
    }
    assert len(keys) == len(variants)
    assert protocol.variant(PIXEL, PoolSpec(protocol="a1111", jpeg_quality=50)) == protocol.variant(
        PIXEL, PoolSpec(protocol="a1111")
    )


# -- through a served gateway, to the simulated server ------------------------------------


def sim_registry(url: str, **pool: Any) -> Any:
    adapters: list[dict[str, Any]] = [
        {"name": "sd", "pool": "a", "default": True},
        {"name": "pixel", "pool": "a", "upstream_model": "pixel-art", "lora_weight": 0.8},
    ]
    settings = {"width": 80, "height": 64, "sampler_name": "DPM++ 2M"}
    return make_registry(
        {"a": [{"url": url, "max_concurrency": 1}]},
        adapters,
        protocol="a1111",
        a1111=settings,
        **pool,
    )


async def post(client: httpx.AsyncClient, **overrides: Any) -> httpx.Response:
    return await client.post(PATH, json=body(**overrides), headers=NO_STORE)


async def test_jpeg_png_seed_and_lora_through_the_gateway() -> None:
    options = ["--protocol", "a1111", "--step-ms", "0", "--adapters", "pixel-art"]
    with sim_workers(options) as (sim,):
        async with (
            served_gateway(sim_registry(sim.url)) as url,
            httpx.AsyncClient(base_url=url, timeout=30) as client,
        ):
            jpeg = await post(client, seed=5)
            png = await post(client, seed=5, response_format="raw")
            again = await post(client, seed=5, response_format="raw")
            other = await post(client, seed=6, response_format="raw")
            lora = await post(client, seed=5, response_format="raw", model="pixel")
            stats = sim.stats()
    for resp, fmt in ((jpeg, "JPEG"), (png, "PNG")):
        assert resp.status_code == 200, resp.text
        image = Image.open(io.BytesIO(base64.b64decode(resp.json()["image"])))
        assert (image.format, image.size) == (fmt, (80, 64))
        assert "parameters" not in image.info  # A1111's infotext never reaches the client
        assert resp.headers["x-seed"] == "5"
    images = [base64.b64decode(r.json()["image"]) for r in (png, again, other, lora)]
    assert images[0] == images[1] != images[2]
    assert images[3] != images[0]
    assert stats["requests_by_adapter"] == {"": 4, "pixel-art:0.8": 1}


async def test_one_job_at_a_time() -> None:
    options = ["--protocol", "a1111", "--step-ms", "20", "--concurrency", "4"]
    with sim_workers(options) as (sim,):
        async with (
            served_gateway(sim_registry(sim.url)) as url,
            httpx.AsyncClient(base_url=url, timeout=30) as client,
        ):
            done = await asyncio.gather(*(post(client, seed=i) for i in range(4)))
            stats = sim.stats()
    assert [r.status_code for r in done] == [200] * 4
    assert stats["max_in_flight"] == 1  # max_concurrency 1: the gateway queues, not A1111


async def test_a_client_s_own_lora_tags_are_refused() -> None:
    with sim_workers(["--protocol", "a1111", "--step-ms", "0"]) as (sim,):
        async with (
            served_gateway(sim_registry(sim.url)) as url,
            httpx.AsyncClient(base_url=url, timeout=30) as client,
        ):
            resp = await post(client, prompt="a fox <lora:someone-elses:1.5>")
            stats = sim.stats()
    assert resp.status_code == 422
    assert resp.json()["detail"] == (
        "adapter 'sd': prompt: extra-network tags such as <lora:...> are not allowed; "
        "the adapter (model) chooses the LoRA"
    )
    assert stats["generations"] == 0


@pytest.mark.parametrize(
    ("options", "status", "detail"),
    [
        (
            [],
            400,
            "adapter 'sd': worker rejected the request: Sampler not found",
        ),
        (["--fail-rate", "1"], 502, "adapter 'sd': worker a-0: HTTP 500"),
    ],
)
async def test_the_server_s_errors(options: list[str], status: int, detail: str) -> None:
    with sim_workers(["--protocol", "a1111", "--step-ms", "0", *options]) as (sim,):
        registry = sim_registry(sim.url, max_retries=0)
        if not options:  # a sampler this server does not have
            registry = make_registry(
                {"a": [sim.url]}, protocol="a1111", a1111={"sampler_name": "Nope"}, max_retries=0
            )
            detail = detail.replace("'sd'", "'a'")
        async with served_gateway(registry) as url, httpx.AsyncClient(timeout=30) as client:
            resp = await client.post(url + PATH, json=body())
    assert (resp.status_code, resp.json()["detail"]) == (status, detail)
    assert "CUDA" not in resp.text


async def test_an_answer_without_images_is_a_bad_answer() -> None:
    handler = answers(200, '{"images": [], "parameters": {}, "info": "{}"}')
    async with fake_worker(handler, path=TXT2IMG, health_path=PROGRESS) as worker:
        registry = make_registry({"p": [worker.url]}, protocol="a1111", max_retries=0)
        async with served_gateway(registry) as url, httpx.AsyncClient(timeout=30) as client:
            resp = await client.post(url + PATH, json=body())
    assert resp.status_code == 502
    assert resp.json()["detail"] == (
        "adapter 'p': worker p-0: answered 200 without an image (no images[0])"
    )
    sent = worker.received[0]
    assert (sent["sampler_name"], sent["batch_size"], sent["save_images"]) == ("Euler", 1, False)


# -- probes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "status", "said"),
    [
        ({"progress": 0, "eta_relative": 0, "state": {"job_count": 0}}, 200, "ok"),
        ({"progress": 0.4, "eta_relative": 3, "state": {"job_count": 1}}, 200, "busy"),
        ({"detail": "Not Found"}, 404, "down"),
        ({"unexpected": True}, 200, "ok"),
        ([1, 2], 200, "down"),
    ],
)
async def test_the_probe_reads_progress(answer: Any, status: int, said: str) -> None:
    seen: list[str] = []

    async def progress(request: web.Request) -> web.StreamResponse:
        seen.append(request.path_qs)
        return web.json_response(answer, status=status)

    app = web.Application()
    app.router.add_get("/sdapi/v1/progress", progress)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            result = await protocol_for("a1111").probe(
                session,
                url,
                timeout=aiohttp.ClientTimeout(total=5),
                headers={"Authorization": "Basic dTpw"},
                pool=PoolSpec(protocol="a1111"),
            )
    finally:
        await runner.cleanup()
    assert (result, seen) == (said, ["/sdapi/v1/progress?skip_current_image=true"])


async def test_the_sim_s_progress_says_busy_while_it_draws() -> None:
    options = ["--protocol", "a1111", "--step-ms", "100", "--concurrency", "1"]
    with sim_workers(options) as (sim,):
        async with aiohttp.ClientSession() as session:
            probe = protocol_for("a1111").probe
            kwargs: dict[str, Any] = {
                "timeout": aiohttp.ClientTimeout(total=5),
                "headers": {},
                "pool": PoolSpec(protocol="a1111"),
            }
            idle = await probe(session, sim.url, **kwargs)
            job = asyncio.ensure_future(
                session.post(sim.url + TXT2IMG, json={"prompt": "x", "steps": 20})
            )
            await eventually(lambda: sim.stats()["in_flight"] > 0)
            busy = await probe(session, sim.url, **kwargs)
            (await job).release()
    assert (idle, busy) == ("ok", "busy")
