"""The flow of one generation, step by step, as design.md lists it:

validate body -> resolve adapter -> (cache key -> lookup -> coalesce) ->
admit into the pool -> pick a worker -> forward (retry another worker) ->
(store in cache) -> respond.

Each step is one neighbour's job; this module only puts them in order.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from gateway.auth import authorize
from gateway.balancer import Balancer, Pool, Worker
from gateway.errors import UpstreamError, UpstreamRejected
from gateway.metrics import Metrics, Trace
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
        self,
        *,
        registry: Registry,
        balancer: Balancer,
        session: aiohttp.ClientSession,
        metrics: Metrics | None = None,
    ) -> None:
        self.registry = registry  # replaced whole on reload; each request reads it once
        self.balancer = balancer
        self.session = session
        self.metrics = metrics or Metrics()

    def use_registry(self, registry: Registry) -> None:
        """A reload: requests in flight finish on the registry they started with."""
        self.balancer.update(registry)
        self.registry = registry

    async def generate(
        self,
        body: ImageGenerationBody,
        *,
        request_id: str,
        key: KeySpec | None = None,
        trace: Trace | None = None,
    ) -> Generation:
        """`key`: the caller's API key (None: auth is off); `trace` collects what
        happened, for the access log and metrics."""
        trace = trace or Trace()
        registry = self.registry
        adapter = registry.resolve(body.model)
        trace.adapter, trace.pool = adapter.name, adapter.pool
        authorize(key, adapter.name)
        if registry.log_prompts:
            trace.prompt = body.prompt
        job = WorkerRequest.from_body(body, upstream_model=adapter.upstream_model)
        trace.seed = job.seed
        pool = self.balancer.pool(adapter.pool)
        # Only these reach a worker: the pool's own credentials and the request id;
        # nothing of the client's headers (its Authorization least of all).
        headers = {**pool.spec.headers, "X-Request-ID": request_id}
        try:
            image, worker = await self._forward(pool, job, headers, trace)
        except (UpstreamError, UpstreamRejected) as exc:
            exc.detail = f"adapter {adapter.name!r}: {exc.detail}"
            raise
        trace.worker, trace.cache = worker.name, "bypass"
        return Generation(image, job.seed, adapter.name, "bypass", worker.name)

    async def _forward(
        self, pool: Pool, job: WorkerRequest, headers: Mapping[str, str], trace: Trace
    ) -> tuple[bytes, Worker]:
        """Admit into the pool, pick a worker, send; retry elsewhere as the pool allows."""
        protocol = protocol_for(pool.spec.protocol)
        payload = job.model_dump_json().encode()
        with pool.attempt(adapter=job.model) as attempt:
            while True:
                async with attempt.slot() as worker:
                    trace.queue_s += self.metrics.observe_queue_wait(pool.name, attempt.waited_s())
                    timeout = aiohttp.ClientTimeout(
                        total=attempt.try_timeout_s(), sock_connect=pool.spec.connect_timeout_s
                    )
                    started = time.perf_counter()
                    try:
                        image = await protocol.generate(
                            self.session,
                            worker.url,
                            payload,
                            worker=worker.name,
                            timeout=timeout,
                            headers=headers,
                        )
                    except UpstreamError as exc:
                        trace.upstream_s += self.metrics.observe_try(
                            pool.name, worker.name, started, exc
                        )
                        attempt.retry_or_raise(exc)
                        self.metrics.retries.labels(pool.name, exc.reason).inc()
                        continue
                    trace.upstream_s += self.metrics.observe_try(pool.name, worker.name, started)
                    return image, worker
