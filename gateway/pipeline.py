"""The flow of one generation, step by step, as docs/architecture.md draws it:

validate body -> resolve adapter -> cache key -> cache lookup -> coalesce ->
admit into the pool -> pick a worker -> forward (retry another worker) ->
store in cache -> respond.

Each step is one neighbour's job; this module only puts them in order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import aiohttp

from gateway.auth import authorize
from gateway.balancer import Balancer, Pool, Worker
from gateway.cache import CachePolicy, ResultCache
from gateway.coalesce import Coalescer, Produced
from gateway.errors import UpstreamError, UpstreamRejected, ValidationFailed
from gateway.fairness import NO_CLAIM, Claim
from gateway.metrics import Metrics, Trace
from gateway.protocols import Call, deterministic, protocol_for
from gateway.registry import AdapterSpec, KeySpec, PoolSpec, Registry
from gateway.schema import ImageGenerationBody, WorkerRequest

log = logging.getLogger("gateway.pipeline")


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
        cache: ResultCache,
        coalescer: Coalescer,
    ) -> None:
        self.registry = registry  # replaced whole on reload; each request reads it once
        self.balancer = balancer
        self.session = session
        self.metrics = metrics or Metrics()
        self.cache = cache
        self.coalescer = coalescer

    def use_registry(self, registry: Registry) -> None:
        """A reload: requests in flight finish on the registry they started with."""
        if registry.cache != self.registry.cache:
            log.warning("the cache section changed: it applies at the next restart")
        if registry.coordination != self.registry.coordination:
            log.warning("the coordination section changed: it applies at the next restart")
        self.balancer.update(registry)
        self.registry = registry

    async def generate(
        self,
        body: ImageGenerationBody,
        *,
        request_id: str,
        key: KeySpec | None = None,
        trace: Trace | None = None,
        cache_policy: CachePolicy = CachePolicy.USE,
        on_queued: Callable[[], None] | None = None,
        deadline_s: float | None = None,
    ) -> Generation:
        """`key`: the caller's API key (None: auth is off); `trace` collects what
        happened, for the access log and metrics; `cache_policy`: the client's
        Cache-Control; `on_queued`: called if the generation must wait for a worker;
        `deadline_s`: when, from now, the client wants the image (None: the key's
        default deadline, or none)."""
        trace = trace or Trace()
        registry = self.registry
        if deadline_s is None and key is not None and key.deadline_ms is not None:
            deadline_s = key.deadline_ms / 1000
        deadline_at = None if deadline_s is None else self.balancer.clock() + deadline_s
        adapter = registry.resolve(body.model)
        trace.adapter, trace.pool = adapter.name, adapter.pool
        authorize(key, adapter.name)
        if registry.log_prompts:
            trace.prompt = body.prompt
        # The seed is decided here (a random one when the client gave none): the worker
        # draws with it, the cache files the image under it and X-Seed returns it.
        job = WorkerRequest.from_body(body, upstream_model=adapter.upstream_model)
        trace.seed = job.seed
        pool = registry.pool_of(adapter)
        protocol = protocol_for(pool.protocol)
        if job.control_images is not None and not protocol.takes_control_images:
            msg = f"pool {adapter.pool!r} speaks {pool.protocol}, which takes no control_images"
            loc = ["body", "control_images"]
            raise ValidationFailed([{"loc": loc, "msg": msg, "type": "control_images_unsupported"}])
        policy = self.cache.policy(cache_policy)
        if not (adapter.cache_nondeterministic or deterministic(adapter, pool)):
            # Another draw of the same seed would differ: a stored image is not "the"
            # image of these inputs. Neither read nor written, nor shared in flight.
            policy = CachePolicy.BYPASS
        variant = protocol.variant(adapter, pool)
        cache_key = self.cache.key(adapter, job, variant=variant)
        found = await self.cache.lookup(cache_key, policy)
        trace.cache = found.status
        team = registry.team_of(key)
        trace.team = registry.team_label(team)
        if found.body is not None:
            pool_state = self.balancer.pool(adapter.pool)
            saved = job.num_inference_steps * (pool_state.queue.step_s or 0.0)
            self.metrics.observe_cache_hit(trace.team, adapter.name, saved)
            return Generation(found.body, job.seed, adapter.name, found.status, "")
        headers = {"X-Request-ID": request_id}
        claim = Claim(
            team=team,
            weight=registry.weight_of(key),
            priority=key.priority if key is not None else "interactive",
            steps=job.num_inference_steps,
            deadline_at=deadline_at,
        )
        produce = partial(
            self._generate, adapter, job, cache_key, policy, headers, trace, on_queued, claim
        )
        started = time.perf_counter()
        try:
            made = await self.coalescer.run(cache_key, produce, policy=policy)
        finally:
            if not (trace.upstream_s or trace.queue_s):
                # It waited on another request's generation (or another replica's): that
                # wait is upstream time, none of it the gateway's own.
                trace.upstream_s = time.perf_counter() - started
        trace.worker = made.worker
        return Generation(made.body, job.seed, adapter.name, found.status, made.worker)

    async def _generate(
        self,
        adapter: AdapterSpec,
        job: WorkerRequest,
        key: str,
        policy: CachePolicy,
        headers: Mapping[str, str],
        trace: Trace,
        on_queued: Callable[[], None] | None,
        claim: Claim,
    ) -> Produced:
        """One generation, shared by every request coalesced onto it: forward, store.
        Its queue and worker times go to the trace of the request that started it."""
        pool = self.balancer.pool(adapter.pool)
        # Only these reach a worker: the pool's own credentials and the request id;
        # nothing of the client's headers (its Authorization least of all).
        headers = {**pool.spec.headers, **headers}
        try:
            image, worker = await self._forward(
                pool, adapter, job, headers, trace, on_queued, claim
            )
        except (UpstreamError, UpstreamRejected) as exc:
            exc.detail = f"adapter {adapter.name!r}: {exc.detail}"
            raise
        await self.cache.store(key, image, policy)
        return Produced(image, worker.name)

    async def _forward(
        self,
        pool: Pool,
        adapter: AdapterSpec,
        job: WorkerRequest,
        headers: Mapping[str, str],
        trace: Trace,
        on_queued: Callable[[], None] | None = None,
        claim: Claim = NO_CLAIM,
    ) -> tuple[bytes, Worker]:
        """Admit into the pool, pick a worker, send; retry elsewhere as the pool allows.
        Every try's time is GPU time of the claim's team (a failed one too)."""
        spec: PoolSpec = pool.spec
        protocol = protocol_for(spec.protocol)
        with pool.attempt(adapter=job.model, on_queued=on_queued, claim=claim) as attempt:
            while True:
                async with attempt.slot() as worker:
                    trace.queue_s += self.metrics.observe_queue_wait(pool.name, attempt.waited_s())
                    timeout = aiohttp.ClientTimeout(
                        total=attempt.try_timeout_s(), sock_connect=spec.connect_timeout_s
                    )
                    call = Call(
                        session=self.session,
                        base_url=worker.url,
                        worker=worker.name,
                        timeout=timeout,
                        headers=headers,
                        max_bytes=spec.max_response_bytes,
                        job=job,
                        adapter=adapter,
                        pool=spec,
                    )
                    started = time.perf_counter()
                    try:
                        image = await protocol.generate(call)
                    except UpstreamError as exc:
                        took = self.metrics.observe_try(pool.name, worker.name, started, exc)
                        trace.upstream_s += took
                        self.metrics.observe_gpu(trace.team, adapter.name, took, image=False)
                        attempt.retry_or_raise(exc)
                        self.metrics.child(self.metrics.retries, pool.name, exc.reason).inc()
                        continue
                    took = self.metrics.observe_try(pool.name, worker.name, started)
                    trace.upstream_s += took
                    self.metrics.observe_gpu(trace.team, adapter.name, took, image=True)
                    return image, worker
