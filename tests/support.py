"""What the tests need beyond gateway.testing (the public kit: fake workers, the
gateway in memory or served in process): real processes where the process is the
point (`gateway sim-worker` and `gateway serve` children, redis-server plain, TLS or a
one-node cluster, Prometheus), and this suite's own conveniences (registries, request
bodies, the pipeline without its HTTP front, a fake clock, raw HTTP exchanges).

Every server here listens on 127.0.0.1 and is stopped by its owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
import redis

from gateway.auth import hash_key
from gateway.balancer import Balancer, Clock, Pool
from gateway.cache import MemoryCache, ResultCache
from gateway.coalesce import Coalescer
from gateway.errors import UpstreamError
from gateway.pipeline import Pipeline
from gateway.prober import Prober
from gateway.protocols import open_worker_session
from gateway.registry import CacheSpec, Registry, load_registry, parse_registry
from gateway.reload import RegistryFile
from gateway.schema import ImageGenerationBody
from gateway.simworker import Started, start_child, start_sim, stop, wait_healthy
from gateway.testing import Gateway, gateway, registry_yaml


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
    started: list[Started] = []
    try:
        started.extend(start_sim(*options) for options in option_lists)  # start together
        yield [SimWorker(child.wait_ready(), child.proc) for child in started]
    finally:
        for child in started:
            stop(child.proc)


class Sim(Protocol):
    """A sim worker, in a process (`SimWorker`) or in this one (gateway.testing.ServedSim)."""

    url: str

    def stats(self) -> dict[str, Any]: ...


def generations(workers: Sequence[Sim]) -> int:
    """Images drawn so far by these sim workers, all together."""
    return sum(int(worker.stats()["generations"]) for worker in workers)


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


def gateway_from_file(
    path: Path, text: str, **options: Any
) -> contextlib.AbstractAsyncContextManager[Gateway]:
    """`gateway()` serving `text`, written to `path` first and reloadable from there."""
    path.write_text(text)
    return gateway(load_registry(path), source=RegistryFile(path), **options)


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


async def eventually(condition: Callable[[], bool], *, within_s: float = 10.0) -> None:
    """Wait until another task makes `condition` true; fail only if it never does.
    (A wait for an event, never an assertion about speed.)"""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not condition():
        assert loop.time() < deadline, "the condition never came true"
        await asyncio.sleep(0.005)


def wait_until(condition: Callable[[], bool], *, within_s: float = 20.0) -> None:
    """`eventually` for blocking code (a sync test, a test thread)."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        time.sleep(0.01)


_HELD: list[socket.socket] = []  # the ports of dead_url(), held for the whole run


def dead_url() -> str:
    """A loopback URL that refuses connections, for as long as the test run lasts: a
    socket bound to a port the kernel picked and never listening (Linux answers a
    connect with RST), held open, so that no other process can take the port and
    answer. (A port bound and closed again, or a fixed one such as 9, could be
    anyone's by the time it is used.)"""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    _HELD.append(sock)
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


def dead_redis_url(password: str | None = None) -> str:
    """dead_url() as a redis:// URL (with `password`, if given)."""
    auth = f":{password}@" if password else ""
    return dead_url().replace("http://", f"redis://{auth}") + "/0"


def _free_port() -> int:
    """A port that was free a moment ago, for servers that cannot be told port 0 and
    report it (redis-server, Prometheus): their starters retry when it was taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_taken(log: str) -> bool:
    return "address already in use" in log.lower()


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
    """As gateway_process, with the process too (to signal it). Unless `extra` sets
    --drain-grace-s, the process stops as soon as it is told: the default grace (5 s)
    would cost every test that much at its end, and outlast `stop`'s own wait."""
    if "--drain-grace-s" not in extra:
        extra = ("--drain-grace-s", "0", *extra)
    args = ["serve", "--config", config_path, "--log-level", log_level, *extra]
    child = start_child(args, **popen)
    try:
        yield child.wait_ready(path="/healthz"), child.proc
    finally:
        stop(child.proc)


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
                    # Its own process answering, not another server on that port.
                    if client.info("server")["process_id"] == self.proc.pid:
                        return
            except redis.RedisError:
                pass
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
    fresh self-signed certificate; `cluster`: a one-node Redis Cluster owning every slot.
    redis-server cannot report a port it picked: a port taken between our pick and its
    bind makes it exit, and it is started again on another (at most five tries)."""
    with tempfile.TemporaryDirectory(prefix="redis-") as tmp:
        workdir = Path(tmp)
        for attempt in range(5):
            server = _redis_on_free_port(workdir, options, tls=tls, cluster=cluster)
            try:
                server.start()
                break
            except BaseException as exc:  # a timeout or an interrupt too: never leak it
                server.kill()
                taken = isinstance(exc, RuntimeError) and _port_taken(server.log_tail())
                if attempt == 4 or not taken:
                    raise
                (workdir / "redis.log").unlink(missing_ok=True)
        try:
            if cluster:
                _own_every_slot(server)
            yield server
        finally:
            server.kill()


def _redis_on_free_port(
    workdir: Path, options: Sequence[str], *, tls: bool, cluster: bool
) -> RedisServer:
    port = _free_port()
    server = RedisServer(
        port, ["--port", str(port), *options], workdir, f"redis://127.0.0.1:{port}"
    )
    if tls:
        _serve_tls(server)
    if cluster:
        # The cluster bus needs a port too: a free one, not the default port + 10000.
        bus = ["--cluster-port", str(_free_port())]
        conf = ["--cluster-config-file", str(workdir / "nodes.conf")]
        server.options = [*server.options, "--cluster-enabled", "yes", *conf, *bus]
    return server


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
    for attempt in range(5):  # Prometheus cannot report a port it picked: see redis_server
        port = _free_port()
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
            wait_healthy(url, proc=proc, path="/-/ready", timeout_s=30)
            break
        except (RuntimeError, TimeoutError) as exc:
            stop(proc, grace_s=10)
            if attempt == 4 or not _port_taken(log_path.read_text()):
                raise RuntimeError(
                    f"prometheus did not start: {exc}\n{log_path.read_text()}"
                ) from exc
    try:
        yield url
    finally:
        stop(proc, grace_s=10)
        shutil.rmtree(data, ignore_errors=True)


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
