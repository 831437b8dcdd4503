"""Per-key request limits: a rate (requests per second with a burst) and a cap on
requests in flight.

The rate is a GCRA (generic cell rate algorithm): each key has one number, the time
its next request is "due"; a request is admitted when that time is at most one burst
ahead of now, and pushes it one interval further. In Redis that is one Lua script,
one round-trip and atomic, so every replica shares one limit; the script reads the
clock of Redis itself, so replicas with skewed clocks still agree. Without Redis,
or while it is unreachable, the same algorithm runs in this process (per-process
limits, said once in the log): a Redis outage never refuses a request by itself.

Requests in flight (`max_concurrent`) are counted in this process.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Protocol

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.errors import RateLimited
from gateway.registry import KeySpec, RateSpec, Registry, redis_where

log = logging.getLogger("gateway.ratelimit")

Clock = Callable[[], float]

# KEYS[1]: the key's due time in microseconds of Redis's clock. ARGV[1]: microseconds
# per request; ARGV[2]: microseconds of burst (interval * burst). Returns 0 when the
# request is admitted, else the microseconds until one would be.
GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local due = tonumber(redis.call('GET', KEYS[1])) or now
if due < now then due = now end
local wait = due + interval - now - burst
if wait > 0 then return math.ceil(wait) end
-- %.0f: Lua's own number-to-string keeps 14 digits, too few for microseconds.
redis.call('SET', KEYS[1], string.format('%.0f', due + interval),
           'PX', math.ceil((due + interval - now) / 1000) + 1)
return 0
"""

KEY_PREFIX = "gateway:ratelimit:"


class RateLimiter(Protocol):
    async def wait_s(self, key: str, rate: RateSpec) -> float:
        """0 when a request under `key` is admitted now, else seconds until one would be."""
        ...


class MemoryRateLimiter:
    """The GCRA in this process: the limit holds per gateway process."""

    def __init__(self, *, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._due: dict[str, float] = {}

    async def wait_s(self, key: str, rate: RateSpec) -> float:
        return self.check(key, rate)

    def check(self, key: str, rate: RateSpec) -> float:
        now = self._clock()
        interval = 1.0 / rate.per_s
        due = max(self._due.get(key, now), now)
        wait = due + interval - now - interval * rate.capacity
        if wait > 0:
            return wait
        self._due[key] = due + interval
        return 0.0


class RedisRateLimiter:
    """The GCRA in Redis, shared by every replica; in memory while Redis is away.

    After a failure Redis is left alone for `retry_s` (a dead Redis must not add its
    timeout to every request), then tried again.
    """

    def __init__(
        self,
        client: Redis,
        *,
        fallback: MemoryRateLimiter,
        retry_s: float = 5.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._script = client.register_script(GCRA_LUA)
        self._fallback = fallback
        self._retry_s = retry_s
        self._clock = clock
        self._retry_at: float | None = None  # set while Redis is away

    async def wait_s(self, key: str, rate: RateSpec) -> float:
        if self._retry_at is not None and self._clock() < self._retry_at:
            return self._fallback.check(key, rate)
        interval_us = max(1, round(1_000_000 / rate.per_s))
        try:
            wait_us = await self._script(
                keys=[KEY_PREFIX + key], args=[interval_us, interval_us * rate.capacity]
            )
        except (RedisError, OSError) as exc:
            self._went_away(exc)
            return self._fallback.check(key, rate)
        if self._retry_at is not None:
            self._retry_at = None
            log.warning("rate limits: Redis is back; limits are shared by all replicas again")
        return int(wait_us) / 1_000_000

    def _went_away(self, exc: BaseException) -> None:
        if self._retry_at is None:
            log.warning(
                "rate limits: Redis unreachable (%s); limits are per process until it is back",
                type(exc).__name__,
            )
        self._retry_at = self._clock() + self._retry_s


class KeyLimits:
    """Admits one request under a key, or raises RateLimited (429, Retry-After)."""

    def __init__(self, *, rate: RateLimiter) -> None:
        self.rate = rate
        self._in_flight: dict[str, int] = {}

    def admit(self, key: KeySpec) -> Admission:
        """`async with limits.admit(key):` around the request's work."""
        return Admission(self, key)

    async def _enter(self, key: KeySpec) -> bool:
        # The in-flight cap is checked first: a request it refuses costs no rate token.
        held = self._take_slot(key)
        try:
            if key.rate is not None:
                wait = await self.rate.wait_s(key.name, key.rate)
                if wait > 0:
                    limit = f"{key.rate.per_s:g}/s, burst {key.rate.capacity}"
                    msg = f"key {key.name!r} is over its rate limit ({limit})"
                    raise RateLimited(msg, retry_after_s=math.ceil(wait))
        except BaseException:
            if held:
                self._release_slot(key.name)
            raise
        return held

    def _take_slot(self, key: KeySpec) -> bool:
        if key.max_concurrent is None:
            return False
        count = self._in_flight.get(key.name, 0)
        if count >= key.max_concurrent:
            msg = f"key {key.name!r} already has {count} requests in flight (max_concurrent)"
            raise RateLimited(msg, retry_after_s=1)
        self._in_flight[key.name] = count + 1
        return True

    def _release_slot(self, name: str) -> None:
        count = self._in_flight[name] - 1
        if count:
            self._in_flight[name] = count
        else:
            del self._in_flight[name]


class Admission:
    """One request's hold on its key's limits. A class rather than an
    @asynccontextmanager: it is on the hot path of every keyed request, and a
    generator-based context manager costs about three times as much."""

    __slots__ = ("_held", "_key", "_limits")

    def __init__(self, limits: KeyLimits, key: KeySpec) -> None:
        self._limits, self._key, self._held = limits, key, False

    async def __aenter__(self) -> None:
        self._held = await self._limits._enter(self._key)

    async def __aexit__(self, *exc_info: object) -> None:
        if self._held:
            self._limits._release_slot(self._key.name)


def redis_for(registry: Registry) -> tuple[str | None, float]:
    """`auth.redis_url` (GATEWAY_REDIS_URL, when set, is already in it: see
    `gateway.settings`) and its call timeout in seconds; limits exist only with auth."""
    if registry.auth is None:
        return None, 0.0
    return registry.auth.redis_url, registry.auth.redis_timeout_ms / 1000


@asynccontextmanager
async def open_rate_limiter(
    redis_url: str | None,
    *,
    timeout_s: float = 0.25,
) -> AsyncIterator[RateLimiter]:
    """The process's rate limiter: in Redis when a URL is given, else in memory."""
    memory = MemoryRateLimiter()
    if redis_url is None:
        yield memory
        return
    # Short timeouts and no retries: a slow Redis falls back quickly instead of
    # holding a request; the limiter itself retries Redis later.
    client = Redis.from_url(
        redis_url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )
    log.info("rate limits shared through Redis at %s", redis_where(redis_url))
    try:
        yield RedisRateLimiter(client, fallback=memory)
    finally:
        await client.aclose()
