"""Workers from DNS: every A/AAAA record of a pool's `discover.dns` name is a worker.

This is how the gateway runs on Kubernetes behind a headless Service: pods come and
go, their records with them. Each `every_s` the name is resolved again; a new address
becomes a worker (state UNKNOWN: in service, probed), a gone one leaves the pool at
once while its tries in flight finish (`Pool.set_workers`). A failed lookup keeps the
workers there were: a DNS hiccup must not empty a pool.

The resolver is passed in: `resolve_dns` (the event loop's getaddrinfo) in the app,
`FakeResolver` in tests, which must not send DNS traffic.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from gateway.balancer import Balancer, Pool

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
Clock = Callable[[], float]


async def resolve_dns(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, IPv4 and IPv6, sorted, each once."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class FakeResolver:
    """Answers from a table the test edits; a missing name fails as DNS would."""

    def __init__(self, records: Mapping[str, Sequence[str]] | None = None) -> None:
        self.records: dict[str, list[str]] = {k: list(v) for k, v in (records or {}).items()}
        self.lookups = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups += 1
        if host not in self.records:
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: name not known")
        return list(self.records[host])


async def refresh(pool: Pool, *, resolver: Resolver) -> bool:
    """Resolve `pool`'s name once and make its workers match; False if DNS failed."""
    discover = pool.spec.discover
    if discover is None:
        return True
    try:
        addresses = await resolver(discover.dns, discover.port)
    except OSError as exc:  # socket.gaierror and friends: keep serving what we have
        log.warning("pool %s: cannot resolve %s: %s", pool.name, discover.dns, exc)
        return False
    pool.set_workers([discover.worker_spec(discover.url_for(a)) for a in addresses])
    return True


class Discovery:
    """Keeps every DNS-discovered pool of a balancer up to date; the lifespan runs it."""

    def __init__(
        self, *, balancer: Balancer, resolver: Resolver, clock: Clock = time.monotonic
    ) -> None:
        self.balancer = balancer
        self.resolver = resolver
        self.clock = clock
        self._due: dict[str, float] = {}  # pool name -> next lookup

    async def refresh_due(self) -> None:
        """Look up, concurrently, every discovered pool whose time has come."""
        now = self.clock()
        due = [
            pool
            for name, pool in self.balancer.pools.items()
            if pool.spec.discover is not None and self._due.get(name, 0.0) <= now
        ]
        for pool in due:
            assert pool.spec.discover is not None
            self._due[pool.name] = now + pool.spec.discover.every_s
        await asyncio.gather(*(refresh(pool, resolver=self.resolver) for pool in due))

    async def run(self, *, tick_s: float = 0.5) -> None:
        while True:
            await self.refresh_due()
            await asyncio.sleep(tick_s)
