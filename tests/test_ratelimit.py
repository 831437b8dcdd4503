"""Per-key rate limits (in memory, in a real redis-server, shared by two real gateway
processes) and the per-key cap on requests in flight."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from gateway.errors import RateLimited
from gateway.ratelimit import (
    KeyLimits,
    MemoryRateLimiter,
    RedisRateLimiter,
    SharedInFlight,
    open_rate_limiter,
)
from gateway.registry import KeySpec, RateSpec
from gateway.state import served_of
from gateway.testing import ServedSim, fake_worker, gateway, registry_yaml, served_gateway, sleeps
from tests.support import (
    api_key,
    bearer,
    body,
    dead_redis_url,
    dead_url,
    gateway_process,
    make_registry,
    redis_server,
)

KEY = "gw_rate-test-key"
GEN = "/v1/images/generations"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def redis_url() -> Iterator[str]:
    with redis_server() as server:
        yield server.url


def test_memory_gcra_admits_the_burst_then_one_per_interval() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    rate = RateSpec(per_s=2, burst=3)
    assert [limiter.check("k", rate) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.check("k", rate) == pytest.approx(0.5)
    assert limiter.check("other", rate) == 0.0  # keys are independent
    clock.now += 0.5
    assert limiter.check("k", rate) == 0.0
    assert limiter.check("k", rate) == pytest.approx(0.5)
    clock.now += 60  # a long pause refills the burst, never more
    assert [limiter.check("k", rate) for _ in range(4)][-1] == pytest.approx(0.5)


def test_burst_defaults_to_one_seconds_worth() -> None:
    assert RateSpec(per_s=5).capacity == 5
    assert RateSpec(per_s=0.1).capacity == 1


async def test_redis_gcra_admits_exactly_the_burst(redis_url: str) -> None:
    async with open_rate_limiter(redis_url) as limiter:
        rate = RateSpec(per_s=0.01, burst=5)
        waits = await asyncio.gather(*(limiter.wait_s("k", rate) for _ in range(20)))
        other = await limiter.wait_s("other", rate)
    assert sum(w == 0 for w in waits) == 5
    assert all(w == pytest.approx(100, abs=1) for w in waits if w)  # one interval: 100 s
    assert other == 0


async def test_redis_down_falls_back_to_the_process_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.ratelimit")
    clock = FakeClock()
    with redis_server() as server:
        server.kill()  # down from the start; started again on its port below
        client = Redis.from_url(server.url, socket_connect_timeout=0.25)
        limiter = RedisRateLimiter(client, fallback=MemoryRateLimiter(clock=clock), clock=clock)
        rate = RateSpec(per_s=0.01, burst=3)
        try:
            waits = [await limiter.wait_s("k", rate) for _ in range(5)]
            clock.now += 10  # past the retry pause: Redis is tried again, still down
            waits.append(await limiter.wait_s("k2", rate))
            server.start()
            clock.now += 10
            back = await limiter.wait_s("k", rate)
        finally:
            await client.aclose()
    assert [w == 0 for w in waits] == [True, True, True, False, False, True]
    assert back == 0  # Redis has its own, fresh count
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.ratelimit"]
    assert messages == [
        "rate limits: Redis unreachable (ConnectionError); limits are per process until it is back",
        "rate limits: Redis is back; limits are shared by all replicas again",
    ]


async def test_unreachable_redis_never_refuses_a_request_by_itself(
    fast_sims: list[ServedSim],
) -> None:
    keys = [api_key("team-a", KEY, rate={"per_s": 0.01, "burst": 3})]
    auth = {"keys": keys, "redis_url": dead_redis_url("hunter2")}
    registry = make_registry({"p": [fast_sims[0].url]}, sections={"auth": auth})
    async with served_gateway(registry) as url, httpx.AsyncClient(base_url=url) as client:
        codes = [
            (await client.post(GEN, json=body(), headers=bearer(KEY))).status_code for _ in range(5)
        ]
    assert codes == [200, 200, 200, 429, 429]  # the burst, kept by the process


async def test_over_the_rate_is_429_with_retry_after(fast_sims: list[ServedSim]) -> None:
    keys = [api_key("team-a", KEY, rate={"per_s": 0.5, "burst": 2})]
    registry = make_registry({"p": [fast_sims[0].url]}, sections={"auth": {"keys": keys}})
    async with served_gateway(registry) as url, httpx.AsyncClient(base_url=url) as client:
        answers = [await client.post(GEN, json=body(), headers=bearer(KEY)) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[2].headers["retry-after"] == "2"  # one interval at 0.5/s
    assert answers[2].json() == {"detail": "key 'team-a' is over its rate limit (0.5/s, burst 2)"}


def two_gateways_config(tmp_path: Path, sims: list[ServedSim], redis_url: str) -> str:
    keys = [api_key("team-a", KEY, rate={"per_s": 0.01, "burst": 10})]
    text = registry_yaml(
        {"p": [s.url for s in sims]},
        # Patient Redis calls: a busy CI machine must not be read as a failing Redis
        # (the fallback to per-process limits is tested on its own, above).
        sections={"auth": {"keys": keys, "redis_url": redis_url, "redis_timeout_ms": 5000}},
    )
    path = tmp_path / "adapters.yaml"
    path.write_text(text)
    return str(path)


async def test_100_parallel_requests_over_two_gateways_admit_exactly_the_burst(
    tmp_path: Path, fast_sims: list[ServedSim], redis_url: str
) -> None:
    config = two_gateways_config(tmp_path, fast_sims, redis_url)
    with ExitStack() as stack:
        urls = [stack.enter_context(gateway_process(config)) for _ in range(2)]
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            answers = await asyncio.gather(
                *(
                    client.post(urls[i % 2] + GEN, json=body(seed=i), headers=bearer(KEY))
                    for i in range(100)
                )
            )
    codes = [a.status_code for a in answers]
    assert codes.count(200) == 10, codes
    assert codes.count(429) == 90, codes
    # Each process alone would have admitted its own burst of 10: 20 in all.
    assert all(int(a.headers["retry-after"]) >= 1 for a in answers if a.status_code == 429)


async def test_max_concurrent_refuses_the_excess_with_429() -> None:
    keys = [api_key("team-a", KEY, max_concurrent=2)]
    async with fake_worker(sleeps(0.3)) as worker:
        registry = make_registry({"p": [worker.url]}, sections={"auth": {"keys": keys}})
        async with served_gateway(registry) as url, httpx.AsyncClient(base_url=url) as client:
            answers = await asyncio.gather(
                *(client.post(GEN, json=body(), headers=bearer(KEY)) for _ in range(4))
            )
            after = await client.post(GEN, json=body(), headers=bearer(KEY))
    codes = sorted(a.status_code for a in answers)
    assert codes == [200, 200, 429, 429]
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert "max_concurrent" in refused.json()["detail"]
    assert after.status_code == 200  # the slots were given back


async def test_every_ending_gives_the_slot_back() -> None:
    keys: list[dict[str, Any]] = [api_key("team-a", KEY, max_concurrent=1, adapters=["p"])]
    registry = make_registry(
        {"p": [dead_url()]},
        [{"name": "p", "pool": "p", "default": True}, {"name": "q", "pool": "p"}],
        sections={"auth": {"keys": keys}},
    )
    async with gateway(registry) as gw:
        for payload in (body(model="nope"), body(model="q"), {"prompt": 1}, body()):
            resp = await gw.client.post(GEN, json=payload, headers=bearer(KEY))
            assert resp.status_code in (404, 403, 422, 502)
        limits: KeyLimits = served_of(gw.app).key_limits
        assert limits._in_flight == {}


async def test_a_refused_rate_costs_no_slot_and_a_refused_slot_no_token() -> None:
    clock = FakeClock()
    limits = KeyLimits(rate=MemoryRateLimiter(clock=clock))
    key = KeySpec(name="k", sha256="0" * 64, rate=RateSpec(per_s=1, burst=1), max_concurrent=1)
    async with limits.admit(key):
        with pytest.raises(RateLimited, match="requests in flight"):
            async with limits.admit(key):
                pass
    clock.now += 1  # the refused slot above took no token: one is there now
    async with limits.admit(key):
        pass
    with pytest.raises(RateLimited, match="rate limit"):
        async with limits.admit(key):
            pass
    assert limits._in_flight == {}


# -- max_concurrent across replicas ----------------------------------------------------


def shared_limits(client: Redis, *, lease_s: float = 10.0, replicas: int = 1) -> KeyLimits:
    """One process's limits: rates in memory (not the point here), in-flight in Redis."""
    shared = SharedInFlight(client, lease_s=lease_s, replicas=lambda: replicas)
    return KeyLimits(rate=MemoryRateLimiter(), shared=shared)


CAPPED = KeySpec(name="team-a", sha256="0" * 64, max_concurrent=2)


async def test_max_concurrent_is_one_count_across_processes(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    try:
        one, two = shared_limits(client), shared_limits(client)
        async with one.admit(CAPPED), two.admit(CAPPED):
            for limits in (one, two):  # the third request, in either process: refused
                with pytest.raises(RateLimited, match="2 requests in flight"):
                    async with limits.admit(CAPPED):
                        pass
        async with one.admit(CAPPED), one.admit(CAPPED):  # both given back
            pass
        assert one._in_flight == {}
        assert await client.zcard("gateway:inflight:team-a") == 0
    finally:
        await client.aclose()


async def test_a_crashed_processs_requests_leave_the_count_within_the_lease(
    redis_url: str,
) -> None:
    client = Redis.from_url(redis_url)
    try:
        crashed = SharedInFlight(client, lease_s=0.3)
        assert await crashed.take("team-a", 2)  # held, never given back nor renewed
        alive = SharedInFlight(client, lease_s=0.3)
        renewing = asyncio.create_task(alive.renew())  # a live process renews its own
        try:
            assert await alive.take("team-a", 2)
            assert await alive.take("team-a", 2) is False  # the crashed one still counts
            await asyncio.sleep(0.5)
            assert await alive.take("team-a", 2)  # its lease lapsed; the live one's stayed
            assert await alive.take("team-a", 2) is False
        finally:
            renewing.cancel()
    finally:
        await client.aclose()


async def test_max_concurrent_without_redis_is_this_processs_share(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = Redis.from_url(dead_redis_url(), socket_connect_timeout=0.5)
    try:
        limits = shared_limits(client, replicas=2)
        key = KeySpec(name="team-a", sha256="0" * 64, max_concurrent=3)
        async with limits.admit(key), limits.admit(key):  # ceil(3 / 2) = 2 here
            with pytest.raises(RateLimited):
                async with limits.admit(key):
                    pass
        assert limits._in_flight == {}
        said = [r.message for r in caplog.records if "max_concurrent" in r.message]
        assert len(said) == 1  # once, not per request
    finally:
        await client.aclose()
