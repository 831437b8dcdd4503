"""Every Prometheus metric of the gateway, defined once.

Names follow Prometheus conventions: the `gateway_` prefix, base units (seconds),
`_total` on counters. Label values are bounded: adapter, pool and worker names come
from the registry (a request whose `model` names no adapter counts under
`adapter="unknown"`), status is the HTTP code, reason/result are fixed words.

One `Metrics` per app, on its own `CollectorRegistry`, so tests can run many apps in
one process. With several server processes (`gateway serve --processes N`) the values
live in prometheus-client's multiprocess files (PROMETHEUS_MULTIPROC_DIR, set and
cleaned by `serve`) and `exposition()` aggregates every process.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

if TYPE_CHECKING:
    from gateway.errors import UpstreamError

UNKNOWN_ADAPTER = "unknown"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# An image takes from milliseconds (a cache hit) to minutes (a queued SDXL at 50 steps).
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
# The gateway's own share of a request: tens of microseconds to a few milliseconds.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
M = TypeVar("M", Counter, Gauge, Histogram)

CACHE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


# What `Metrics.sync_balancer` reads of a `gateway.balancer.Balancer`, by shape: the
# balancer imports nothing from here and nothing here imports the balancer, so neither
# module drags the other (and all it imports) along.
class WorkerCounts(Protocol):
    @property
    def ejections(self) -> int: ...
    @property
    def adapter_loads(self) -> int: ...


class WorkerView(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def in_service(self) -> bool: ...
    @property
    def stats(self) -> WorkerCounts: ...


class PoolCounts(Protocol):
    @property
    def rejected_full(self) -> int: ...
    @property
    def rejected_timeout(self) -> int: ...
    @property
    def rejected_deadline(self) -> int: ...


class PoolView(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def queue(self) -> Sized: ...
    @property
    def stats(self) -> PoolCounts: ...
    @property
    def workers(self) -> Sequence[WorkerView]: ...


class BalancerView(Protocol):
    @property
    def pools(self) -> Mapping[str, PoolView]: ...


@dataclass(slots=True)
class Trace:
    """What one request did, filled in step by step by the pipeline, read once at the
    end by the access log and the request metrics."""

    adapter: str = UNKNOWN_ADAPTER
    pool: str = ""
    team: str = "default"  # whose GPU share it used (a registry name or "other")
    worker: str = ""
    cache: str = ""
    seed: int | None = None
    upstream_s: float = 0.0  # waiting on workers (or on an identical request's generation)
    queue_s: float = 0.0  # waiting for a free worker slot
    prompt: str | None = None  # only where the registry says log_prompts: true


class Metrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, *, multiprocess_dir: str | None = None
    ) -> None:
        """`multiprocess_dir`: where every server process keeps its values (the
        PROMETHEUS_MULTIPROC_DIR that `gateway.settings` read), None for one process."""
        r = self.registry = registry or CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir
        self._revision: str | None = None
        self._last: dict[tuple[Counter, tuple[str, ...]], int] = {}
        self._workers: set[tuple[str, ...]] = set()
        self._children: dict[tuple[object, tuple[str, ...]], object] = {}
        self.requests = Counter(
            "gateway_requests",
            "Generation requests answered, by adapter and HTTP status.",
            ["adapter", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from request to response, by adapter.",
            ["adapter"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "Time a request spent in the gateway itself: not waiting on a worker or the queue.",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "gateway_upstream_duration_seconds",
            "Time of one try on a worker.",
            ["pool", "worker"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors",
            "Failed tries on a worker, by reason.",
            ["pool", "worker", "reason"],
            registry=r,
        )
        self.worker_in_flight = Gauge(
            "gateway_worker_in_flight",
            "Requests a worker is serving now.",
            ["pool", "worker"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.worker_healthy = Gauge(
            "gateway_worker_healthy",
            "1 while a worker is in service, 0 while ejected.",
            ["pool", "worker"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.ejections = Counter(
            "gateway_worker_ejections",
            "Times a worker was ejected for failing.",
            ["pool", "worker"],
            registry=r,
        )
        self.retries = Counter(
            "gateway_retries",
            "Tries sent to another worker after a failure, by reason.",
            ["pool", "reason"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "gateway_queue_depth",
            "Requests waiting for a free worker slot.",
            ["pool"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_wait = Histogram(
            "gateway_queue_wait_seconds",
            "Time a request waited in its pool's queue.",
            ["pool"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "gateway_queue_rejections",
            "Requests refused with 503 (queue full or wait exceeded).",
            ["pool", "reason"],
            registry=r,
        )
        self.adapter_loads = Counter(
            "gateway_adapter_loads",
            "Requests sent to a worker without the adapter warm.",
            ["pool", "worker"],
            registry=r,
        )
        self.gpu_seconds = Counter(
            "gateway_gpu_seconds",
            "Time tries held a worker slot (GPU-seconds), by team and adapter; failed "
            "tries too: for charge-back.",
            ["team", "adapter"],
            registry=r,
        )
        self.images = Counter(
            "gateway_images",
            "Images generated by a worker (not from the cache), by team and adapter.",
            ["team", "adapter"],
            registry=r,
        )
        self.cache_hit_images = Counter(
            "gateway_cache_hit_images",
            "Requests answered from the cache, by team and adapter.",
            ["team", "adapter"],
            registry=r,
        )
        self.cache_saved_seconds = Counter(
            "gateway_cache_saved_gpu_seconds",
            "GPU-seconds the cache hits saved (steps x the pool's observed seconds per step).",
            ["team", "adapter"],
            registry=r,
        )
        self.cache_requests = Counter(
            "gateway_cache_requests",
            "Cache lookups by result: hit, miss, bypass, error.",
            ["result"],
            registry=r,
        )
        self.cache_duration = Histogram(
            "gateway_cache_duration_seconds",
            "Time of one cache operation.",
            ["op"],
            buckets=CACHE_BUCKETS,
            registry=r,
        )
        self.cache_stores = Counter(
            "gateway_cache_stores",
            "Cache writes by result: stored, too_big (over max_entry_bytes), bypass, error.",
            ["result"],
            registry=r,
        )
        self.cache_errors = Counter(
            "gateway_cache_errors",
            "Failed calls to the cache store (down, slow or full), by operation.",
            ["op"],
            registry=r,
        )
        self.coalesced = Counter(
            "gateway_coalesced_requests",
            "Requests served by another identical request's generation.",
            ["scope"],
            registry=r,
        )
        self.reloads = Counter(
            "gateway_registry_reloads",
            "Registry reloads by result: ok, error, unchanged.",
            ["result"],
            registry=r,
        )
        self.registry_info = Gauge(
            "gateway_registry_info",
            "The registry being served (1), labelled by its revision.",
            ["revision"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.cutoffs = Counter(
            "gateway_client_cutoffs",
            "Client connections closed by the server: a head or body too slow (408), "
            "or over limits.max_connections (503), by reason.",
            ["reason"],
            registry=r,
        )
        self.draining = Gauge(
            "gateway_draining",
            "1 once the process has been asked to stop and is draining.",
            registry=r,
            multiprocess_mode="livemax",
        )

        self.coordination_role = Gauge(
            "gateway_coordination_role",
            "1 for the role this process has in its pool's coordination: leader (its "
            "queue and in-flight gauges are the pool's, for every process), follower "
            "(they read 0), alone (Redis unreachable: its own share).",
            ["pool", "role"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.coordination_fallbacks = Counter(
            "gateway_coordination_fallbacks",
            "Times a process lost Redis and served alone on its share of the slots.",
            ["pool"],
            registry=r,
        )

    def child(self, metric: M, *labels: str) -> M:
        """`metric.labels(*labels)`, looked up once: prometheus-client's `labels()`
        costs a few microseconds a call (a lock, a tuple of str() calls), and the hot
        path makes several a request. The values are the registry's names and fixed
        words, so this holds as many entries as the metrics' own children; neither is
        ever removed (old series are zeroed, see `set_registry`)."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return cast(M, found)

    def observe_request(self, trace: Trace, status: int, elapsed_s: float) -> None:
        self.child(self.requests, trace.adapter, str(status)).inc()
        self.child(self.request_duration, trace.adapter).observe(elapsed_s)
        self.overhead.observe(max(0.0, elapsed_s - trace.upstream_s - trace.queue_s))

    def observe_queue_wait(self, pool: str, seconds: float) -> float:
        self.child(self.queue_wait, pool).observe(seconds)
        return seconds

    def observe_gpu(self, team: str, adapter: str, seconds: float, *, image: bool) -> None:
        """One try's slot time, charged to `team`; `image`: it produced one."""
        self.gpu_seconds.labels(team, adapter).inc(seconds)
        if image:
            self.images.labels(team, adapter).inc()

    def observe_cache_hit(self, team: str, adapter: str, saved_s: float) -> None:
        self.cache_hit_images.labels(team, adapter).inc()
        self.cache_saved_seconds.labels(team, adapter).inc(saved_s)

    def observe_try(
        self, pool: str, worker: str, started: float, error: UpstreamError | None = None
    ) -> float:
        """One try on a worker, from `started` (perf_counter) to now; its duration."""
        seconds = time.perf_counter() - started
        self.child(self.upstream_duration, pool, worker).observe(seconds)
        if error is not None:
            self.child(self.upstream_errors, pool, worker, error.reason).inc()
        return seconds

    def sync_balancer(self, balancer: BalancerView) -> None:
        """Copy the balancer's live state into the metrics: gauges are set, counters move
        by what changed since the last sync. Called by the metrics task every second
        and by GET /metrics, so the hot path pays nothing for them."""
        seen: set[tuple[str, ...]] = set()
        for pool in balancer.pools.values():
            self.queue_depth.labels(pool.name).set(len(pool.queue))
            self._advance(self.rejected, (pool.name, "full"), pool.stats.rejected_full)
            self._advance(self.rejected, (pool.name, "timeout"), pool.stats.rejected_timeout)
            self._advance(self.rejected, (pool.name, "deadline"), pool.stats.rejected_deadline)
            for worker in pool.workers:
                key: tuple[str, ...] = (pool.name, worker.name)
                seen.add(key)
                self.worker_in_flight.labels(*key).set(worker.in_flight)
                self.worker_healthy.labels(*key).set(1 if worker.in_service else 0)
                self._advance(self.ejections, key, worker.stats.ejections)
                self._advance(self.adapter_loads, key, worker.stats.adapter_loads)
        for gone in self._workers - seen:  # left in a reload or from DNS: zero, not stale
            self.worker_in_flight.labels(*gone).set(0)
            self.worker_healthy.labels(*gone).set(0)
        self._workers = seen

    def sync_cutoffs(self, totals: Mapping[str, int]) -> None:
        """The HTTP server's cut-off connections (gateway.server.CUTOFFS, this
        process's totals by reason), copied like the balancer's counters."""
        for reason, total in totals.items():
            self._advance(self.cutoffs, (reason,), total)

    def _advance(self, counter: Counter, labels: tuple[str, ...], total: int) -> None:
        key = (counter, labels)
        last = self._last.get(key, 0)
        # A smaller total is a new object (a worker that came back): count it whole.
        delta = total - last if total >= last else total
        if delta:
            counter.labels(*labels).inc(delta)
        self._last[key] = total

    def set_registry(self, revision: str) -> None:
        # Zero the old series rather than clear(): clear() is not multiprocess-safe.
        if self._revision is not None:
            self.registry_info.labels(self._revision).set(0)
        self.registry_info.labels(revision).set(1)
        self._revision = revision

    def exposed_names(self) -> set[str]:
        """Every series name /metrics can show (what alert rules and dashboards may use)."""
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        return {
            family.name + suffix
            for family in self.registry.collect()
            for suffix in suffixes.get(family.type, ("",))
        }

    def exposition(self) -> bytes:
        """The text format; with several processes, the sum over all of them."""
        path = self.multiprocess_dir
        if path is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=path)  # type: ignore[no-untyped-call]
        return generate_latest(merged)


class CacheMetrics:
    """The result cache's observer (`gateway.cache.CacheObserver`) as Prometheus series.
    The cache calls it where things happen; nothing here imports the cache."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def lookup(self, result: str, seconds: float) -> None:
        m = self._m
        m.child(m.cache_requests, result).inc()
        if result != "bypass":  # a bypass asked nothing of the store: no time to show
            m.child(m.cache_duration, "get").observe(seconds)

    def store(self, result: str, seconds: float) -> None:
        m = self._m
        m.child(m.cache_stores, result).inc()
        if result in ("stored", "error"):
            m.child(m.cache_duration, "set").observe(seconds)

    def error(self, op: str) -> None:
        self._m.child(self._m.cache_errors, op).inc()

    def coalesced(self, scope: str) -> None:
        self._m.child(self._m.coalesced, scope).inc()


COORDINATION_ROLES = ("leader", "follower", "alone")


class CoordinationMetrics:
    """gateway.coordination's observer: the role gauge and the fallback counter."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def role(self, pool: str, role: str) -> None:
        for name in COORDINATION_ROLES:
            self.metrics.coordination_role.labels(pool, name).set(1 if name == role else 0)

    def fallback(self, pool: str) -> None:
        self.metrics.coordination_fallbacks.labels(pool).inc()
