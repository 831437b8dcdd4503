"""The flow of one generation, step by step, as design.md lists it:

validate body -> resolve adapter -> (cache key -> lookup -> coalesce) ->
admit into the pool -> pick a worker -> forward (retry another worker) ->
(store in cache) -> respond.

Each step is one neighbour's job; this module only puts them in order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from gateway.auth import authorize
from gateway.balancer import Balancer, Pool, Worker
from gateway.errors import UpstreamError, UpstreamRejected, WorkerUnreachable
from gateway.protocols import protocol_for
from gateway.registry import KeySpec, Registry
from gateway.schema import ImageGenerationBody, WorkerRequest


@dataclass(frozen=True, slots=True)
class Generation:
    body: bytes  # the worker's response body, exactly as it came
    seed: int
    adapter: str
    cache: str  # "hit" | "miss" | "bypass"
    worker: str


class Pipeline:
    def __init__(
        self, *, registry: Registry, balancer: Balancer, session: aiohttp.ClientSession
    ) -> None:
        self.registry = registry  # replaced whole on reload; each request reads it once
        self.balancer = balancer
        self.session = session

    async def generate(
        self, body: ImageGenerationBody, *, request_id: str, key: KeySpec | None = None
    ) -> Generation:
        registry = self.registry
        adapter = registry.resolve(body.model)
        authorize(key, adapter.name)
        job = WorkerRequest.from_body(body, upstream_model=adapter.upstream_model)
        pool = self.balancer.pool(adapter.pool)
        # Only these reach a worker: the pool's own credentials and the request id;
        # nothing of the client's headers (its Authorization least of all).
        headers = {**pool.spec.headers, "X-Request-ID": request_id}
        try:
            image, worker = await self._forward(pool, job, headers)
        except (UpstreamError, UpstreamRejected) as exc:
            exc.detail = f"adapter {adapter.name!r}: {exc.detail}"
            raise
        return Generation(image, job.seed, adapter.name, "bypass", worker.name)

    async def _forward(
        self, pool: Pool, job: WorkerRequest, headers: Mapping[str, str]
    ) -> tuple[bytes, Worker]:
        """Try workers in balancer order; a worker that never saw the job is skipped."""
        protocol = protocol_for(pool.spec.protocol)
        payload = job.model_dump_json().encode()
        timeout = aiohttp.ClientTimeout(
            total=pool.spec.timeout_s, sock_connect=pool.spec.connect_timeout_s
        )
        tried: list[Worker] = []
        last: UpstreamError = WorkerUnreachable(f"pool {pool.name!r} has no healthy worker")
        while (worker := pool.choose(exclude=tried)) is not None:
            tried.append(worker)
            async with pool.slot(worker):
                try:
                    image = await protocol.generate(
                        self.session,
                        worker.url,
                        payload,
                        worker=worker.name,
                        timeout=timeout,
                        headers=headers,
                    )
                    return image, worker
                except WorkerUnreachable as exc:
                    last = exc
        raise last
