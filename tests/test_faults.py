"""Misbehaving workers, byte for byte: what the client gets, what the cache holds
afterwards, what becomes of the worker's health.

Each worker here is a raw asyncio server on 127.0.0.1 that writes exact bytes (a
framework would fix up the very mistakes under test). Every case runs against the
in-process LRU and a real redis-server; every request in it is the same, so a second
one would be a cache hit if anything had been stored.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from starlette.applications import Starlette

from gateway.balancer import Worker
from gateway.metrics import Metrics
from gateway.registry import Registry
from gateway.schema import WorkerRequest
from gateway.state import state_of
from gateway.testing import (
    JPEG_ANSWER,
    PNG_ANSWER,
    Gateway,
    fake_worker,
    gateway,
    image_bytes,
    image_ok,
)
from tests.support import body, make_registry, redis_cache, request

GEN = "/v1/images/generations"
LIMIT = 2**20  # max_response_bytes in these pools: the 30 MB answers pass it early
PER_TRY_S = 0.5

# What a fault writes on the connection, given the format the request asked for.
Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, str], Awaitable[None]]


def head(status: str, length: int | None = None, *extra: str, close: bool = True) -> bytes:
    lines = [f"HTTP/1.1 {status}", "Content-Type: application/json"]
    if close:
        lines.append("Connection: close")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode()


def sends(status: str, payload: bytes, *extra: str) -> Answer:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: str) -> None:
        writer.write(head(status, len(payload), *extra) + payload)

    return answer


def claims(length_delta: int, *, close: bool = True) -> Answer:
    """A good image under a wrong Content-Length (larger or smaller than sent)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: str) -> None:
        length = len(JPEG_ANSWER) + length_delta
        writer.write(head("200 OK", length, close=close) + JPEG_ANSWER)

    return answer


def cut_short(*, reset: bool) -> Answer:
    """Half of a good answer, then a close (FIN) or a reset (RST: SO_LINGER 0)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: str) -> None:
        writer.write(head("200 OK", len(JPEG_ANSWER)) + JPEG_ANSWER[: len(JPEG_ANSWER) // 2])
        await writer.drain()
        if reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

    return answer


async def silence(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: str) -> None:
    """The head of an answer, then nothing, until the gateway gives up and closes."""
    writer.write(head("200 OK", 1000) + b'{"image":"')
    await writer.drain()
    await reader.read()


def huge(*, chunked: bool) -> Answer:
    """30 MB of base64-looking text, announced by Content-Length or chunked."""
    chunk, count = b"A" * 2**20, 30

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: str) -> None:
        if chunked:
            writer.write(
                head("200 OK", None, "Transfer-Encoding: chunked") + b'a\r\n{"image":"\r\n'
            )
        else:
            writer.write(head("200 OK", len(chunk) * count + 12) + b'{"image":"')
        for _sent in range(count):
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            await writer.drain()  # raises once the gateway has hung up

    return answer


async def other_format(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fmt: str
) -> None:
    payload = JPEG_ANSWER if fmt == "raw" else PNG_ANSWER
    writer.write(head("200 OK", len(payload)) + payload)


async def truncated_image(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: str
) -> None:
    """Well-formed JSON and base64 of the first half of a JPEG."""
    encoded = base64.b64encode(image_bytes("jpeg", side=64))
    cut = b'{"image":"' + encoded[: len(encoded) // 8 * 4] + b'"}'
    writer.write(head("200 OK", len(cut)) + cut)


@dataclass
class RawWorker:
    """A worker that answers every generation with `answer`'s bytes, and every
    `GET /health` with 200 (the gateway's probes must not disturb the count)."""

    answer: Answer
    url: str = ""
    generations: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            request_head = await reader.readuntil(b"\r\n\r\n")
            payload = await reader.readexactly(_content_length(request_head))
            if request_head.startswith(b"GET /health"):
                writer.write(head("200 OK", 2) + b"{}")
            else:
                self.generations += 1
                await self.answer(reader, writer, json.loads(payload)["response_format"])
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the gateway hung up: what these workers are for
        finally:
            writer.close()
            self.tasks.discard(task)


def _content_length(request_head: bytes) -> int:
    for line in request_head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@asynccontextmanager
async def raw_worker(answer: Answer) -> AsyncIterator[RawWorker]:
    worker = RawWorker(answer)
    server = await asyncio.start_server(worker.serve, "127.0.0.1", 0)
    worker.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with server:
            yield worker
    finally:
        for task in list(worker.tasks):
            task.cancel()
        await asyncio.gather(*worker.tasks, return_exceptions=True)


@dataclass(frozen=True)
class Fault:
    answer: Answer
    status: int
    said: str | tuple[str, ...]  # the detail after "adapter 'p': worker p-0" (one of)
    reason: str  # gateway_upstream_errors_total's label
    counted: bool = True  # against the worker's health


FAULTS = {
    "html": Fault(
        sends("200 OK", b"<!doctype html><h1>Bad Gateway</h1>"),
        502,
        ": answered 200 with HTML, not JSON",
        "bad_answer",
    ),
    "not_base64": Fault(
        sends("200 OK", b'{"image":"!!!not base64!!!"}'),
        502,
        ": answered 200 with an image that is not base64 (it holds '!')",
        "bad_answer",
    ),
    "no_image": Fault(
        sends("200 OK", b'{"result":"done"}'),
        502,
        ": answered 200 without an image (keys: 'result')",
        "bad_answer",
    ),
    "empty": Fault(sends("200 OK", b""), 502, ": answered 200 with an empty body", "bad_answer"),
    "other_format": Fault(
        other_format,
        502,
        ": answered 200 with a PNG image, not the JPEG that response_format 'jpeg' asks for",
        "bad_answer",
    ),
    "truncated_image": Fault(
        truncated_image,
        502,
        ": answered 200 with a JPEG cut short (no end-of-image marker)",
        "bad_answer",
    ),
    "30MB_by_length": Fault(
        huge(chunked=False),
        502,
        f": answered 200 with {30 * 2**20 + 12} bytes, over max_response_bytes ({LIMIT})",
        "too_large",
    ),
    "30MB_chunked": Fault(
        huge(chunked=True),
        502,
        f": answered 200 with more than {LIMIT} bytes, over max_response_bytes ({LIMIT})",
        "too_large",
    ),
    "length_too_small": Fault(  # the rest, after `Connection: close`, breaks HTTP
        claims(-10),
        502,
        ": answered malformed HTTP (Data after `Connection: close`)",
        "bad_answer",
    ),
    "length_too_small_keep_alive": Fault(  # the rest would be read as the next answer
        claims(-10, close=False),
        502,
        (  # which, depends on whether the rest arrived with the body or after it
            ": answered malformed HTTP (Bad status line)",
            ": answered 200 with a body that is not JSON (Unterminated string",
        ),
        "bad_answer",
    ),
    "length_too_large": Fault(
        claims(+100),
        502,
        ": connection lost while reading the answer",
        "truncated",
    ),
    "cut_short": Fault(
        cut_short(reset=False), 502, ": connection lost while reading the answer", "truncated"
    ),
    "reset_mid_body": Fault(
        cut_short(reset=True), 502, ": connection lost while reading the answer", "truncated"
    ),
    "headers_then_silence": Fault(silence, 504, f": no answer within {PER_TRY_S}s", "timeout"),
    "429_retry_after": Fault(
        sends("429 Too Many Requests", b'{"detail":"busy"}', "Retry-After: 3"),
        502,
        ": HTTP 429",
        "http_429",
        counted=False,
    ),
    "503_retry_after": Fault(
        sends("503 Service Unavailable", b'{"detail":"busy"}', "Retry-After: 3"),
        502,
        ": HTTP 503",
        "http_503_busy",
        counted=False,
    ),
    "503_bare": Fault(  # no Retry-After: a proxy before a dead worker says this too
        sends("503 Service Unavailable", b"<html>no upstream</html>"),
        502,
        ": HTTP 503",
        "http_503",
    ),
}


CacheSection = Callable[[str], AbstractContextManager[dict[str, Any] | None]]


@pytest.fixture
def cache_section(request: pytest.FixtureRequest) -> CacheSection:
    """The `cache:` section for a backend: none (memory), or the session's
    redis-server, emptied for this test (started only when a test asks for redis)."""

    @contextmanager
    def section(backend: str) -> Iterator[dict[str, Any] | None]:
        yield None if backend == "memory" else redis_cache(request.getfixturevalue("redis_url"))

    return section


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    return sum(
        float(sample.value)
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def cached(gw: Gateway, registry: Registry, **overrides: Any) -> bytes | None:
    """What the gateway's cache holds for the request `body(**overrides)`."""
    adapter = registry.resolve(overrides.get("model"))
    job = WorkerRequest.from_body(request(**overrides), upstream_model=adapter.upstream_model)
    return await gw.pipeline.cache.peek(gw.pipeline.cache.key(adapter, job))


def metrics_of(app: Starlette) -> Metrics:
    metrics: Metrics = state_of(app).metrics
    return metrics


def pool_worker(gw: Gateway, index: int = 0) -> Worker:
    return gw.pipeline.balancer.pool("p").workers[index]


@pytest.mark.parametrize("backend", ["memory", "redis"])
@pytest.mark.parametrize("case", FAULTS)
async def test_a_misbehaving_worker_is_never_passed_on_nor_cached(
    case: str, backend: str, cache_section: CacheSection
) -> None:
    fault = FAULTS[case]
    options: dict[str, Any] = {"max_response_bytes": LIMIT, "per_try_timeout_s": PER_TRY_S}
    async with raw_worker(fault.answer) as worker:
        with cache_section(backend) as cache:
            registry = make_registry({"p": [worker.url]}, cache=cache, **options)
            async with gateway(registry) as gw:
                for tries in (1, 2):
                    resp = await gw.client.post(GEN, json=body(seed=7))
                    assert resp.status_code == fault.status, resp.text
                    detail = resp.json()["detail"]
                    said = (fault.said,) if isinstance(fault.said, str) else fault.said
                    assert detail.startswith(tuple(f"adapter 'p': worker p-0{s}" for s in said)), (
                        detail
                    )
                    assert resp.headers["x-cache"] == "miss", "never a hit: nothing stored"
                    assert worker.generations == tries, "the second request reached it again"
                    assert await cached(gw, registry, seed=7) is None
                health, stats = pool_worker(gw).health, pool_worker(gw).stats
                assert (health.failures, stats.failures) == ((2, 2) if fault.counted else (0, 0))
                errors = metric(metrics_of(gw.app), "gateway_upstream_errors_total")
                assert errors == 2
                labelled = metric(
                    metrics_of(gw.app), "gateway_upstream_errors_total", reason=fault.reason
                )
                assert labelled == 2


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_bad_worker_beside_a_good_one_costs_a_retry_and_poisons_nothing(
    backend: str, cache_section: CacheSection
) -> None:
    # The bad worker holds the adapter's LoRA warm, so it is always tried first.
    adapters = [{"name": "fox", "pool": "p", "upstream_model": "fox-lora", "default": True}]
    async with (
        raw_worker(sends("200 OK", b"<html>oops</html>")) as bad,
        fake_worker(image_ok()) as good,
    ):
        workers: list[str | dict[str, Any]] = [{"url": bad.url, "adapters": ["fox-lora"]}, good.url]
        with cache_section(backend) as cache:
            registry = make_registry({"p": workers}, adapters, cache=cache)
            async with gateway(registry) as gw:
                first = await gw.client.post(GEN, json=body(seed=7))
                assert first.status_code == 200, first.text
                assert first.content == JPEG_ANSWER
                assert first.headers["x-cache"] == "miss"
                assert (bad.generations, len(good.received)) == (1, 1)
                assert await cached(gw, registry, seed=7) == JPEG_ANSWER
                again = await gw.client.post(GEN, json=body(seed=7))
                assert again.headers["x-cache"] == "hit"
                assert again.content == JPEG_ANSWER
                assert (bad.generations, len(good.received)) == (1, 1)
                assert pool_worker(gw, 0).stats.failures == 1
                assert pool_worker(gw, 1).stats.failures == 0
                retried = metric(metrics_of(gw.app), "gateway_retries_total", reason="bad_answer")
                assert retried == 1


async def test_bad_answers_are_retried_only_where_retry_on_says() -> None:
    async with (
        raw_worker(sends("200 OK", b'{"result":"done"}')) as bad,
        fake_worker(image_ok()) as good,
    ):
        adapters = [{"name": "fox", "pool": "p", "upstream_model": "fox-lora", "default": True}]
        workers: list[str | dict[str, Any]] = [{"url": bad.url, "adapters": ["fox-lora"]}, good.url]
        registry = make_registry({"p": workers}, adapters, retry_on=["5xx"])
        async with gateway(registry) as gw:
            resp = await gw.client.post(GEN, json=body())
    assert resp.status_code == 502
    assert (
        resp.json()["detail"]
        == "adapter 'fox': worker p-0: answered 200 without an image (keys: 'result')"
    )
    assert not good.received


async def test_a_good_answer_without_content_length_is_read_whole_and_passed_on() -> None:
    async def close_delimited(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fmt: str
    ) -> None:
        writer.write(head("200 OK", None) + (PNG_ANSWER if fmt == "raw" else JPEG_ANSWER))

    async with raw_worker(close_delimited) as worker:
        registry = make_registry({"p": [worker.url]}, max_response_bytes=LIMIT)
        async with gateway(registry) as gw:
            for fmt, expected in (("jpeg", JPEG_ANSWER), ("raw", PNG_ANSWER)):
                resp = await gw.client.post(GEN, json=body(seed=3, response_format=fmt))
                assert resp.status_code == 200, resp.text
                assert resp.content == expected  # byte for byte
                assert await cached(gw, registry, seed=3, response_format=fmt) == expected
