"""What a cache hit costs next to a generation: the gateway's hit path (memory and Redis
backends) against its miss path and against sending the same requests to the worker
directly, in one run, with ratios.

Everything runs on loopback as it would in production, each in its own process: a sim
worker, redis-server, and `gateway serve` (uvicorn, uvloop, httptools) per backend. The
load comes from this process: `--concurrency` clients in a closed loop on one aiohttp
session (httpx would be the bottleneck). Misses use a fresh seed per request, so each one
is a generation; hits repeat one request that was cached beforehand.

    .venv/bin/python -m bench.cache [--hits 5000] [--misses 300] [--concurrency 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis
import uvloop

from gateway.simworker import start_child, start_sim, stop
from gateway.testing import registry_yaml

PATH = "/v1/images/generations"


@dataclass(frozen=True)
class Run:
    name: str
    requests: int
    seconds: float
    latencies_ms: list[float]
    cache: dict[str, int]  # X-Cache values seen

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def quantile(self, q: float) -> float:
        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[
            round(q * 100) - 1
        ]


def request_body(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    steps = args.steps
    return {
        "prompt": "a red fox",
        "num_inference_steps": steps,
        "guidance_scale": 7.5,
        "seed": seed,
    }


async def drive(
    name: str, url: str, bodies: Callable[[int], dict[str, Any]], *, n: int, concurrency: int
) -> Run:
    """`n` POSTs from `concurrency` closed-loop clients; request i sends bodies(i)."""
    latencies: list[float] = []
    cache: dict[str, int] = {}
    counter = iter(range(n))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            for i in counter:
                sent = time.perf_counter()
                async with session.post(url + PATH, json=bodies(i)) as resp:
                    await resp.read()
                    assert resp.status == 200, resp.status
                    label = resp.headers.get("X-Cache", "-")
                latencies.append((time.perf_counter() - sent) * 1000)
                cache[label] = cache.get(label, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return Run(name, n, seconds, latencies, cache)


@contextmanager
def sim_worker(*options: str) -> Iterator[str]:
    """`gateway sim-worker` in a child process; its URL."""
    child = start_sim(*options)
    try:
        yield child.wait_ready()
    finally:
        stop(child.proc)


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """redis-server on loopback, no persistence; its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: apt-get install -y redis-server")
    port = _free_port()  # redis-server cannot report a port it picked
    cmd = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", str(workdir)]
    proc = subprocess.Popen([*cmd, "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("redis-server did not start") from None
                time.sleep(0.02)
        client.close()
        yield f"redis://127.0.0.1:{port}"
    finally:
        stop(proc)


@contextmanager
def gateway(worker_url: str, cache: dict[str, Any] | None, workdir: Path) -> Iterator[str]:
    """`gateway serve` in a child process on a registry of `worker_url`; its URL."""
    config = workdir / f"adapters-{len(list(workdir.iterdir()))}.yaml"
    config.write_text(
        registry_yaml({"sdxl": [{"url": worker_url, "max_concurrency": 64}]}, cache=cache)
    )
    options = ["--log-level", "warning", "--drain-grace-s", "0"]
    child = start_child(["serve", "--config", str(config), *options])
    try:
        yield child.wait_ready(path="/healthz")
    finally:
        stop(child.proc)


async def measure(args: argparse.Namespace, worker: str, gateways: dict[str, str]) -> list[Run]:
    """Every path `--rounds` times, interleaved so that background noise on a shared
    machine spreads over all of them; each path is then reported by its median round."""
    c = args.concurrency
    seeds = iter(range(1, 10**9))  # a fresh seed for every miss, across all runs

    def fresh(i: int) -> dict[str, Any]:
        return request_body(args, next(seeds))

    def same(i: int) -> dict[str, Any]:
        return request_body(args, 0)

    for url in gateways.values():
        await drive("warm-up", url, same, n=200, concurrency=c)  # stores seed 0, warms pools
    rounds: dict[str, list[Run]] = {}
    for _ in range(args.rounds):
        runs = [await drive("direct to worker", worker, fresh, n=args.misses, concurrency=c)]
        for backend, url in gateways.items():
            runs.append(await drive(f"miss, {backend}", url, fresh, n=args.misses, concurrency=c))
            runs.append(await drive(f"hit, {backend}", url, same, n=args.hits, concurrency=c))
        for run in runs:
            rounds.setdefault(run.name, []).append(run)
    return [median_round(runs) for runs in rounds.values()]


def median_round(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda run: run.rate)[len(runs) // 2]


def table(runs: list[Run]) -> str:
    lines = [
        "| path | requests | req/s | p50 ms | p99 ms | X-Cache seen |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for run in runs:
        seen = ", ".join(f"{k} {v}" for k, v in sorted(run.cache.items()))
        lines.append(
            f"| {run.name} | {run.requests} | {run.rate:,.0f} | {run.quantile(0.5):.2f} "
            f"| {run.quantile(0.99):.2f} | {seen} |"
        )
    return "\n".join(lines)


def ratios(runs: list[Run]) -> str:
    by = {run.name: run for run in runs}
    direct = by["direct to worker"]
    lines = []
    for backend in ("memory", "redis"):
        hit, miss = by[f"hit, {backend}"], by[f"miss, {backend}"]
        lines += [
            f"- {backend}: hit vs miss throughput {hit.rate / miss.rate:,.1f}x; "
            f"hit p50 is {hit.quantile(0.5) / direct.quantile(0.5):.1%} of a direct "
            f"generation's p50; miss p50 costs {miss.quantile(0.5) - direct.quantile(0.5):+.2f} ms "
            f"over direct (p99 {miss.quantile(0.99) - direct.quantile(0.99):+.2f} ms)",
        ]
    redis, memory = by["hit, redis"], by["hit, memory"]
    lines.append(
        f"- Redis hit vs memory hit: {redis.rate / memory.rate:.2f}x the throughput, "
        f"p50 {redis.quantile(0.5) - memory.quantile(0.5):+.2f} ms"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hits", type=int, default=5000, help="requests per hit run")
    parser.add_argument("--misses", type=int, default=300, help="requests per miss run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="report each path's median")
    parser.add_argument("--steps", type=int, default=10, help="inference steps per request")
    parser.add_argument("--step-ms", type=float, default=10.0, help="sim worker time per step")
    parser.add_argument("--size", type=int, default=512, help="image width and height")
    args = parser.parse_args()
    sim = ["--step-ms", str(args.step_ms), "--concurrency", "64", "--size", str(args.size)]
    with ExitStack() as stack:
        worker = stack.enter_context(sim_worker(*sim))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        redis_url = stack.enter_context(redis_server(workdir))
        gateways = {
            "memory": stack.enter_context(gateway(worker, None, workdir)),
            "redis": stack.enter_context(gateway(worker, {"url": redis_url}, workdir)),
        }
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runs = runner.run(measure(args, worker, gateways))
    print(
        f"sim worker: {args.steps} steps x {args.step_ms:g} ms, {args.size}px JPEG; "
        f"{args.concurrency} concurrent clients\n"
    )
    print(table(runs))
    print()
    print(ratios(runs))


if __name__ == "__main__":
    main()


def _free_port() -> int:
    """A port that was free a moment ago (a bench run, not a test: a lost race only
    fails the run)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
