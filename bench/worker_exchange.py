"""The CPU of one worker exchange on the miss path: `post_json` and nothing around it.

    python -m bench.worker_exchange [--count 3000] [--rounds 5] [--baseline DIR]
                                    [--raw]

A static upstream (bench/static_upstream.py, on the other cores) answers every POST
with the same 149 KB answer; a child process, pinned to core 0, runs `--count`
exchanges at concurrency 16 through the gateway's own `open_worker_session` and
`post_json` (uvloop, the pipeline's per-try `ClientTimeout` and headers, no answer
check) and prints its own CPU time per exchange. `--baseline DIR` runs the same child
against another checkout (`git worktree add /tmp/old <commit>`) in alternate rounds,
and the ratio of each round is printed: the figure for a change to the exchange.
`--raw` adds a row for an `asyncio.BufferedProtocol` client that writes the request
and reads the answer into one buffer: the floor under any HTTP client in Python.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

Exchange = Callable[[], Awaitable[None]]

CONCURRENCY = 16
HERE = Path(__file__).resolve().parents[1]  # this checkout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=3000, help="exchanges per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="another checkout to compare")
    parser.add_argument("--raw", action="store_true", help="add the raw-protocol floor")
    parser.add_argument("--lean", action="store_true", help="add bench/lean_client.py's row")
    parser.add_argument("--child", choices=["gateway", "raw", "lean"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import uvloop

        print(json.dumps(uvloop.run(_child(args.child, args.url, args.count))))
        return
    run(args.count, args.rounds, args.baseline, args.raw, args.lean)


def run(count: int, rounds: int, baseline: Path | None, raw: bool, lean: bool) -> None:
    from bench.overhead import _free_port, image_response

    cores = os.cpu_count() or 1
    pin = shutil.which("taskset") is not None and cores >= 2
    rows: dict[str, Path | None] = {"gateway": HERE}
    if baseline is not None:
        rows["baseline"] = baseline.resolve()
    if lean:
        rows["lean"] = None
    if raw:
        rows["raw"] = None
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "answer.json"
        body.write_bytes(image_response(640))
        port = _free_port()
        up_cmd = [sys.executable, "-m", "bench.static_upstream", "--port", str(port)]
        up_cpu = ["taskset", "-c", f"1-{cores - 1}"] if pin else []
        upstream = subprocess.Popen([*up_cpu, *up_cmd, "--body-file", str(body)])
        try:
            wait_port(port)
            url = f"http://127.0.0.1:{port}/v1/images/generations"
            figures: dict[str, list[float]] = {name: [] for name in rows}
            for round_ in range(rounds):
                order = list(rows) if round_ % 2 == 0 else list(reversed(rows))
                for name in order:
                    figures[name].append(_round(name, rows[name], url, count, pin))
                line = "  ".join(f"{n} {figures[n][-1]:.1f} us" for n in rows)
                print(f"round {round_ + 1}: {line}", flush=True)
        finally:
            upstream.terminate()
            upstream.wait()
    _report(figures)


def wait_port(port: int, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def _round(name: str, tree: Path | None, url: str, count: int, pin: bool) -> float:
    kind = name if tree is None else "gateway"
    env = {**os.environ, "PYTHONPATH": str(tree or HERE)}
    cmd = [sys.executable, __file__, "--child", kind, "--url", url, "--count", str(count)]
    out = subprocess.run(
        [*(["taskset", "-c", "0"] if pin else []), *cmd],
        env=env,
        cwd=tree,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: float = json.loads(out.splitlines()[-1])["cpu_us"]
    return result


def _report(figures: dict[str, list[float]]) -> None:
    print(f"\nCPU per exchange, c={CONCURRENCY}, 149 KB answer (median of rounds):")
    for name, values in figures.items():
        print(f"  {name:9} {statistics.median(values):7.1f} us")
    for name in ("lean", "raw"):
        if name in figures:
            ratios = [r / g for r, g in zip(figures[name], figures["gateway"], strict=True)]
            print(f"  {name} / gateway: {statistics.median(ratios):.2f}x")
    if "baseline" in figures:
        ratios = [g / b for g, b in zip(figures["gateway"], figures["baseline"], strict=True)]
        each = " ".join(f"{r:.2f}" for r in ratios)
        print(f"  gateway / baseline: {statistics.median(ratios):.2f}x ({each})")


async def _child(kind: str, url: str, count: int) -> dict[str, float]:
    make = {"gateway": _gateway_exchange, "raw": _raw_exchange, "lean": _lean_exchange}[kind]
    exchange = await make(url)
    for _ in range(200):  # warm: connections open, code paths hot
        await exchange()
    done = 0

    async def client() -> None:
        nonlocal done
        while done < count:
            done += 1
            await exchange()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_us": cpu / done * 1e6, "per_s": done / wall}


PAYLOAD = {
    "prompt": "a lighthouse at dusk",
    "num_inference_steps": 4,
    "guidance_scale": 0.0,
    "model": None,
    "response_format": "jpeg",
    "seed": 7,
}


async def _gateway_exchange(url: str) -> Exchange:
    import aiohttp

    from gateway.protocols import open_worker_session
    from gateway.protocols.http import post_json

    session = open_worker_session(slots=CONCURRENCY)
    payload = json.dumps(PAYLOAD, separators=(",", ":")).encode()

    async def exchange() -> None:
        # What the pipeline makes for every try: a timeout of what is left, the headers.
        timeout = aiohttp.ClientTimeout(total=300.0, sock_connect=5.0)
        headers = {"X-Request-ID": os.urandom(16).hex()}
        answer = await post_json(
            session,
            url,
            payload,
            worker="w",
            timeout=timeout,
            headers=headers,
            max_bytes=64 << 20,
        )
        assert answer.status == 200
        assert len(answer.body) > 100_000

    return exchange


async def _lean_exchange(url: str) -> Exchange:
    from bench.lean_client import LeanPool

    host, port = url.split("/")[2].split(":")
    pool = LeanPool(host, int(port), limit=64 << 20)
    payload = json.dumps(PAYLOAD, separators=(",", ":")).encode()
    fixed = b"Content-Type: application/json\r\nAccept-Encoding: identity\r\n"

    async def exchange() -> None:
        headers = fixed + b"X-Request-ID: %s\r\n" % os.urandom(16).hex().encode()
        status, _, body = await pool.post(
            "/v1/images/generations", payload, headers, timeout_s=300.0
        )
        assert status == 200
        assert len(body) > 100_000

    return exchange


class _Raw(asyncio.BufferedProtocol):
    """One keep-alive connection: write a request, read its answer into one buffer."""

    def __init__(self) -> None:
        self.buffer = bytearray(1 << 18)
        self.view = memoryview(self.buffer)
        self.size = 0
        self.want = -1
        self.done: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view[self.size :]

    def buffer_updated(self, nbytes: int) -> None:
        self.size += nbytes
        if self.want < 0:
            end = self.buffer.find(b"\r\n\r\n", 0, self.size)
            if end < 0:
                return
            head = bytes(self.buffer[: end + 2]).lower()
            start = head.index(b"content-length:") + 15
            self.want = end + 4 + int(head[start : head.index(b"\r\n", start)])
        if self.size >= self.want and self.done is not None:
            self.done.set_result(bytes(self.buffer[: self.want]))

    async def exchange(self, request: bytes) -> bytes:
        self.size, self.want = 0, -1
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(request)  # type: ignore[attr-defined]
        return await self.done


async def _raw_exchange(url: str) -> Exchange:
    host_port = url.split("/")[2]
    host, port = host_port.split(":")
    loop = asyncio.get_running_loop()
    idle: list[_Raw] = []
    for _ in range(CONCURRENCY):
        _, proto = await loop.create_connection(_Raw, host, int(port))
        idle.append(proto)
    payload = json.dumps(PAYLOAD, separators=(",", ":")).encode()

    async def exchange() -> None:
        head = (
            f"POST /v1/images/generations HTTP/1.1\r\nHost: {host_port}\r\n"
            f"Content-Type: application/json\r\nX-Request-ID: {os.urandom(16).hex()}\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        proto = idle.pop()
        try:
            answer = await proto.exchange(head.encode() + payload)
        finally:
            idle.append(proto)
        assert len(answer) > 100_000

    return exchange


if __name__ == "__main__":
    main()
