"""Identical requests in flight share one generation: within this process, and across
every replica that shares the cache store.

In-process, the first request for a key starts the generation as a task of its own and
every identical request awaits that task: a waiter that leaves (its client went away)
does not cancel the generation for the others, the last one to leave does (nobody wants
the image now, and the worker slot or queue place goes back), and a failure reaches
every waiter at once, so nobody hangs.

Across replicas, that task first takes a short lock in the store (SET key NX PX, renewed
while it generates). A replica that finds the lock taken waits for the image to appear
under the key; when the lock goes without an image (the holder failed or crashed and its
lock lapsed) it takes over, and after `lock_wait_s` it generates regardless. A store that
cannot answer never blocks anyone: the task simply generates.

This is its own module (not `gateway.cache`) because it is about tasks and waiting, where
the cache is about keys and bytes; it reaches the store only through `ResultCache`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

from gateway.cache import CachePolicy, ResultCache

# How often a replica waiting on another's generation looks for the image: quickly at
# first (the image may be a moment away), then every 100 ms at most (images take seconds).
FIRST_POLL_S = 0.005
MAX_POLL_S = 0.1


@dataclass(frozen=True, slots=True)
class Produced:
    body: bytes  # the worker's response body, exactly as it came
    worker: str  # the worker that drew it; "" when it came out of the store


Produce = Callable[[], Awaitable[Produced]]


@dataclass(eq=False)
class _Flight:
    task: asyncio.Task[Produced]
    waiters: int = 0


class Coalescer:
    def __init__(self, *, cache: ResultCache, clock: Callable[[], float] = time.monotonic) -> None:
        self.cache = cache
        self._clock = clock
        self._flights: dict[str, _Flight] = {}

    def in_flight(self) -> int:
        return len(self._flights)

    async def run(self, key: str, produce: Produce, *, policy: CachePolicy) -> Produced:
        """`produce()`, shared with identical requests in flight. Only requests that use
        the cache coalesce: `no-cache` and `no-store` ask for a generation of their own."""
        if policy is not CachePolicy.USE:
            return await produce()
        flight = self._flights.get(key)
        if flight is None:
            flight = self._take_off(key, produce)
        else:
            self.cache.observer.coalesced("local")
        return await self._wait(key, flight)

    def _take_off(self, key: str, produce: Produce) -> _Flight:
        task = asyncio.create_task(self._lead(key, produce), name=f"generation {key}")
        flight = _Flight(task)
        self._flights[key] = flight
        task.add_done_callback(partial(self._landed, key, flight))
        return flight

    async def _wait(self, key: str, flight: _Flight) -> Produced:
        flight.waiters += 1
        try:
            # shield: a waiter's cancellation ends its wait, not the shared generation.
            return await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                # The last waiter left: stop the generation, and let the next identical
                # request start a new one rather than join one being cancelled.
                self._forget(key, flight)
                flight.task.cancel()

    def _landed(self, key: str, flight: _Flight, task: asyncio.Task[Produced]) -> None:
        self._forget(key, flight)
        if not task.cancelled():
            task.exception()  # every waiter got it; this marks it seen if none were left

    def _forget(self, key: str, flight: _Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]

    async def _lead(self, key: str, produce: Produce) -> Produced:
        """One generation for every replica: hold the key's lock while producing, or
        wait for the replica that holds it."""
        lock, token = f"{key}:lock", secrets.token_hex(8)
        held = await self.cache.lock(lock, token)
        if held is False:
            waited = await self._await_other(key, lock, token)
            if isinstance(waited, Produced):
                return waited
            held = waited
        if not held:
            return await produce()  # the store cannot coordinate: generate here
        try:
            # Another holder may have stored the image between our lookup and our lock.
            if (body := await self.cache.peek(key)) is not None:
                self.cache.observer.coalesced("remote")
                return Produced(body, "")
            async with self._keep_locked(lock, token):
                return await produce()  # produce stores before the lock goes
        finally:
            await self.cache.unlock(lock, token)

    async def _await_other(self, key: str, lock: str, token: str) -> Produced | bool:
        """Another replica holds the lock: its image, once stored; or True when its lock
        went and we took it; or False (generate unlocked) when the store stopped
        answering or `lock_wait_s` ran out."""
        deadline = self._clock() + self.cache.spec.lock_wait_s
        delay = FIRST_POLL_S
        while self._clock() < deadline:
            await asyncio.sleep(min(delay, max(0.0, deadline - self._clock())))
            delay = min(delay * 2, MAX_POLL_S)
            if (body := await self.cache.peek(key)) is not None:
                self.cache.observer.coalesced("remote")
                return Produced(body, "")
            held = await self.cache.lock(lock, token)
            if held is not False:
                return held is True
        return False

    @asynccontextmanager
    async def _keep_locked(self, lock: str, token: str) -> AsyncIterator[None]:
        """Renew the lock every third of its TTL while the generation runs, so a long
        generation keeps it and a crashed process's lapses within one TTL."""
        renewer = asyncio.create_task(self._renew(lock, token), name=f"renew {lock}")
        try:
            yield
        finally:
            renewer.cancel()

    async def _renew(self, lock: str, token: str) -> None:
        every_s = self.cache.spec.lock_ttl_ms / 3000
        while True:
            await asyncio.sleep(every_s)
            if not await self.cache.extend(lock, token):
                return  # it lapsed, another holds it, or the store is gone: stop renewing
