"""Real servers on loopback for tests: sim workers, a scripted worker, the gateway,
redis-server (plain, TLS or a one-node cluster) and a socket that never answers.

Every server here listens on 127.0.0.1 on a free port and is stopped by its owner.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import io
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import uvicorn
import yaml
from aiohttp import web
from PIL import Image
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.auth import hash_key
from gateway.balancer import Balancer, Clock, Pool
from gateway.cache import MemoryCache, ResultCache
from gateway.cli import _fast, free_port
from gateway.coalesce import Coalescer
from gateway.discovery import FakeResolver, Resolver
from gateway.errors import UpstreamError
from gateway.pipeline import Pipeline
from gateway.prober import Prober
from gateway.protocols import open_worker_session
from gateway.registry import CacheSpec, Registry, load_registry, parse_registry
from gateway.reload import RegistryFile
from gateway.schema import ImageGenerationBody, ResponseFormat
from gateway.simworker import spawn, stop, wait_healthy
from gateway.state import served_of


@dataclass
class SimWorker:
    url: str
    proc: subprocess.Popen[bytes]

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.url + "/stats", timeout=5).json()
        return data


@contextmanager
def sim_workers(*option_lists: Sequence[str]) -> Iterator[list[SimWorker]]:
    """One real `gateway sim-worker` process per option list, all stopped at exit."""
    workers: list[SimWorker] = []
    try:
        for options in option_lists:
            port = free_port()
            worker = SimWorker(f"http://127.0.0.1:{port}", spawn(port, *options))
            workers.append(worker)
        for worker in workers:
            wait_healthy(worker.url, proc=worker.proc)
        yield workers
    finally:
        for worker in workers:
            stop(worker.proc)


def generations(workers: Sequence[SimWorker]) -> int:
    """Images drawn so far by these sim workers, all together."""
    return sum(int(worker.stats()["generations"]) for worker in workers)


def registry_yaml(
    pools: Mapping[str, Sequence[str | dict[str, Any]]],
    adapters: Sequence[dict[str, Any]] | None = None,
    *,
    sections: Mapping[str, Any] | None = None,
    cache: dict[str, Any] | None = None,
    **pool_options: Any,
) -> str:
    """adapters.yaml text: each pool's workers by URL (or full dict), same options each;
    `sections` adds top-level sections (`auth`, `limits`), `cache` the `cache:` one."""
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


def make_registry(
    pools: Mapping[str, Sequence[str | dict[str, Any]]],
    adapters: Sequence[dict[str, Any]] | None = None,
    *,
    sections: Mapping[str, Any] | None = None,
    cache: dict[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    **pool_options: Any,
) -> Registry:
    text = registry_yaml(pools, adapters, sections=sections, cache=cache, **pool_options)
    return parse_registry(text, env=env)


def api_key(name: str, key: str, **options: Any) -> dict[str, Any]:
    """One entry of `auth.keys`: the key's name and the sha256 of `key`."""
    return {"name": name, "sha256": hash_key(key), **options}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


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
    registry: Registry,
    *,
    resolver: Resolver | None = None,
    clock: Clock = time.monotonic,
    **options: Any,
) -> AsyncIterator[Gateway]:
    """The gateway app with its lifespan run (background probes and discovery too),
    driven through httpx.ASGITransport; DNS comes from `resolver` (none by default).
    `options` go to create_app."""
    app = create_app(registry, resolver=resolver or FakeResolver(), clock=clock, **options)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield Gateway(app, client)


def gateway_from_file(
    path: Path, text: str, **options: Any
) -> contextlib.AbstractAsyncContextManager[Gateway]:
    """`gateway()` serving `text`, written to `path` first and reloadable from there."""
    path.write_text(text)
    return gateway(load_registry(path), source=RegistryFile(path), **options)


@asynccontextmanager
async def gateway_client(
    registry: Registry, *, resolver: Resolver | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """Just the client of `gateway()`."""
    async with gateway(registry, resolver=resolver) as gw:
        yield gw.client


@asynccontextmanager
async def gateway_server(registry: Registry) -> AsyncIterator[tuple[str, Starlette]]:
    """The gateway under a real uvicorn in this process's loop, on a free loopback port,
    with the same server settings as `gateway serve` (httptools bounded by the
    registry's `limits`, no Server header); yields its URL and the app. For what only
    a real server does (disconnects, raw bytes, head limits, slow clients); quicker to
    start than `gateway_process`."""
    app = create_app(registry, resolver=FakeResolver())
    config = _fast(
        app,
        log_level="warning",
        port=free_port(),
        limits=registry.limits,
        configure_logging=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
                raise RuntimeError("gateway server exited during start-up")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{config.port}", app
    finally:
        server.should_exit = True
        await task


@asynccontextmanager
async def local_pipeline(
    registry: Registry, *, clock: Clock = time.monotonic
) -> AsyncIterator[tuple[Pipeline, Prober]]:
    """The pipeline without the HTTP front (and no background tasks): a balancer on
    `clock` and a real worker session; probes run when the test says."""
    async with open_worker_session(slots=registry.worker_slots) as session:
        balancer = Balancer(registry, clock=clock, rng=random.Random(1))
        # The cache off: each generate() here is meant to reach the balancer.
        cache = ResultCache(backend=MemoryCache(max_bytes=0), spec=CacheSpec(enabled=False))
        pipeline = Pipeline(
            registry=registry,
            balancer=balancer,
            session=session,
            cache=cache,
            coalescer=Coalescer(cache=cache),
        )
        yield pipeline, Prober(balancer=balancer, session=session, clock=clock)


def request(**overrides: Any) -> ImageGenerationBody:
    return ImageGenerationBody.model_validate(body(**overrides))


async def generate(pipeline: Pipeline, **overrides: Any) -> str:
    """One generation; the worker's name, or the error's class and reason."""
    try:
        result = await pipeline.generate(request(**overrides), request_id="t")
    except UpstreamError as exc:
        return f"{type(exc).__name__}:{exc.reason}"
    return result.worker


def the_pool(pipeline: Pipeline) -> Pool:
    (pool,) = pipeline.balancer.pools.values()
    return pool


def assert_idle(pool: Pool) -> None:
    assert [w.in_flight for w in pool.workers] == [0] * len(pool.workers)
    assert not pool.queue
    assert pool.active == 0
    assert pool.active_retries == 0


class FakeClock:
    """Time that moves only when the test says: `clock()` reads it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def body(**overrides: Any) -> dict[str, Any]:
    """A valid request body, with overrides."""
    return {"prompt": "a red fox", "num_inference_steps": 4, "guidance_scale": 7.5, **overrides}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ScriptedWorker:
    """A worker whose every answer the test writes; it records what it was sent.
    `GET /health` answers 200 while `healthy` is true, 503 otherwise."""

    handler: Handler
    url: str = ""
    healthy: bool = True
    received: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    probes: int = 0
    probe_headers: list[dict[str, str]] = field(default_factory=list)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append(json.loads(await request.read()))
        self.headers.append(dict(request.headers))
        return await self.handler(request)

    async def _health(self, request: web.Request) -> web.StreamResponse:
        self.probes += 1
        self.probe_headers.append(dict(request.headers))
        return web.json_response({"status": "ok"}, status=200 if self.healthy else 503)


@asynccontextmanager
async def scripted_worker(
    handler: Handler, *, path: str = "/v1/images/generations", health_path: str = "/health"
) -> AsyncIterator[ScriptedWorker]:
    """`path` and `health_path`: where it takes generations and probes (another
    protocol's, e.g. /sdapi/v1/txt2img and /sdapi/v1/progress)."""
    worker = ScriptedWorker(handler)
    app = web.Application()
    app.router.add_post(path, worker._handle)
    app.router.add_get(health_path, worker._health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    worker.url = f"http://127.0.0.1:{port}"
    try:
        yield worker
    finally:
        await runner.cleanup()


@asynccontextmanager
async def scripted_workers(*handlers: Handler) -> AsyncIterator[list[ScriptedWorker]]:
    """Several scripted workers, one per handler, all stopped at exit."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(scripted_worker(h)) for h in handlers]


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


def image_ok(payload: bytes | None = None) -> Handler:
    """200 with `payload`; by default a valid image of the format the request asked."""

    async def handler(request: web.Request) -> web.StreamResponse:
        answer = payload if payload is not None else await answer_for(request)
        return web.Response(body=answer, content_type="application/json")

    return handler


def sleeps(seconds: float) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(body=await answer_for(request), content_type="application/json")

    return handler


def answers(status: int, text: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=text, content_type="application/json")

    return handler


def held(release: asyncio.Event, payload: bytes | None = None) -> Handler:
    """Answers only once the test sets `release`: a worker busy for as long as needed.
    `payload` as for `image_ok`."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await release.wait()
        answer = payload if payload is not None else await answer_for(request)
        return web.Response(body=answer, content_type="application/json")

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


def delayed(handler: Handler, seconds: float) -> Handler:
    """`handler`, answering `seconds` later (so that requests overlap)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return await handler(request)

    return handle


async def eventually(condition: Callable[[], bool], *, within_s: float = 10.0) -> None:
    """Wait until another task makes `condition` true; fail only if it never does.
    (A wait for an event, never an assertion about speed.)"""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not condition():
        assert loop.time() < deadline, "the condition never came true"
        await asyncio.sleep(0.005)


def dead_url() -> str:
    """A loopback URL nothing listens on: connecting to it is refused."""
    return f"http://127.0.0.1:{free_port()}"


@contextmanager
def gateway_process(
    config_path: str, *extra: str, log_level: str = "warning", **popen: Any
) -> Iterator[str]:
    """The real gateway under uvicorn in a child process; yields its base URL.
    `popen` goes to subprocess.Popen (`env`, `stderr` to capture its log)."""
    with gateway_child(config_path, *extra, log_level=log_level, **popen) as (url, _):
        yield url


@contextmanager
def gateway_child(
    config_path: str, *extra: str, log_level: str = "warning", **popen: Any
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """As gateway_process, with the process too (to signal it)."""
    port = free_port()
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", config_path]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--log-level", log_level, *extra],
        stdin=subprocess.DEVNULL,
        **popen,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc=proc, path="/healthz")
        yield url, proc
    finally:
        stop(proc)


def redis_cache(url: str, **options: Any) -> dict[str, Any]:
    """A `cache:` section on `url` for tests that are not about timeouts: patient Redis
    calls, so that a loaded CI machine (a TLS handshake on two busy cores can take more
    than the default 50 ms) is not read as a failing Redis. The fail-open tests set
    their own short timeouts."""
    return {"url": url, "timeout_ms": 2000, "connect_timeout_ms": 2000, **options}


REDIS_MISSING = "redis-server not found: install redis-server (apt-get install -y redis-server)"
OPENSSL_MISSING = "openssl not found: install openssl (apt-get install -y openssl)"


@dataclass
class RedisServer:
    """A real redis-server on 127.0.0.1, no persistence; kill() and start() again on the
    same port to play an outage."""

    port: int
    options: Sequence[str]
    workdir: Path
    url: str
    proc: subprocess.Popen[bytes] | None = None
    client_options: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(REDIS_MISSING, pytrace=False)  # never a skip: the proof needs it
        persistence = ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        log = ["--logfile", str(self.workdir / "redis.log")]
        cmd = [binary, "--bind", "127.0.0.1", *persistence, *log, *self.options]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log_tail()}")
            try:
                with self.client() as client:
                    client.ping()
                    return
            except redis.RedisError:
                time.sleep(0.02)
        raise TimeoutError(f"redis-server not answering after {timeout_s}s: {self.log_tail()}")

    def log_tail(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text()[-2000:] if path.exists() else "(no log)"

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown; with no persistence every key is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @contextmanager
    def client(self) -> Iterator[redis.Redis]:
        """A blocking client for the test's own looks at the server."""
        client = redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=5, **self.client_options
        )
        try:
            yield client
        finally:
            client.close()

    def info(self, section: str) -> dict[str, Any]:
        with self.client() as client:
            data: dict[str, Any] = client.info(section)
            return data


@contextmanager
def redis_server(*options: str, tls: bool = False, cluster: bool = False) -> Iterator[RedisServer]:
    """redis-server on a free loopback port, stopped at exit. `tls`: rediss:// with a
    fresh self-signed certificate; `cluster`: a one-node Redis Cluster owning every slot."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="redis-") as tmp:
        workdir = Path(tmp)
        server = RedisServer(
            port, ["--port", str(port), *options], workdir, f"redis://127.0.0.1:{port}"
        )
        if tls:
            _serve_tls(server)
        if cluster:
            # The cluster bus needs a port too: a free one, not the default port + 10000.
            bus = ["--cluster-port", str(free_port())]
            conf = ["--cluster-config-file", str(workdir / "nodes.conf")]
            server.options = [*server.options, "--cluster-enabled", "yes", *conf, *bus]
        try:
            server.start()
            if cluster:
                _own_every_slot(server)
            yield server
        finally:
            server.kill()


def _serve_tls(server: RedisServer) -> None:
    cert, key = server.workdir / "cert.pem", server.workdir / "key.pem"
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail(OPENSSL_MISSING, pytrace=False)
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    keys = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    files = ["-keyout", str(key), "-out", str(cert), "-days", "1"]
    subprocess.run(
        [openssl, "req", "-x509", *keys, *subject, *files], check=True, capture_output=True
    )
    tls = [
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(cert),
    ]
    server.options = [
        "--port",
        "0",
        "--tls-port",
        str(server.port),
        *tls,
        "--tls-auth-clients",
        "no",
    ]
    server.url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={cert}"
    server.client_options = {"ssl": True, "ssl_ca_certs": str(cert)}


def _own_every_slot(server: RedisServer, timeout_s: float = 10.0) -> None:
    with server.client() as client:
        client.cluster("ADDSLOTS", *range(16384))
        deadline = time.monotonic() + timeout_s
        while client.cluster("info")["cluster_state"] != "ok":
            if time.monotonic() > deadline:
                raise TimeoutError("one-node Redis Cluster did not come up")
            time.sleep(0.02)


@contextmanager
def blackhole() -> Iterator[str]:
    """A redis:// URL whose port accepts connections and never answers a byte: the
    kernel completes the handshake from the listen backlog, and nobody ever reads."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(512)
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}"


PROMETHEUS_INSTALL = "install prometheus (apt-get install -y prometheus)"


def prometheus_tool(name: str) -> str:
    """`prometheus` or `promtool` (both from Debian's `prometheus`): a missing one fails
    the test, never skips it, so a machine without them cannot pass in silence."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: {PROMETHEUS_INSTALL}")
    return path


@contextmanager
def prometheus_server(config: str, workdir: Path) -> Iterator[str]:
    """The real Prometheus server with `config` (prometheus.yml text) on a free loopback
    port; yields its base URL. Its TSDB lives under `workdir` and is removed at exit."""
    binary = prometheus_tool("prometheus")
    (workdir / "prometheus.yml").write_text(config)
    data, log_path = workdir / "prometheus-data", workdir / "prometheus.log"
    port = free_port()
    cmd = [
        binary,
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={data}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            try:
                wait_healthy(url, proc=proc, path="/-/ready", timeout_s=30)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(
                    f"prometheus did not start: {exc}\n{log_path.read_text()}"
                ) from exc
            yield url
        finally:
            stop(proc, grace_s=10)
            shutil.rmtree(data, ignore_errors=True)


@asynccontextmanager
async def served_gateway(registry: Registry) -> AsyncIterator[str]:
    """`gateway_server`'s URL alone."""
    async with gateway_server(registry) as (url, _):
        yield url


async def raw_exchange(url: str, request: bytes, *, timeout_s: float = 5.0) -> bytes:
    """Send raw bytes to a served gateway; everything it answers until it closes (or
    until `timeout_s` passes, which fails the test: a hang)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()


def parse_raw(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-cased names) and body of a raw HTTP/1.1 answer."""
    head, _, payload = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, payload
