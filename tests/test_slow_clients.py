"""Slow clients against the real gateway server on loopback (issue 9): heads and bodies
that come too slowly are cut off with 408, idle connections are closed, connections
over `limits.max_connections` get 503, and a normal client is served meanwhile.

The registry's timeouts are short (head 1 s, body 1 s, body gap and keep-alive
0.5 s) so that hundreds of connections are held and cut within seconds. Each cut is
checked against its timeout plus a generous margin (hundreds of connections share two
cores with the server), never as a speed figure: bench/slow_clients.py measures the
normal client's latency.
"""

from __future__ import annotations

import asyncio
import json
import resource
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.registry import Registry
from gateway.server import CUTOFFS
from gateway.testing import (
    JPEG_ANSWER,
    delayed,
    fake_worker,
    gateway_server,
    image_ok,
    registry_yaml,
    served_gateway,
)
from tests.support import body, dead_url, gateway_process, make_registry, parse_raw, raw_exchange

HEAD_S, BODY_S, IDLE_S, KEEPALIVE_S = 1.0, 1.0, 0.5, 0.5
MARGIN_S = 4.0
GIVE_UP_S = HEAD_S + BODY_S + MARGIN_S + 2  # a client still open then was never cut
POST = b"POST /v1/images/generations HTTP/1.1\r\nHost: gateway\r\n"
PAYLOAD = json.dumps(body()).encode()
FILES_NEEDED = 4096  # 600 slow clients, each an fd here and one in the server


def registry(worker_url: str, **limits: float) -> Registry:
    section = {
        "head_timeout_s": HEAD_S,
        "body_timeout_s": BODY_S,
        "body_idle_s": IDLE_S,
        "keepalive_idle_s": KEEPALIVE_S,
        **limits,
    }
    return make_registry({"p": [worker_url]}, sections={"limits": section})


@pytest.fixture
def enough_files() -> Iterator[None]:
    """This process's soft open-files limit raised for the test (and put back): the
    clients and the server share it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, FILES_NEEDED))
    if wanted < FILES_NEEDED:
        pytest.fail(f"needs {FILES_NEEDED} open files; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@dataclass
class Cut:
    """What one slow client saw: seconds from its clock's start to the server's close
    (None: still open when it gave up), and every byte it was answered."""

    after_s: float | None
    answer: bytes

    def status(self) -> int:
        return parse_raw(self.answer)[0]

    def detail(self) -> str:
        detail: str = json.loads(parse_raw(self.answer)[2])["detail"]
        return detail


async def _read_until_closed(reader: asyncio.StreamReader) -> bytes:
    data = b""
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except ConnectionResetError:  # closed with our bytes unread: the answer came first
        pass
    return data


async def slow_client(
    url: str,
    first: bytes,
    then: bytes = b"",
    *,
    every_s: float = 0.2,
    clock_from_first: bool = False,
    after_response: bool = False,
) -> Cut:
    """Connects, sends `first`, then `then` every `every_s` until the server closes.
    The clock starts where the server's own cannot have started yet, so a busy event
    loop here never makes a cut look early: before connecting (a head's timer starts
    at the connection), or before `first` is sent (a body's timer starts once the head
    is in; with `after_response`, `first` is a whole request and the keep-alive timer
    starts once its answer is out)."""
    host, port = url.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        if after_response or clock_from_first:
            started = loop.time()
        writer.write(first)
        if after_response:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readuntil(b"}")  # /healthz's JSON body
        elif clock_from_first:
            await writer.drain()
        answer = asyncio.create_task(_read_until_closed(reader))
        while loop.time() - started < GIVE_UP_S:
            done, _ = await asyncio.wait([answer], timeout=every_s)
            if done:
                return Cut(loop.time() - started, answer.result())
            if then:
                writer.write(then)
        answer.cancel()
        return Cut(None, b"")
    finally:
        writer.close()


def dribbling_head(url: str) -> asyncio.Task[Cut]:
    """A head one header line at a time, every 0.2 s: never complete."""
    return asyncio.create_task(slow_client(url, POST, b"X-Dribble: v\r\n"))


def stalled_body(url: str) -> asyncio.Task[Cut]:
    """A whole head promising 5000 bytes of body, then 10 of them and nothing more."""
    head = POST + b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
    return asyncio.create_task(slow_client(url, head + b'{"prompt":', clock_from_first=True))


async def metrics_once_served(url: str, within_s: float = 10.0) -> str:
    """GET /metrics, again until it is served: the connections a test just closed
    leave the server's count when it notices, and until then a new one may be over
    the cap."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    async with httpx.AsyncClient(base_url=url) as client:
        while True:
            try:
                answer = await client.get("/metrics")
                if answer.status_code == 200:
                    return answer.text
            except httpx.HTTPError:
                pass
            assert loop.time() < deadline, "/metrics was never served"
            await asyncio.sleep(0.05)


def metric(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


async def test_hundreds_of_slow_heads_and_bodies_are_cut_off_while_a_client_is_served(
    enough_files: None,
) -> None:
    before = CUTOFFS.copy()
    async with (
        fake_worker(image_ok()) as worker,
        gateway_server(registry(worker.url, max_connections=2000)) as (url, _),
    ):
        heads = [dribbling_head(url) for _ in range(400)]
        bodies = [stalled_body(url) for _ in range(200)]
        await asyncio.sleep(IDLE_S / 2)  # all of them open and held, none cut yet
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            loop = asyncio.get_running_loop()
            started = loop.time()
            normal = await client.post("/v1/images/generations", json=body())
            took_ms = (loop.time() - started) * 1000
            print(f"normal request among 600 slow clients: {took_ms:.1f} ms")  # -rP shows it
            head_cuts = await asyncio.gather(*heads)
            body_cuts = await asyncio.gather(*bodies)
            metrics_text = (await client.get("/metrics")).text

    assert normal.status_code == 200
    assert normal.content == JPEG_ANSWER  # the worker's answer, passed on
    assert len(worker.received) == 1  # the normal request: no cut-off body went on

    for cut in head_cuts:
        assert cut.after_s is not None, "a dribbling head was never cut off"
        assert HEAD_S * 0.9 <= cut.after_s <= HEAD_S + MARGIN_S
        assert cut.status() == 408
        assert cut.detail() == "request head not received within 1s"
        assert parse_raw(cut.answer)[1]["connection"] == "close"
    for cut in body_cuts:
        assert cut.after_s is not None, "a stalled body was never cut off"
        assert IDLE_S * 0.9 <= cut.after_s <= IDLE_S + MARGIN_S
        assert cut.status() == 408
        assert cut.detail() == "request body stalled: nothing received for 0.5s"

    assert CUTOFFS["head_timeout"] - before["head_timeout"] == 400
    assert CUTOFFS["body_idle"] - before["body_idle"] == 200
    for reason in ("head_timeout", "body_idle"):
        exposed = metric(metrics_text, "gateway_client_cutoffs_total", reason=reason)
        assert exposed == CUTOFFS[reason]  # this process's totals, as the server counts
    # The app saw each cut-off body end as a disconnect (499), never as a 500.
    assert metric(metrics_text, "gateway_requests_total", adapter="unknown", status="499") == 200
    assert metric(metrics_text, "gateway_requests_total", adapter="unknown", status="500") is None


async def test_silent_trickling_and_idle_connections_are_closed_in_time() -> None:
    get = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n"
    head = POST + b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
    async with fake_worker(image_ok()) as worker, served_gateway(registry(worker.url)) as url:
        silent, trickling, idle, blank_lines = await asyncio.gather(
            slow_client(url, b""),  # connects and sends nothing
            slow_client(url, head, b"0123456789", clock_from_first=True),  # never idle
            slow_client(url, get, after_response=True),
            slow_client(url, get, b"\r\n", every_s=0.3, after_response=True),
        )
    assert silent.after_s is not None
    assert silent.after_s <= HEAD_S + MARGIN_S
    assert (silent.status(), silent.detail()) == (408, "request head not received within 1s")

    assert trickling.after_s is not None
    assert BODY_S * 0.9 <= trickling.after_s <= BODY_S + MARGIN_S
    assert (trickling.status(), trickling.detail()) == (
        408,
        "request body not received within 1s",
    )
    assert worker.received == []

    # Idle after an answer: closed without a word (a 408 there could be read as the
    # answer to a request the client is just sending).
    assert idle.after_s is not None
    assert KEEPALIVE_S * 0.9 <= idle.after_s <= KEEPALIVE_S + MARGIN_S
    assert idle.answer == b""
    # Empty lines are allowed before a head, but they start its clock.
    assert blank_lines.after_s is not None
    assert blank_lines.after_s <= HEAD_S + MARGIN_S
    assert blank_lines.status() == 408


async def test_a_request_answered_slower_than_every_timeout_is_not_cut_off() -> None:
    slow_worker = delayed(image_ok(), HEAD_S + BODY_S + KEEPALIVE_S)
    async with (
        fake_worker(slow_worker) as worker,
        served_gateway(registry(worker.url)) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        first = await client.post("/v1/images/generations", json=body(seed=1))
        second = await client.post("/v1/images/generations", json=body(seed=2))
    assert [first.status_code, second.status_code] == [200, 200]
    assert len(worker.received) == 2


async def test_connections_over_the_cap_get_503_while_the_others_are_served() -> None:
    async with (
        fake_worker(image_ok()) as worker,
        gateway_server(registry(worker.url, head_timeout_s=30, max_connections=5)) as (url, _),
    ):
        host, port = url.removeprefix("http://").split(":")
        held = [await asyncio.open_connection(host, int(port)) for _ in range(5)]
        refused = await raw_exchange(url, b"GET /healthz HTTP/1.1\r\nHost: g\r\n\r\n")
        served = []
        for reader, writer in held:  # each sends its request only now
            request = POST + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(PAYLOAD)
            writer.write(request + PAYLOAD)
            served.append(parse_raw(await asyncio.wait_for(reader.read(), 10)))
            writer.close()

        text = await metrics_once_served(url)

    status, headers, payload = parse_raw(refused)
    assert status == 503
    assert headers["retry-after"] == "1"
    assert headers["connection"] == "close"  # and raw_exchange read until the server closed
    assert json.loads(payload) == {"detail": "too many open connections; try again later"}
    assert [answer[0] for answer in served] == [200] * 5
    assert len(worker.received) == 5
    exposed = metric(text, "gateway_client_cutoffs_total", reason="max_connections")
    assert exposed == CUTOFFS["max_connections"] >= 1


async def test_served_processes_take_their_limits_from_the_registry(tmp_path: Path) -> None:
    """`gateway serve --workers 2`: each process imports the protocol afresh and reads
    the limits `serve` resolved, not the defaults (which would wait 10 s)."""
    config = tmp_path / "adapters.yaml"
    limits = {"head_timeout_s": HEAD_S, "max_connections": 100}
    config.write_text(registry_yaml({"p": [dead_url()]}, sections={"limits": limits}))
    with gateway_process(str(config), "--workers", "2") as url:
        silent = await asyncio.gather(*(slow_client(url, b"") for _ in range(6)))
    for cut in silent:
        assert cut.after_s is not None
        assert cut.after_s <= HEAD_S + MARGIN_S
        assert (cut.status(), cut.detail()) == (408, "request head not received within 1s")
