"""Gateway processes coordinated through a real redis-server: the issue's target run
(two `serve` commands with 2 processes each, sim workers with 1, 2 and 2 slots), a
SIGKILLed dispatcher, Redis stopped and started again; and the driver in this
process on plain Redis and a one-node Redis Cluster."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.balancer import Balancer
from gateway.coordination import Coordination, Keys, open_coordination, shared_view
from gateway.testing import registry_yaml
from tests.support import (
    RedisServer,
    SimWorker,
    gateway_child,
    make_registry,
    redis_server,
    sim_workers,
    wait_until,
)

SLOTS = (1, 2, 2)
LEASE_S = 1.5
STEP_MS = 5


@contextmanager
def fleet(
    redis: RedisServer, tmp_path: Path, **pool: Any
) -> Iterator[tuple[list[str], list[SimWorker]]]:
    """3 sim workers (1, 2, 2 slots, as many as the registry says) and two `serve`
    commands of 2 processes each on one registry, all joined before it yields."""
    options = [("--concurrency", str(n), "--step-ms", str(STEP_MS), "--size", "16") for n in SLOTS]
    with ExitStack() as stack:
        sims = stack.enter_context(sim_workers(*options))
        workers = [{"url": s.url, "max_concurrency": n} for s, n in zip(sims, SLOTS, strict=True)]
        coordination = {"url": redis.url, "lease_s": LEASE_S}
        text = registry_yaml({"gpu": workers}, sections={"coordination": coordination}, **pool)
        config = tmp_path / "adapters.yaml"
        config.write_text(text)
        urls = []
        for _ in range(2):
            url, _proc = stack.enter_context(gateway_child(str(config), "--processes", "2"))
            urls.append(url)
        wait_until(lambda: len(members(redis)) == 4)
        yield urls, sims


def members(redis: RedisServer) -> list[str]:
    with redis.client() as client:
        return [_text(m) for m in client.zrange(Keys("gpu").members, 0, -1)]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def leader(redis: RedisServer) -> str | None:
    with redis.client() as client:
        found = client.get(Keys("gpu").leader)
        return None if found is None else _text(found)


def slot_records(redis: RedisServer) -> int:
    """Slots held in the shared view, all processes together."""
    with redis.client() as client:
        return sum(int(client.hlen(key)) for key in client.keys("{gw:gpu}:slots:*"))


class Load:
    """`n` requests at `concurrency` over `urls` (in turn), in a thread; by URL, what
    each got: a status code or the transport error's name."""

    def __init__(self, urls: Sequence[str], n: int, concurrency: int, steps: int = 4) -> None:
        self.urls, self.n, self.concurrency, self.steps = urls, n, concurrency, steps
        self.results: dict[str, list[int | str]] = {url: [] for url in urls}
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()))

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(120)
        assert not self.thread.is_alive(), "the load never finished"

    def failed(self) -> list[int | str]:
        return [r for rs in self.results.values() for r in rs if r != 200]

    @property
    def done(self) -> int:
        return sum(len(r) for r in self.results.values())

    async def _run(self) -> None:
        gate = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(timeout=60) as client:

            async def one(i: int) -> None:
                url = self.urls[i % len(self.urls)]
                body = {"prompt": f"p{i}", "num_inference_steps": self.steps, "guidance_scale": 7.5}
                async with gate:
                    try:
                        resp = await client.post(f"{url}/v1/images/generations", json=body)
                        got: int | str = resp.status_code
                        if got != 200:
                            got = f"{got} {resp.text}"
                    except httpx.TransportError as exc:
                        got = type(exc).__name__
                self.results[url].append(got)

            await asyncio.gather(*(one(i) for i in range(self.n)))


def assert_no_worker_overcommitted(sims: Sequence[SimWorker]) -> None:
    for sim, slots in zip(sims, SLOTS, strict=True):
        stats = sim.stats()
        assert stats["peak_concurrency"] <= slots, stats
        assert stats["queued_peak"] == 0, stats


def assert_every_slot_usable_and_none_doubled(
    urls: Sequence[str], sims: Sequence[SimWorker]
) -> None:
    """A burst of long generations: all 5 slots run at once (none lost in the shared
    view) and nothing waits inside a worker (none counted twice)."""
    seen_running, seen_waiting = 0, 0
    samples = []
    with httpx.Client(timeout=5) as client, Load(urls, n=30, concurrency=30, steps=50) as load:
        while load.done < load.n:
            stats = [client.get(f"{sim.url}/stats").json() for sim in sims]
            samples.append([s["in_flight"] for s in stats])
            seen_running = max(seen_running, sum(s["in_flight"] for s in stats))
            seen_waiting = max(seen_waiting, sum(s["waiting"] for s in stats))
    assert all(r == 200 for rs in load.results.values() for r in rs), load.results
    views = []
    for _ in range(8):
        for url in urls:
            status = httpx.get(f"{url}/status").json()["pools"]["gpu"]
            views.append([(w["in_flight"], w["state"]) for w in status["workers"]])
    assert seen_running == sum(SLOTS), (views, samples)
    assert seen_waiting == 0


# Four gateway processes, three sim workers and a load on two shared cores: minutes
# when the machine is busy, not the suite's default two.
@pytest.mark.timeout(400)
def test_four_processes_share_the_slots_of_three_workers(tmp_path: Path) -> None:
    with redis_server() as redis, fleet(redis, tmp_path) as (urls, sims):
        with Load(urls, n=300, concurrency=32) as load:
            pass
        assert all(r == 200 for rs in load.results.values() for r in rs), load.results
        assert sum(s.stats()["served"] for s in sims) == 300
        assert_no_worker_overcommitted(sims)
        assert leader(redis) in members(redis)
        wait_until(lambda: slot_records(redis) == 0)


@pytest.mark.timeout(400)
def test_a_sigkilled_dispatcher_returns_its_slots_and_survivors_lose_nothing(
    tmp_path: Path,
) -> None:
    with redis_server() as redis, fleet(redis, tmp_path) as (urls, sims):
        victim = leader(redis)
        assert victim is not None
        pid = int(victim.split("-")[0])
        with Load(urls, n=200, concurrency=32) as load:
            wait_until(lambda: load.done >= 100, within_s=120)
            os.kill(pid, signal.SIGKILL)  # the dispatcher, mid-run
        # Its slots and its election come back within the lease; its own clients' requests
        # are gone with it (a transport error), every other request is answered.
        failed = [r for rs in load.results.values() for r in rs if r != 200]
        assert all(isinstance(r, str) for r in failed), failed
        assert len(failed) <= 32
        wait_until(lambda: leader(redis) not in (None, victim), within_s=3 * LEASE_S)
        wait_until(lambda: victim not in members(redis) and slot_records(redis) == 0)
        assert_no_worker_overcommitted(sims)
        assert_every_slot_usable_and_none_doubled(urls, sims)


@pytest.mark.timeout(400)
def test_redis_outage_falls_back_to_shares_then_rejoins(tmp_path: Path) -> None:
    with redis_server() as redis, fleet(redis, tmp_path) as (urls, sims):
        with Load(urls, n=200, concurrency=32) as load:
            wait_until(lambda: load.done >= 60, within_s=120)
            redis.kill()  # every key gone, as after a failover to an empty replica
            time.sleep(1.0)
            redis.start()
        assert load.failed() == [], load.failed()
        wait_until(lambda: len(members(redis)) == 4 and leader(redis) is not None)
        for url in urls:  # each serve's processes said so, in a metric
            text = httpx.get(f"{url}/metrics").text
            line = next(x for x in text.splitlines() if x.startswith("gateway_coordination_fall"))
            assert float(line.split()[-1]) >= 1
        wait_until(lambda: slot_records(redis) == 0)
        assert_every_slot_usable_and_none_doubled(urls, sims)


# -- the driver in this process --------------------------------------------------------


@asynccontextmanager
async def coordinated(
    url: str, *, cluster: bool, n: int, drivers: list[Coordination] | None = None
) -> AsyncIterator[list[Balancer]]:
    """`n` balancers coordinated through `url`, each with its driver running (put in
    `drivers` when given, for a test to beat them itself)."""
    registry = make_registry(
        {"gpu": [{"url": "http://127.0.0.1:9", "max_concurrency": 2}]},
        sections={"coordination": {"url": url, "cluster": cluster, "timeout_ms": 2000}},
        queue_timeout_s=20,
    )
    balancers = [Balancer(registry, rng=random.Random(i)) for i in range(n)]
    async with AsyncExitStack() as stack:
        coordinations: list[Coordination] = []
        for balancer in balancers:
            found = await stack.enter_async_context(open_coordination(registry, balancer))
            assert found is not None
            coordinations.append(found)
        if drivers is not None:
            drivers.extend(coordinations)
        for coordination in coordinations:
            await coordination.beat()
        tasks = [asyncio.create_task(c.run()) for c in coordinations]
        try:
            yield balancers
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "cluster"])
async def test_processes_in_one_event_loop_hold_at_most_the_workers_slots(cluster: bool) -> None:
    with redis_server(cluster=cluster) as redis:
        async with coordinated(redis.url, cluster=cluster, n=3) as balancers:
            inside = peak = 0

            async def one(i: int) -> None:
                nonlocal inside, peak
                pool = balancers[i % 3].pool("gpu")
                with pool.attempt(adapter=None) as attempt:
                    async with attempt.slot():
                        inside += 1
                        peak = max(peak, inside)
                        await asyncio.sleep(0.005)
                        inside -= 1

            await asyncio.gather(*(one(i) for i in range(60)))
            assert peak == 2
            roles = sorted(b.pool("gpu").relay.role for b in balancers)  # type: ignore[union-attr]
            assert roles == ["follower", "follower", "leader"]


async def test_a_follower_reports_the_dispatchers_view_of_health_and_queue() -> None:
    """Tries fail and workers are ejected at the dispatcher: a follower's /readyz and
    /status must say what the dispatcher sees, not what its own probes last saw."""
    with redis_server() as redis:
        drivers: list[Coordination] = []
        async with coordinated(redis.url, cluster=False, n=2, drivers=drivers) as balancers:
            pools = [b.pool("gpu") for b in balancers]
            lead = next(p for p in pools if p.relay.role == "leader")  # type: ignore[union-attr]
            follow = next(p for p in pools if p is not lead)
            lead.probed(lead.workers[0], False)  # the dispatcher takes the worker out
            assert follow.healthy_count() == 1  # the follower's own view never saw it
            for _ in range(2):  # the leader writes its view, the follower reads it
                for driver in drivers:
                    await driver.beat()
            view = shared_view(follow)
            assert view is not None
            assert view.healthy() == 0
            assert view.workers[follow.workers[0].url]["state"] == "down"
            assert shared_view(lead) is None  # the dispatcher's own view is the pool's
