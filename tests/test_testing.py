"""The public testing kit (gateway.testing) does what its docstrings say: fake workers
answer as declared and keep what they received, servers report the port they bound,
a server in a thread serves blocking code, and the kit needs nothing test-only."""

from __future__ import annotations

import ast
import asyncio
import base64
import io
import json
import tomllib
from pathlib import Path

import aiohttp
import httpx
import pytest
from PIL import Image
from starlette.types import Receive, Scope, Send

import gateway.testing
from gateway.simworker import SimConfig, create_sim_app
from gateway.testing import (
    JPEG_ANSWER,
    PNG_ANSWER,
    Answer,
    ServedSim,
    app_for,
    fake_worker,
    fake_workers,
    gateway_server,
    hangs_up,
    registry_yaml,
    serve_in_thread,
    served_gateway,
    sim_worker,
)
from tests.support import body, eventually

GEN = "/v1/images/generations"


def image_format(answer: bytes) -> str | None:
    """The format PIL reads in a worker's `{"image": "<base64>"}` answer."""
    image = Image.open(io.BytesIO(base64.b64decode(json.loads(answer)["image"])))
    image.load()  # the whole file, not just its header
    return image.format


async def test_the_example_in_the_readme() -> None:
    async with (
        fake_worker() as worker,
        served_gateway(registry_yaml({"sdxl": [worker.url]})) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        image = await client.post(GEN, json=body(prompt="a red fox"))
        worker.answer = Answer(status=500)
        failed = await client.post(GEN, json=body(prompt="a red fox", seed=1))
    assert image.status_code == 200
    assert image_format(image.content) == "JPEG"
    assert failed.status_code == 502
    assert "worker sdxl-0" in failed.json()["detail"]
    assert worker.received[0]["prompt"] == "a red fox"


def test_the_stock_answers_are_whole_images_of_their_format() -> None:
    assert image_format(JPEG_ANSWER) == "JPEG"
    assert image_format(PNG_ANSWER) == "PNG"


async def test_a_fake_worker_answers_the_format_asked_and_keeps_what_it_received() -> None:
    async with fake_worker() as worker, httpx.AsyncClient(base_url=worker.url) as client:
        jpeg = await client.post(GEN, json=body(seed=1), headers={"X-Request-ID": "one"})
        png = await client.post(GEN, json=body(seed=2, response_format="raw"))
    assert (jpeg.status_code, png.status_code) == (200, 200)
    assert (image_format(jpeg.content), image_format(png.content)) == ("JPEG", "PNG")
    assert worker.calls == 2
    assert [r["seed"] for r in worker.received] == [1, 2]
    assert worker.headers[0]["X-Request-ID"] == "one"
    assert worker.probes == 0


async def test_a_declared_answer_is_sent_as_declared() -> None:
    answer = Answer(status=503, body='{"detail":"busy"}', delay_s=0.2, headers={"Retry-After": "3"})
    async with fake_worker(answer) as worker, httpx.AsyncClient(base_url=worker.url) as client:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        resp = await client.post(GEN, json=body())
        waited = loop.time() - sent
        worker.answer = Answer(status=500)  # replaced while serving
        default = await client.post(GEN, json=body())
    assert (resp.status_code, resp.text, resp.headers["retry-after"]) == (
        503,
        '{"detail":"busy"}',
        "3",
    )
    assert resp.headers["content-type"] == "application/json"
    page = Answer(body="<html>", headers={"content-type": "text/html"})
    async with fake_worker(page) as html, httpx.AsyncClient(base_url=html.url) as client:
        served = await client.post(GEN, json=body())
    assert served.headers.get_list("content-type") == ["text/html"]
    assert waited >= 0.2, "not answered before its delay"
    assert default.status_code == 500
    assert default.json() == {"detail": "fake worker answered 500"}


async def test_health_answers_as_the_test_switches_it_and_probes_are_counted() -> None:
    async with fake_worker(healthy=False) as worker, httpx.AsyncClient(base_url=worker.url) as c:
        down = (await c.get("/health")).status_code
        worker.healthy = True
        up = (await c.get("/health")).status_code
    assert (down, up, worker.probes) == (503, 200, 2)


async def test_a_killed_worker_cuts_its_requests_and_refuses_new_ones() -> None:
    async with (
        fake_worker(Answer(delay_s=30)) as worker,
        aiohttp.ClientSession() as session,
    ):
        in_flight = asyncio.create_task(session.post(worker.url + GEN, json=body()))
        await eventually(lambda: worker.calls == 1)  # the request has arrived
        await worker.kill()
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await asyncio.wait_for(in_flight, 10)
        with pytest.raises(aiohttp.ClientConnectorError):
            await session.post(worker.url + GEN, json=body())


async def test_hangs_up_sends_not_one_byte() -> None:
    async with fake_worker(hangs_up()) as worker:
        reader, writer = await asyncio.open_connection(*worker.url[7:].split(":"))
        payload = json.dumps(body()).encode()
        head = f"POST {GEN} HTTP/1.1\r\nHost: w\r\nContent-Length: {len(payload)}\r\n\r\n"
        writer.write(head.encode() + payload)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert answer == b""
    assert worker.calls == 1


async def test_servers_report_the_port_they_bound_and_each_url_is_its_own() -> None:
    async with fake_workers(Answer(), Answer()) as (one, two):
        texts = [registry_yaml({name: [w.url]}) for name, w in (("a", one), ("b", two))]
        async with (
            served_gateway(texts[0]) as first,
            gateway_server(texts[1]) as (second, _),
            httpx.AsyncClient() as client,
        ):
            assert first != second
            models = [(await client.get(url + "/v1/models")).json() for url in (first, second)]
    assert [[m["id"] for m in listed["data"]] for listed in models] == [["a"], ["b"]]


def test_app_for_takes_yaml_text_or_a_registry() -> None:
    app = app_for(registry_yaml({"p": ["http://127.0.0.1:1"]}))
    assert app.routes, "an app with its routes"


def test_a_server_in_a_thread_serves_blocking_code() -> None:
    app = create_sim_app(SimConfig(step_ms=1, size=16))
    with serve_in_thread(app) as url:
        resp = httpx.post(url + GEN, json=body(seed=3), timeout=10)
        stats = ServedSim(url, app).stats()
    assert resp.status_code == 200
    assert image_format(resp.content) == "JPEG"
    assert stats["generations"] == 1
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5)  # stopped at the block's end


def test_a_server_in_a_thread_that_cannot_start_says_so_at_once() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "lifespan"
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no GPU"})

    with pytest.raises(RuntimeError, match="exited during start-up"), serve_in_thread(app):
        pass


async def test_a_served_sim_worker_is_read_in_place() -> None:
    async with sim_worker() as sim, httpx.AsyncClient(base_url=sim.url) as client:
        first = await client.post(GEN, json=body(seed=5))
        again = await client.post(GEN, json=body(seed=5))
        other = await client.post(GEN, json=body(seed=6))
        stats = sim.stats()
    assert first.content == again.content != other.content, "deterministic by seed"
    assert stats["generations"] == 3


TEST_ONLY = {"tests", "_pytest", "pytest"}


def test_the_gateway_imports_nothing_that_only_the_tests_install() -> None:
    """gateway.testing ships in the package: it, like every gateway module, may use
    the runtime dependencies only, never pytest or another of the `test` extras."""
    package = Path(gateway.testing.__file__).parent
    with (package.parent / "pyproject.toml").open("rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]["test"]
    test_only = TEST_ONLY | {_import_name(spec) for spec in extras}
    assert {"hypothesis", "schemathesis", "pytest_asyncio"} <= test_only
    imported = {p.name: _top_level_imports(p) for p in sorted(package.rglob("*.py"))}
    assert "aiohttp" in imported["testing.py"], "the check reads each module's imports"
    breaches = {name: found & test_only for name, found in imported.items() if found & test_only}
    assert not breaches


def _import_name(requirement: str) -> str:
    name = requirement.split(">")[0].split("=")[0].split("[")[0].strip()
    return name.lower().replace("-", "_")


def _top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_benches_import_nothing_of_the_tests() -> None:
    """bench/ runs without the test suite: what it shares with the tests comes from
    gateway.testing."""
    bench = Path(gateway.testing.__file__).parent.parent / "bench"
    imported = {p.name: _top_level_imports(p) for p in sorted(bench.glob("*.py"))}
    assert "gateway" in imported["cache.py"], "the check reads each bench's imports"
    assert not {name for name, found in imported.items() if "tests" in found}
