"""The active half of health checking: probe the workers that are not known good.

Every worker whose `WorkerHealth` needs a probe (see `gateway.health` for the states)
is probed by its protocol (`WorkerProtocol.probe`, with the pool's credentials) when its
probe is due; the result goes back to its pool (`Pool.probed`), which updates the
worker's health: "ok" and "busy" (in service but full) are good probes, "down" not.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from gateway.balancer import Balancer, Clock, Pool, Worker
from gateway.protocols import protocol_for


class Prober:
    """Probes the workers that need it, pool by pool; the app's lifespan runs it."""

    def __init__(
        self, *, balancer: Balancer, session: aiohttp.ClientSession, clock: Clock = time.monotonic
    ) -> None:
        self.balancer = balancer
        self.session = session
        self.clock = clock

    async def probe_due(self) -> int:
        """Probe, concurrently, every worker whose probe is due; how many were probed."""
        now = self.clock()
        due = [
            (pool, worker)
            for pool in self.balancer.pools.values()
            for worker in pool.workers
            if worker.health.needs_probe and worker.health.next_probe_at <= now
        ]
        await asyncio.gather(*(self._probe(pool, worker) for pool, worker in due))
        return len(due)

    async def _probe(self, pool: Pool, worker: Worker) -> None:
        spec = pool.spec.health
        timeout = aiohttp.ClientTimeout(total=spec.probe_timeout_s)
        protocol = protocol_for(pool.spec.protocol)
        said = await protocol.probe(
            self.session, worker.url, timeout=timeout, headers=pool.spec.headers, pool=pool.spec
        )
        # "busy" is a worker in service that runs as much as it can: fit, just full.
        pool.probed(worker, said != "down")

    async def run(self, *, tick_s: float = 0.5) -> None:
        """Forever: probe what is due, then sleep until the next probe (at most tick_s,
        so workers added by discovery or reload are probed soon)."""
        while True:
            await self.probe_due()
            await asyncio.sleep(self._until_next(tick_s))

    def _until_next(self, tick_s: float) -> float:
        now = self.clock()
        waits = [
            worker.health.next_probe_at - now
            for pool in self.balancer.pools.values()
            for worker in pool.workers
            if worker.health.needs_probe
        ]
        return max(0.01, min([tick_s, *waits]))  # never a busy loop on a due probe
