"""A kit for testing code against the gateway, and the gateway against workers, with
no subprocess: fake workers and the gateway itself, in the test's own event loop.

    from gateway.testing import Answer, fake_worker, registry_yaml, served_gateway

    async def test_my_client() -> None:
        async with fake_worker() as worker:  # answers a real JPEG or PNG, as asked
            async with served_gateway(registry_yaml({"sdxl": [worker.url]})) as url:
                ...  # your client against url: an image
                worker.answer = Answer(status=500)
                ...  # now a 502 that names the worker
        assert worker.received[0]["prompt"] == "a red fox"

- **Fake workers** (`fake_worker`, `FakeWorker`): an aiohttp server on 127.0.0.1 that
  speaks the worker side of the Friendli Container image API. `POST
  /v1/images/generations` is answered by an `Answer` (status, body or a real image,
  delay, headers) or by any aiohttp handler (`held`, `trickles`, `hangs_up`, ... or
  your own); `GET /health` is 200 or 503 as `worker.healthy` says. It keeps what it
  received (bodies, headers, probes); `kill()` stops it as a crash would.
- **The gateway**: `app_for` builds the app on a registry (adapters.yaml text, or a
  parsed Registry); `gateway` runs its lifespan and wires an httpx client to it
  through ASGI, no socket; `gateway_server` and `served_gateway` serve it under
  uvicorn in the running loop, with the server settings of `gateway serve`.
- **Any ASGI app served**: `serve` (in the running loop), `serve_in_thread` (in a
  thread of its own, for blocking code: a sync client, a sync test);
  `ServedSim` reads the counters of a served simulated worker
  (`gateway.simworker.create_sim_app`) in process.
- **Images and registries**: `image_bytes`, `image_answer` (a worker's success body
  that passes the gateway's answer check), `registry_yaml` (adapters.yaml text for a
  set of worker URLs).

Every server here listens on 127.0.0.1, on a port the kernel picks and the server
reports back, and stops when its `async with` block ends. Nothing in the gateway
imports this module, and it needs no test framework.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import io
import json
import random
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import uvicorn
import uvloop
import yaml
from aiohttp import web
from PIL import Image
from starlette.applications import Starlette
from starlette.types import ASGIApp

from gateway.app import create_app
from gateway.balancer import Clock
from gateway.discovery import FakeResolver, Resolver
from gateway.pipeline import Pipeline
from gateway.registry import LimitsSpec, Registry, parse_registry
from gateway.schema import ResponseFormat
from gateway.server import uvicorn_config
from gateway.simworker import SimConfig, SimWorker, create_sim_app
from gateway.state import served_of

GENERATIONS_PATH = "/v1/images/generations"
T = TypeVar("T")

# -- images ------------------------------------------------------------------------------


@functools.cache
def image_bytes(response_format: ResponseFormat = "jpeg", *, side: int = 8) -> bytes:
    """A real image, `side` pixels square, of seeded noise (so it hardly compresses):
    JPEG, or PNG for `raw`. Made once per argument set."""
    noise = random.Random(side).randbytes(side * side * 3)
    out = io.BytesIO()
    image = Image.frombytes("RGB", (side, side), noise)
    image.save(out, format="PNG" if response_format == "raw" else "JPEG", quality=90)
    return out.getvalue()


def image_answer(response_format: ResponseFormat = "jpeg", *, side: int = 8) -> bytes:
    """A worker's success body, `{"image": "<base64>"}`, that passes the answer check."""
    return b'{"image":"' + base64.b64encode(image_bytes(response_format, side=side)) + b'"}'


JPEG_ANSWER = image_answer("jpeg")
PNG_ANSWER = image_answer("raw")


async def answer_for(request: web.Request) -> bytes:
    """The success body for what `request` asked: JPEG, or PNG for `raw`."""
    asked = json.loads(await request.read()).get("response_format")
    return PNG_ANSWER if asked == "raw" else JPEG_ANSWER


# -- what a fake worker answers ------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Answer:
    """A worker's answer, declared; it is a `Handler` too. `status`; `body` as given,
    or if None a valid image of the format the request asked for (a 200) or
    `{"detail": "fake worker answered <status>"}` (any other status); sent after
    `delay_s`, with `headers` (JSON's Content-Type unless they give one)."""

    status: int = 200
    body: bytes | str | None = None
    delay_s: float = 0.0
    headers: Mapping[str, str] = field(default_factory=dict)

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        body = self.body
        if body is None and self.status == 200:
            body = await answer_for(request)
        elif body is None:
            body = json.dumps({"detail": f"fake worker answered {self.status}"})
        headers = dict(self.headers)
        if not any(name.lower() == "content-type" for name in headers):
            headers["Content-Type"] = "application/json"
        payload = body.encode() if isinstance(body, str) else body
        return web.Response(status=self.status, body=payload, headers=headers)


def image_ok(payload: bytes | None = None) -> Handler:
    """200 with `payload`; by default a valid image of the format the request asked."""
    return Answer(body=payload)


def answers(status: int, text: str) -> Handler:
    """`status` with `text` as a JSON body."""
    return Answer(status=status, body=text)


def sleeps(seconds: float) -> Handler:
    """A valid image, `seconds` late."""
    return Answer(delay_s=seconds)


def delayed(handler: Handler, seconds: float) -> Handler:
    """`handler`, answering `seconds` later (so that requests overlap)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return await handler(request)

    return handle


def held(release: asyncio.Event, payload: bytes | None = None) -> Handler:
    """Answers only once the test sets `release`: a worker busy for as long as needed.
    `payload` as for `image_ok`. Pair it with `released_at_exit`."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return await image_ok(payload)(request)

    return handler


@asynccontextmanager
async def released_at_exit(release: asyncio.Event) -> AsyncIterator[None]:
    """Sets `release` when the block ends, however: a failing test must not leave a
    `held` worker holding, nor a server waiting on it at shutdown."""
    try:
        yield
    finally:
        release.set()


def trickles(every_s: float) -> Handler:
    """Starts a 200 answer, then sends a byte every `every_s`, never finishing."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"image":"')
        while True:
            await asyncio.sleep(every_s)
            await resp.write(b"A")

    return handler


def hangs_up() -> Handler:
    """Reads the request, then cuts the connection without a byte of answer: a worker
    that crashed while generating."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        assert request.transport is not None
        request.transport.abort()
        return web.Response()  # never sent: the connection is gone

    return handler


# -- the fake worker -------------------------------------------------------------------------


@dataclass
class FakeWorker:
    """A worker on 127.0.0.1 whose every answer the test writes (`answer`, which the
    test may replace at any time). It keeps, in order, each request's JSON body
    (`received`) and headers (`headers`), and counts health probes (`probes`).
    `GET /health` answers 200 while `healthy` is true, 503 otherwise; each probe's
    headers are kept (`probe_headers`)."""

    answer: Handler = field(default_factory=Answer)
    healthy: bool = True
    url: str = ""
    received: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    probes: int = 0
    probe_headers: list[dict[str, str]] = field(default_factory=list)
    _runner: web.AppRunner | None = field(default=None, repr=False)

    @property
    def calls(self) -> int:
        """Generation requests received so far."""
        return len(self.received)

    async def kill(self) -> None:
        """Stop as a killed process would: the port closed (a new connection is refused)
        and every open connection cut at once, no answer finished."""
        if self._runner is None or self._runner.server is None:
            raise RuntimeError("kill(): the worker is not started")
        for site in list(self._runner.sites):
            await site.stop()
        for connection in self._runner.server.connections:
            if connection.transport is not None:
                connection.transport.abort()

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        self.received.append(json.loads(await request.read()))
        self.headers.append(dict(request.headers))
        return await self.answer(request)

    async def _health(self, request: web.Request) -> web.StreamResponse:
        self.probes += 1
        self.probe_headers.append(dict(request.headers))
        return web.json_response({"status": "ok"}, status=200 if self.healthy else 503)


@asynccontextmanager
async def fake_worker(
    answer: Handler | None = None,
    *,
    healthy: bool = True,
    path: str = GENERATIONS_PATH,
    health_path: str = "/health",
) -> AsyncIterator[FakeWorker]:
    """A `FakeWorker` serving until the block ends; `answer` by default a valid image
    of the format asked. `path` and `health_path`: where it takes generations and
    probes (another protocol's, e.g. /sdapi/v1/txt2img and /sdapi/v1/progress)."""
    worker = FakeWorker(answer or Answer(), healthy=healthy)
    app = web.Application()
    app.router.add_post(path, worker._generate)
    app.router.add_get(health_path, worker._health)
    # A request whose connection is gone (the client left, or kill()) stops being
    # answered, so that a held or slow answer never outlives its test.
    runner = worker._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        worker.url = f"http://{host}:{port}"
        yield worker
    finally:
        await runner.cleanup()


@asynccontextmanager
async def fake_workers(*answers: Handler) -> AsyncIterator[list[FakeWorker]]:
    """One `FakeWorker` per answer, all stopped when the block ends."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(fake_worker(a)) for a in answers]


# -- registries and the gateway ---------------------------------------------------------------


def registry_yaml(
    pools: Mapping[str, Sequence[str | dict[str, Any]]],
    adapters: Sequence[dict[str, Any]] | None = None,
    *,
    sections: Mapping[str, Any] | None = None,
    cache: dict[str, Any] | None = None,
    **pool_options: Any,
) -> str:
    """adapters.yaml text: each pool's workers by URL (or a full worker dict), the same
    `pool_options` for each pool; by default one adapter per pool, named as the pool,
    the first the default. `sections` adds top-level sections (`auth`, `limits`),
    `cache` the `cache:` one."""
    data: dict[str, Any] = {
        "pools": {
            name: {
                "workers": [w if isinstance(w, dict) else {"url": w} for w in workers],
                **pool_options,
            }
            for name, workers in pools.items()
        },
        "adapters": list(adapters)
        if adapters is not None
        else [{"name": name, "pool": name, "default": i == 0} for i, name in enumerate(pools)],
        **(sections or {}),
    }
    if cache is not None:
        data["cache"] = cache
    return yaml.safe_dump(data, sort_keys=False)


def app_for(
    registry: Registry | str, *, resolver: Resolver | None = None, **options: Any
) -> Starlette:
    """The gateway's app on `registry`: a parsed Registry, or adapters.yaml text
    (`${NAME}` filled from the environment). `options` go to gateway.app.create_app.
    DNS discovery asks `resolver`, by default a FakeResolver that knows no name, so
    that a test sends nothing off the machine."""
    if isinstance(registry, str):
        registry = parse_registry(registry)
    return create_app(registry, resolver=resolver or FakeResolver(), **options)


@dataclass
class Gateway:
    """The gateway app in memory, and an httpx client wired to it."""

    app: Starlette
    client: httpx.AsyncClient

    @property
    def pipeline(self) -> Pipeline:
        pipeline: Pipeline = served_of(self.app).pipeline
        return pipeline


@asynccontextmanager
async def gateway(
    registry: Registry | str,
    *,
    resolver: Resolver | None = None,
    clock: Clock = time.monotonic,
    **options: Any,
) -> AsyncIterator[Gateway]:
    """The gateway app (`app_for`) with its lifespan run (background probes and
    discovery too), and an httpx client that reaches it through ASGI, no socket."""
    app = app_for(registry, resolver=resolver, clock=clock, **options)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield Gateway(app, client)


@asynccontextmanager
async def gateway_client(
    registry: Registry | str, *, resolver: Resolver | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """Just the client of `gateway()`."""
    async with gateway(registry, resolver=resolver) as gw:
        yield gw.client


@asynccontextmanager
async def gateway_server(
    registry: Registry | str, **options: Any
) -> AsyncIterator[tuple[str, Starlette]]:
    """The gateway (`app_for`, `options` as there) under a real uvicorn in the running
    loop, with the server settings of `gateway serve` (httptools bounded by the
    registry's `limits`, no Server header); yields its URL and the app. For what only
    a real server does: disconnects, raw bytes, head limits, slow clients, a client
    library that opens its own connections."""
    if isinstance(registry, str):
        registry = parse_registry(registry)
    app = app_for(registry, **options)
    async with serve(app, limits=registry.limits) as url:
        yield url, app


@asynccontextmanager
async def served_gateway(registry: Registry | str, **options: Any) -> AsyncIterator[str]:
    """`gateway_server`'s URL alone."""
    async with gateway_server(registry, **options) as (url, _):
        yield url


# -- any ASGI app, served -----------------------------------------------------------------------


@asynccontextmanager
async def serve(app: ASGIApp, *, limits: LimitsSpec | None = None) -> AsyncIterator[str]:
    """`app` under uvicorn in the running loop, lifespan included, on 127.0.0.1 and a
    port the kernel picks; yields its URL. The protocol is the gateway's, bounded by
    `limits` (defaults if None). At exit it stops as uvicorn does: no new
    connections, and requests in flight finished first."""
    config = uvicorn_config(app, log_level="warning", limits=limits, configure_logging=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(_serve(server))
    try:
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
                raise RuntimeError("server exited during start-up")
            await asyncio.sleep(0.005)
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        await task


async def _serve(server: uvicorn.Server) -> None:
    # uvicorn ends a failed start-up (a lifespan that failed, a port taken) with
    # sys.exit, which would end the whole test run, or the thread's event loop.
    try:
        await server.serve()
    except SystemExit as exc:
        raise RuntimeError(f"server exited during start-up (uvicorn: exit {exc.code})") from exc


@contextmanager
def serve_in_thread(
    app: ASGIApp, *, limits: LimitsSpec | None = None, start_timeout_s: float = 30.0
) -> Iterator[str]:
    """As `serve`, for blocking code: `app` runs in an event loop of its own in a
    thread, so a sync client or test can call it; stopped, and the thread joined,
    when the block ends. A failure to start is raised here."""
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="gateway.testing", daemon=True)
    thread.start()
    stack = contextlib.AsyncExitStack()

    def run(coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(start_timeout_s)

    try:
        yield run(stack.enter_async_context(serve(app, limits=limits)))
    finally:
        try:
            asyncio.run_coroutine_threadsafe(stack.aclose(), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()


@dataclass
class ServedSim:
    """A simulated worker (`gateway.simworker.create_sim_app`) served in this process:
    its URL, and its counters read in place (no request, so a test whose loop serves
    it can read them too)."""

    url: str
    app: Starlette

    def stats(self) -> dict[str, Any]:
        """What its `/stats` answers: generations, failures, adapter loads, ..."""
        worker: SimWorker = self.app.state.worker
        return {**vars(worker.stats), "loaded": worker.loaded_adapters()}


FAST_SIM = SimConfig(step_ms=1, concurrency=4, adapter_load_ms=0, size=128)


@asynccontextmanager
async def sim_worker(config: SimConfig | None = None) -> AsyncIterator[ServedSim]:
    """A simulated worker served in the running loop until the block ends: real,
    deterministic images (the same request, the same bytes), GPU-like timing.
    By default fast: 1 ms a step, 4 at once, adapters loaded at once, 128 px."""
    app = create_sim_app(config or FAST_SIM)
    async with serve(app) as url:
        yield ServedSim(url, app)
