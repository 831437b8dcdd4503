"""Pools of GPU workers and the choice of a worker for each request.

A `Pool` holds the live state of its workers (in-flight count, health); `slot()`
takes a worker for one try and always gives it back. The balancer knows workers and
adapters, never HTTP requests from clients.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from gateway.registry import PoolSpec, Registry, WorkerSpec


@dataclass(eq=False)
class Worker:
    name: str  # "<pool>-<index>": what logs, metrics and error messages show
    spec: WorkerSpec
    in_flight: int = 0
    healthy: bool = True

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def load(self) -> float:
        return self.in_flight / self.spec.max_concurrency


@dataclass(eq=False)
class Pool:
    name: str
    spec: PoolSpec
    workers: list[Worker] = field(default_factory=list)
    _rng: random.Random = field(default_factory=random.Random)

    @classmethod
    def from_spec(cls, name: str, spec: PoolSpec) -> Pool:
        workers = [Worker(f"{name}-{i}", w) for i, w in enumerate(spec.workers)]
        return cls(name, spec, workers)

    def choose(self, exclude: Collection[Worker] = ()) -> Worker | None:
        """The least-loaded healthy worker not yet tried; ties broken at random."""
        candidates = [w for w in self.workers if w.healthy and w not in exclude]
        if not candidates:
            return None
        least = min(w.load for w in candidates)
        return self._rng.choice([w for w in candidates if w.load == least])

    @asynccontextmanager
    async def slot(self, worker: Worker) -> AsyncIterator[Worker]:
        worker.in_flight += 1
        try:
            yield worker
        finally:
            worker.in_flight -= 1

    def healthy_count(self) -> int:
        return sum(w.healthy for w in self.workers)


class Balancer:
    def __init__(self, registry: Registry) -> None:
        self.pools: Mapping[str, Pool] = {
            name: Pool.from_spec(name, spec) for name, spec in registry.pools.items()
        }

    def pool(self, name: str) -> Pool:
        return self.pools[name]

    def update(self, registry: Registry) -> None:
        """New pools from a reloaded registry; a worker whose URL stays in its pool keeps
        its state (in-flight count, health), so a reload is invisible to it."""
        pools = {}
        for name, spec in registry.pools.items():
            pool = Pool.from_spec(name, spec)
            old = self.pools.get(name)
            if old is not None:
                kept = {w.url: w for w in old.workers}
                for i, worker in enumerate(pool.workers):
                    if worker.url in kept:
                        pool.workers[i] = kept[worker.url]
                        pool.workers[i].spec = worker.spec
            pools[name] = pool
        self.pools = pools
