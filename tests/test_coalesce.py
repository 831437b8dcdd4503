from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import redis

from gateway.cache import CacheCounters, CachePolicy, MemoryCache, ResultCache, open_cache
from gateway.causes import Cause
from gateway.coalesce import Coalescer, Produced
from gateway.errors import UpstreamError
from gateway.registry import CacheSpec
from tests.support import dead_url, eventually, redis_cache

KEY = "gateway:v1:" + "ab" * 32


class Generator:
    """A stand-in for forward+store: counts its runs and holds each until released."""

    def __init__(self, cache: ResultCache | None = None, *, fail: bool = False) -> None:
        self.runs = 0
        self.cancelled = 0
        self.release = asyncio.Event()
        self.cache = cache
        self.fail = fail

    async def __call__(self) -> Produced:
        self.runs += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail:
            raise UpstreamError(Cause.HTTP_5XX, "worker sdxl-0", "HTTP 500")
        body = f"image {self.runs}".encode()
        if self.cache is not None:
            await self.cache.store(KEY, body, CachePolicy.USE)
        return Produced(body, "sdxl-0")


def memory_cache(**options: float) -> ResultCache:
    spec = CacheSpec(**options)
    return ResultCache(backend=MemoryCache(max_bytes=2**20), spec=spec)


def counted(cache: ResultCache) -> CacheCounters:
    assert isinstance(cache.observer, CacheCounters)
    return cache.observer


def start(coalescer: Coalescer, produce: Generator, n: int) -> list[asyncio.Task[Produced]]:
    """`n` identical requests, in flight together."""
    run = coalescer.run
    return [asyncio.create_task(run(KEY, produce, policy=CachePolicy.USE)) for _ in range(n)]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_identical_requests_in_flight_share_one_generation() -> None:
    cache = memory_cache()
    coalescer, produce = Coalescer(cache=cache), Generator(cache)
    waiters = start(coalescer, produce, 50)
    await settle()
    produce.release.set()
    results = await asyncio.gather(*waiters)
    assert produce.runs == 1
    assert {r.body for r in results} == {b"image 1"}
    assert counted(cache).coalesced_requests == {"local": 49}
    assert coalescer.in_flight() == 0


@pytest.mark.parametrize("policy", [CachePolicy.REFRESH, CachePolicy.BYPASS])
async def test_no_cache_and_no_store_get_a_generation_of_their_own(policy: CachePolicy) -> None:
    coalescer, produce = Coalescer(cache=memory_cache()), Generator()
    produce.release.set()
    await asyncio.gather(*(coalescer.run(KEY, produce, policy=policy) for _ in range(3)))
    assert produce.runs == 3


async def test_a_waiter_that_leaves_does_not_cancel_the_others() -> None:
    coalescer, produce = Coalescer(cache=memory_cache()), Generator()
    waiters = start(coalescer, produce, 3)
    await settle()
    waiters[0].cancel()  # the first one: the request that started the generation
    await settle()
    produce.release.set()
    assert [r.body for r in await asyncio.gather(*waiters[1:])] == [b"image 1"] * 2
    assert waiters[0].cancelled()
    assert (produce.runs, produce.cancelled) == (1, 0)


async def test_the_last_waiter_leaving_stops_the_generation() -> None:
    coalescer, produce = Coalescer(cache=memory_cache()), Generator()
    waiters = start(coalescer, produce, 2)
    await settle()
    for waiter in waiters:
        waiter.cancel()
    await settle()
    assert produce.cancelled == 1, "nobody wants the image: the worker slot goes back"
    assert coalescer.in_flight() == 0
    produce.release.set()
    again = await coalescer.run(KEY, produce, policy=CachePolicy.USE)
    assert (again.body, produce.runs) == (b"image 2", 2)


async def test_a_failed_generation_fails_every_waiter_and_is_not_remembered() -> None:
    coalescer, produce = Coalescer(cache=memory_cache()), Generator(fail=True)
    waiters = start(coalescer, produce, 10)
    await settle()
    produce.release.set()
    async with asyncio.timeout(5):  # nobody hangs
        outcomes = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(o, UpstreamError) for o in outcomes)
    assert produce.runs == 1
    assert coalescer.in_flight() == 0
    produce.fail = False
    assert (await coalescer.run(KEY, produce, policy=CachePolicy.USE)).body == b"image 2"


@asynccontextmanager
async def replicas(url: str, n: int, **options: float) -> AsyncIterator[list[Coalescer]]:
    """`n` coalescers, each with its own Redis client: gateway replicas in one test."""
    spec = CacheSpec(**redis_cache(url, **options))
    async with AsyncExitStack() as stack:
        caches = [await stack.enter_async_context(open_cache(spec)) for _ in range(n)]
        yield [Coalescer(cache=cache) for cache in caches]


def set_calls(url: str) -> int:
    """SET commands the server has run so far (a lock attempt is a SET NX)."""
    with redis.Redis.from_url(url) as client:
        stats: dict[str, dict[str, int]] = client.info("commandstats")
        return stats.get("cmdstat_set", {}).get("calls", 0)


def lock_pttl(url: str) -> int:
    with redis.Redis.from_url(url) as client:
        return int(client.pttl(f"{KEY}:lock"))


async def test_replicas_sharing_redis_share_one_generation(redis_url: str) -> None:
    async with replicas(redis_url, 3) as gateways:
        produce = Generator(gateways[0].cache)
        sets = set_calls(redis_url)
        waiters = [
            asyncio.create_task(gateway.run(KEY, produce, policy=CachePolicy.USE))
            for gateway in gateways
            for _ in range(10)
        ]
        # Three lock attempts (nothing else SETs before the release) and one holder
        # generating: the other two were refused and are waiting on it.
        await eventually(lambda: produce.runs == 1 and set_calls(redis_url) - sets >= 3)
        produce.release.set()
        results = await asyncio.gather(*waiters)
    assert produce.runs == 1
    assert {r.body for r in results} == {b"image 1"}
    remote = sum(counted(g.cache).coalesced_requests["remote"] for g in gateways)
    assert remote == 2, "the two other replicas waited for the first's image"


async def test_a_crashed_leaders_lock_lapses_and_another_takes_over(redis_url: str) -> None:
    async with replicas(redis_url, 1, lock_ttl_ms=300) as (gateway,):
        # A leader that took the lock and died: nobody renews it, nobody stores.
        assert await gateway.cache.lock(f"{KEY}:lock", "crashed") is True
        produce = Generator(gateway.cache)
        produce.release.set()
        started = time.monotonic()
        result = await gateway.run(KEY, produce, policy=CachePolicy.USE)
        waited = time.monotonic() - started
    assert (result.body, produce.runs) == (b"image 1", 1)
    assert 0.2 < waited < 5


async def test_a_waiting_replica_gives_up_after_lock_wait_and_generates(redis_url: str) -> None:
    async with replicas(redis_url, 2, lock_wait_s=0.3) as (first, second):
        slow, impatient = Generator(first.cache), Generator()
        leader = asyncio.create_task(first.run(KEY, slow, policy=CachePolicy.USE))
        await eventually(lambda: slow.runs == 1)  # the leader holds the lock
        impatient.release.set()
        started = time.monotonic()
        result = await second.run(KEY, impatient, policy=CachePolicy.USE)
        waited = time.monotonic() - started
        slow.release.set()
        await leader
    assert (result.body, impatient.runs) == (b"image 1", 1)
    assert 0.25 < waited < 5


async def test_the_leader_renews_its_lock_while_it_generates(redis_url: str) -> None:
    # A lock's PTTL only falls unless its holder renews it: seeing it rise proves a
    # renewal. The TTL is long (renewed every second) so that only a stall of two
    # seconds could let it lapse; the test waits for a rise, not for a time.
    async with replicas(redis_url, 2, lock_ttl_ms=3000) as (first, second):
        produce = Generator(first.cache)
        leader = asyncio.create_task(first.run(KEY, produce, policy=CachePolicy.USE))
        await eventually(lambda: produce.runs == 1)
        seen = [lock_pttl(redis_url)]
        assert 0 < seen[0] <= 3000

        def renewed() -> bool:
            seen.append(lock_pttl(redis_url))
            assert seen[-1] > 0, f"the lock lapsed: PTTL {seen[-1]}"
            return seen[-1] > seen[-2]

        await eventually(renewed)
        assert await second.cache.lock(f"{KEY}:lock", "other") is False
        produce.release.set()
        await leader
        assert await second.cache.lock(f"{KEY}:lock", "other") is True, "freed at the end"


async def test_a_store_that_cannot_answer_never_blocks_a_generation() -> None:
    spec = CacheSpec(url=dead_url().replace("http:", "redis:"), failure_threshold=1)
    async with open_cache(spec) as cache:
        produce = Generator()
        produce.release.set()
        result = await Coalescer(cache=cache).run(KEY, produce, policy=CachePolicy.USE)
        assert (result.body, produce.runs) == (b"image 1", 1)
