"""Per-key request limits: a rate (requests per second with a burst) and a cap on
requests in flight.

The rate is a GCRA (generic cell rate algorithm): each key has one number, the time
its next request is "due"; a request is admitted when that time is at most one burst
ahead of now, and pushes it one interval further. In Redis that is one Lua script,
one round-trip and atomic, so every replica shares one limit; the script reads the
clock of Redis itself, so replicas with skewed clocks still agree. Without Redis,
or while it is unreachable, the same algorithm runs in this process (per-process
limits, said once in the log): a Redis outage never refuses a request by itself.

Requests in flight (`max_concurrent`): with Redis, counted across replicas in a
sorted set per key whose members are leases (one per request, scored by its expiry on
Redis's clock, renewed by its process every lease_s / 3), so a crashed process's count
drops within the lease; while Redis is away each process counts its own against its
share of the limit (the limit over the live processes, rounded up, at least 1).
Without Redis they are counted in this process.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
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

# KEYS[1]: the key's leases (member -> expiry in ms of Redis's clock). ARGV: the new
# lease's member, the lease in ms, the limit. 1: taken; 0: the limit is reached.
TAKE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""
# Renew this process's leases of one key. KEYS[1]: the key's leases; ARGV[1]: the lease
# in ms, then the members. XX: a lease already given back is not brought back.
RENEW_LUA = """
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', until_ms, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 0
"""
IN_FLIGHT_PREFIX = "gateway:inflight:"


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
        self.client = client
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


class SharedInFlight:
    """`max_concurrent` counted across replicas in Redis, as leases; per process, on
    its share of the limit, while Redis is away (logged once, retried after `retry_s`).
    `replicas()`: how many processes share the limit (the coordination's last count)."""

    def __init__(
        self,
        client: Redis,
        *,
        lease_s: float = 10.0,
        replicas: Callable[[], int] = lambda: 1,
        retry_s: float = 5.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._take = client.register_script(TAKE_LUA)
        self._renew = client.register_script(RENEW_LUA)
        self._client = client
        self.lease_ms = max(1, round(lease_s * 1000))
        self.replicas = replicas
        self._retry_s, self._clock = retry_s, clock
        self._retry_at: float | None = None
        self._me = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._seq = itertools.count()
        self.held: dict[str, set[str]] = {}  # key name -> this process's leases in Redis

    @property
    def away(self) -> bool:
        return self._retry_at is not None and self._clock() < self._retry_at

    def local_limit(self, limit: int) -> int:
        return max(1, math.ceil(limit / max(1, self.replicas())))

    async def take(self, name: str, limit: int) -> str | bool | None:
        """A lease id when taken in Redis; False when the limit is reached; None when
        Redis is away (the caller counts locally, on `local_limit`)."""
        if self.away:
            return None
        member = f"{self._me}:{next(self._seq)}"
        try:
            args: list[str | int] = [member, self.lease_ms, limit]
            taken = await self._take(keys=[IN_FLIGHT_PREFIX + name], args=args)
        except (RedisError, OSError) as exc:
            self._went_away(exc)
            return None
        self._back()
        if not int(taken):
            return False
        self.held.setdefault(name, set()).add(member)
        return member

    async def give_back(self, name: str, member: str) -> None:
        leases = self.held.get(name, set())
        leases.discard(member)
        if not leases:
            self.held.pop(name, None)
        try:
            await self._client.zrem(IN_FLIGHT_PREFIX + name, member)
        except (RedisError, OSError) as exc:
            self._went_away(exc)  # the lease lapses by itself

    async def renew(self) -> None:
        """Every lease_s / 3, for the app's lifespan: this process's leases stay."""
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            for name, members in list(self.held.items()):
                with suppress(RedisError, OSError):
                    await self._renew(
                        keys=[IN_FLIGHT_PREFIX + name], args=[self.lease_ms, *members]
                    )

    def _went_away(self, exc: BaseException) -> None:
        if self._retry_at is None:
            log.warning(
                "max_concurrent: Redis unreachable (%s); each process counts its own "
                "against its share of each limit until it is back",
                type(exc).__name__,
            )
        self._retry_at = self._clock() + self._retry_s

    def _back(self) -> None:
        if self._retry_at is not None:
            self._retry_at = None
            log.warning("max_concurrent: Redis is back; limits are shared by all replicas again")


class KeyLimits:
    """Admits one request under a key, or raises RateLimited (429, Retry-After)."""

    def __init__(self, *, rate: RateLimiter, shared: SharedInFlight | None = None) -> None:
        self.rate = rate
        self.shared = shared
        self._in_flight: dict[str, int] = {}

    def admit(self, key: KeySpec) -> Admission:
        """`async with limits.admit(key):` around the request's work."""
        return Admission(self, key)

    async def _enter(self, key: KeySpec) -> bool | str:
        # The in-flight cap is checked first: a request it refuses costs no rate token.
        held = await self._take_shared(key) if self.shared is not None else self._take_slot(key)
        try:
            if key.rate is not None:
                wait = await self.rate.wait_s(key.name, key.rate)
                if wait > 0:
                    limit = f"{key.rate.per_s:g}/s, burst {key.rate.capacity}"
                    msg = f"key {key.name!r} is over its rate limit ({limit})"
                    raise RateLimited(msg, retry_after_s=math.ceil(wait))
        except BaseException:
            if held:
                await self._release(key.name, held)
            raise
        return held

    async def _take_shared(self, key: KeySpec) -> bool | str:
        assert self.shared is not None
        if key.max_concurrent is None:
            return False
        taken = await self.shared.take(key.name, key.max_concurrent)
        if taken is None:  # Redis away: this process's share of the limit
            limit = self.shared.local_limit(key.max_concurrent)
            return self._take_slot(key.model_copy(update={"max_concurrent": limit}))
        if taken is False:
            count = key.max_concurrent
            msg = f"key {key.name!r} already has {count} requests in flight (max_concurrent)"
            raise RateLimited(msg, retry_after_s=1)
        return taken

    async def _release(self, name: str, held: bool | str) -> None:
        if isinstance(held, str):
            assert self.shared is not None
            await self.shared.give_back(name, held)
        elif held:
            self._release_slot(name)

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
        self._limits, self._key = limits, key
        self._held: bool | str = False  # a lease id: held in Redis

    async def __aenter__(self) -> None:
        self._held = await self._limits._enter(self._key)

    async def __aexit__(self, *exc_info: object) -> None:
        if self._held:
            await self._limits._release(self._key.name, self._held)


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


@asynccontextmanager
async def open_key_limits(
    redis_url: str | None,
    *,
    timeout_s: float = 0.25,
    lease_s: float = 10.0,
    replicas: Callable[[], int] = lambda: 1,
) -> AsyncIterator[KeyLimits]:
    """The process's per-key limits: rates and `max_concurrent` shared through Redis
    when a URL is given (`replicas`: how many processes share them while Redis is
    away), else counted in this process."""
    async with open_rate_limiter(redis_url, timeout_s=timeout_s) as rate:
        shared = None
        if isinstance(rate, RedisRateLimiter):
            shared = SharedInFlight(rate.client, lease_s=lease_s, replicas=replicas)
        yield KeyLimits(rate=rate, shared=shared)
