"""A normal client's latency while slow clients hold connections to the gateway.

    python -m bench.slow_clients [--duration 10] [--heads 400] [--bodies 200]

Starts the static upstream and `gateway serve` with its default limits (as
bench/overhead.py does: the gateway pinned to core 0), then sends one request at a
time on a keep-alive connection for `--duration` seconds, first alone, then while
another process holds `--heads` connections that send a request head one header line
a second and `--bodies` that send a head with `Content-Length: 5000` and 10 bytes of
body, then nothing. Each slow connection reconnects when the gateway closes it, so
the count stays up through the cut-offs. Prints the normal client's p50/p99 in both
phases and their ratio, and when and how the slow connections were closed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from pathlib import Path

import aiohttp

from bench.overhead import BODY, NO_STORE, PATH, servers

HEAD = b"POST /v1/images/generations HTTP/1.1\r\nHost: gateway\r\n"
STALLED = HEAD + b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n" + b"0" * 10


@dataclass
class Cuts:
    """How one kind of slow connection ended, seen from the client."""

    after_s: list[float] = field(default_factory=list)  # connect to close
    statuses: list[int] = field(default_factory=list)  # of the answer (0: none)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--heads", type=int, default=400, help="dribbling heads held")
    parser.add_argument("--bodies", type=int, default=200, help="stalled bodies held")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        servers("static", 640, Path(tmp), auth=False, baseline=None) as targets,
    ):
        gateway = targets["gateway"].url
        alone = asyncio.run(normal_client(gateway + PATH, args.duration))
        ready, stop = multiprocessing.Event(), multiprocessing.Event()
        results: multiprocessing.Queue[tuple[Cuts, Cuts, int]] = multiprocessing.Queue()
        holder = multiprocessing.Process(
            target=_hold, args=(gateway, args.heads, args.bodies, ready, stop, results)
        )
        holder.start()
        try:
            if not ready.wait(60):
                raise SystemExit("the slow clients could not all connect")
            time.sleep(1.0)
            held = asyncio.run(normal_client(gateway + PATH, args.duration))
            # Hold on past every default timeout (head 10 s, body gap 10 s), so that each
            # kind has been cut at least once.
            time.sleep(max(0.0, 12.0 - args.duration))
        finally:
            stop.set()
        heads, bodies, peak = results.get(timeout=60)
        holder.join(10)
    report(alone, held, heads, bodies, peak, args)


async def normal_client(url: str, duration: float) -> list[float]:
    """Latencies (ms) of one request at a time for `duration` seconds, keep-alive."""
    headers = {"Content-Type": "application/json", "Cache-Control": NO_STORE}
    payload = json.dumps(BODY).encode()
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        deadline = time.perf_counter() + duration
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            async with session.post(url, data=payload, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise SystemExit(
                        f"the normal client got HTTP {resp.status}: {await resp.text()}"
                    )
            latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def _hold(
    url: str,
    heads: int,
    bodies: int,
    ready: Event,
    stop: Event,
    results: multiprocessing.Queue[tuple[Cuts, Cuts, int]],
) -> None:
    results.put(asyncio.run(_hold_all(url, heads, bodies, ready, stop)))


async def _hold_all(
    url: str, heads: int, bodies: int, ready: Event, stop: Event
) -> tuple[Cuts, Cuts, int]:
    host, port = url.removeprefix("http://").split(":")
    head_cuts, body_cuts = Cuts(), Cuts()
    open_now = 0
    peak = 0
    connected = asyncio.Event()
    target = heads + bodies

    async def one(first: bytes, dribble: bytes, cuts: Cuts) -> None:
        nonlocal open_now, peak
        while not stop.is_set():
            reader, writer = await asyncio.open_connection(host, int(port))
            started = time.monotonic()
            open_now += 1
            peak = max(peak, open_now)
            if open_now >= target:
                connected.set()
            try:
                writer.write(first)
                answer = asyncio.create_task(_read_all(reader))
                while not answer.done() and not stop.is_set():
                    await asyncio.wait([answer], timeout=1.0)
                    if dribble and not answer.done():
                        writer.write(dribble)
                if answer.done():
                    data = answer.result()
                    cuts.after_s.append(time.monotonic() - started)
                    cuts.statuses.append(int(data.split()[1]) if data else 0)
                else:
                    answer.cancel()
            finally:
                open_now -= 1
                writer.close()

    tasks = [asyncio.create_task(one(HEAD, b"X-Dribble: v\r\n", head_cuts)) for _ in range(heads)]
    tasks += [asyncio.create_task(one(STALLED, b"", body_cuts)) for _ in range(bodies)]
    await connected.wait()
    ready.set()
    await asyncio.to_thread(stop.wait)
    await asyncio.gather(*tasks, return_exceptions=True)
    return head_cuts, body_cuts, peak


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    data = b""
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _pct(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100)[p - 1] if len(values) > 1 else values[0]


def report(
    alone: list[float],
    held: list[float],
    heads: Cuts,
    bodies: Cuts,
    peak: int,
    args: argparse.Namespace,
) -> None:
    print(
        f"gateway serve, default limits; normal client: one request at a time, keep-alive, "
        f"{args.duration:g} s per phase; slow connections held at once: {peak}\n"
    )
    print(f"{'phase':<28} {'requests':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>8} {'<100 ms':>8}")
    for name, lat in (("alone", alone), (f"{args.heads} heads + {args.bodies} bodies", held)):
        p50, p99, fast = _pct(lat, 50), _pct(lat, 99), sum(x < 100 for x in lat) / len(lat)
        print(f"{name:<28} {len(lat):>8} {p50:>7.2f} {p99:>7.2f} {max(lat):>8.1f} {fast:>8.2%}")
    print(
        f"\nwith/without: p50 {_pct(held, 50) / _pct(alone, 50):.2f}x, "
        f"p99 {_pct(held, 99) / _pct(alone, 99):.2f}x"
    )
    for name, cuts in (("dribbling heads", heads), ("stalled bodies", bodies)):
        if not cuts.after_s:
            print(f"{name}: none closed by the gateway")
            continue
        statuses = {s: cuts.statuses.count(s) for s in sorted(set(cuts.statuses))}
        print(
            f"{name}: {len(cuts.after_s)} closed by the gateway after "
            f"{min(cuts.after_s):.1f}-{max(cuts.after_s):.1f} s, answers {statuses}"
        )


if __name__ == "__main__":
    main()
