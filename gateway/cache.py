"""The result cache: the key, two backends behind one small interface, and fail-open.

A diffusion model given the same adapter, prompt, steps, guidance and seed draws the
same image, so the worker's response body is stored under a key made of exactly those.

    cache_key       namespace:v1: + sha256 of the canonical JSON of what decides the image
    CacheBackend    where entries live: `RedisCache` (shared by every replica) and
                    `MemoryCache` (a bounded in-process LRU: the default, and the fake
                    the unit tests drive), side by side as httpx's transports
    ResultCache     what the pipeline calls. Every backend call goes through a breaker:
                    a failure is a miss, `failure_threshold` failures in a row bypass the
                    cache for a cool-down, and nothing here ever fails a request.

Coalescing of identical in-flight requests is `gateway.coalesce`. The cache knows nothing
of workers; its bytes go out as they came in (never decoded, never re-encoded).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import logging
import time
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from gateway.errors import CacheUnavailable
from gateway.registry import AdapterSpec, CacheSpec, redis_where
from gateway.resp import PipelinedGet
from gateway.schema import WorkerRequest

logger = logging.getLogger("gateway.cache")

T = TypeVar("T")

# Bump when the canonical form below changes: entries under the old form become unreachable.
KEY_VERSION = "v1"


# json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False), made once:
# dumps with options builds a new encoder every call.
_KEY_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False)


def cache_key(
    adapter: AdapterSpec, job: WorkerRequest, *, namespace: str, variant: str | None = None
) -> str:
    """The key of the image `job` asks for. `job` has every optional field decided (the
    seed picked, the format defaulted), so null and missing read the same; floats are
    written by `repr`, so 7.5, 7.50 and 7.500 (or 1 and 1.0) are one number.

    `variant` is what else decides the image on the adapter's workers (its pool's
    protocol and the settings that shape the picture: `WorkerProtocol.variant`); None,
    a friendli-container pool's, leaves the key what it was before protocols existed.
    It is why the same adapter moved to a pool of another protocol, or to other
    settings, never serves the images the old one drew."""
    fields: dict[str, object] = {
        "adapter": adapter.name,
        "revision": adapter.revision,
        "prompt": job.prompt,
        "steps": job.num_inference_steps,
        "seed": job.seed,
        "format": job.response_format,
    }
    if "guidance_scale" not in adapter.ignore:
        fields["guidance"] = float(job.guidance_scale)
    if variant is not None:
        fields["variant"] = variant
    # Only when given, so that every other key stays what it was. A digest of each
    # image's text (base64 or URL) as sent: the same picture sent as other text is a
    # miss, never another picture's hit. A URL's key is the URL's, whatever it serves.
    if job.control_images is not None:
        fields["control_images"] = [
            hashlib.sha256(control.image.encode()).hexdigest() for control in job.control_images
        ]
    if job.controlnet_weights is not None:
        fields["controlnet_weights"] = [float(w) for w in job.controlnet_weights]
    text = _KEY_ENCODER.encode(fields)
    return f"{namespace}:{KEY_VERSION}:{hashlib.sha256(text.encode()).hexdigest()}"


class CachePolicy(enum.Enum):
    """What one request lets the cache do, from its `Cache-Control` header."""

    USE = "use"  # read; on a miss, share an in-flight generation, then store
    REFRESH = "no-cache"  # skip the read, generate afresh, store the result
    BYPASS = "no-store"  # neither read nor write

    @property
    def reads(self) -> bool:
        return self is CachePolicy.USE

    @property
    def writes(self) -> bool:
        return self is not CachePolicy.BYPASS


def policy_from_cache_control(header: str | None) -> CachePolicy:
    if not header:
        return CachePolicy.USE
    directives = {part.split("=", 1)[0].strip().lower() for part in header.split(",")}
    if "no-store" in directives:
        return CachePolicy.BYPASS
    if "no-cache" in directives:
        return CachePolicy.REFRESH
    return CachePolicy.USE


# ---------------------------------------------------------------------------- backends


class CacheBackend(ABC):
    """Where entries live. Any failure of the store is raised as `CacheUnavailable`."""

    name = "cache"  # for logs: which store, never its password

    @abstractmethod
    async def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def set(self, key: str, value: bytes, *, ttl_ms: int) -> None: ...

    @abstractmethod
    async def lock(self, key: str, token: str, *, ttl_ms: int) -> bool:
        """Take `key` for `token` unless someone holds it (SET NX PX)."""

    @abstractmethod
    async def extend(self, key: str, token: str, *, ttl_ms: int) -> bool:
        """Renew `token`'s hold on `key`; False when it lapsed or another holds it."""

    @abstractmethod
    async def unlock(self, key: str, token: str) -> None:
        """Let go of `key` if `token` still holds it."""

    async def aclose(self) -> None:
        return None


class MemoryCache(CacheBackend):
    """A bounded in-process LRU by total bytes (keys and values) with a TTL per entry.

    The default when no Redis URL is set, and the fake that unit tests drive with a
    fake clock. Its locks only span this process, which is all it is shared by."""

    name = "memory"

    def __init__(self, *, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._locks: dict[str, tuple[float, str]] = {}

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry[1]

    async def set(self, key: str, value: bytes, *, ttl_ms: int) -> None:
        self._drop(key)
        cost = len(key) + len(value)
        if cost > self.max_bytes:
            return
        self._entries[key] = (self._clock() + ttl_ms / 1000, value)
        self.size += cost
        while self.size > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.size -= len(key) + len(entry[1])

    def __len__(self) -> int:
        return len(self._entries)

    async def lock(self, key: str, token: str, *, ttl_ms: int) -> bool:
        if self._holder(key) is not None:
            return False
        self._locks[key] = (self._clock() + ttl_ms / 1000, token)
        return True

    async def extend(self, key: str, token: str, *, ttl_ms: int) -> bool:
        if self._holder(key) != token:
            return False
        self._locks[key] = (self._clock() + ttl_ms / 1000, token)
        return True

    async def unlock(self, key: str, token: str) -> None:
        if self._holder(key) == token:
            del self._locks[key]

    def _holder(self, key: str) -> str | None:
        held = self._locks.get(key)
        if held is None:
            return None
        if held[0] <= self._clock():
            del self._locks[key]
            return None
        return held[1]


# Compare-and-delete and compare-and-renew: a leader whose lock lapsed and was taken by
# another must not free or extend the new holder's lock. One key each: fine on a cluster.
_UNLOCK = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)
_EXTEND = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)

RedisClient = Redis | RedisCluster


class RedisCache(CacheBackend):
    """Redis (or Redis Cluster) through redis-py's asyncio client.

    Fail fast, never wait: socket timeouts of a few tens of milliseconds, no retries in
    redis-py (the breaker in `ResultCache` decides when to try again), and each call cut
    off at `deadline_s` whatever redis-py is doing (cluster rediscovery sleeps, for one).
    """

    name = "redis"

    def __init__(
        self,
        client: RedisClient,
        *,
        deadline_s: float,
        where: str,
        fast_get: PipelinedGet | None = None,
    ) -> None:
        self.client = client
        self.deadline_s = deadline_s
        self.name = f"redis {where}"
        # GET, the hit path, over one pipelined connection (gateway.resp): a fifth of
        # redis-py's CPU per hit. None (TLS, Cluster): GET through redis-py too.
        self.fast_get = fast_get

    @classmethod
    def from_spec(cls, spec: CacheSpec) -> RedisCache:
        assert spec.url is not None
        options: dict[str, Any] = {
            "socket_timeout": spec.timeout_ms / 1000,
            "socket_connect_timeout": spec.connect_timeout_ms / 1000,
            # The asyncio Retry (redis.retry.Retry is the blocking one); 0 = one try.
            "retry": Retry(NoBackoff(), 0),
        }
        client: RedisClient
        if spec.cluster:
            client = RedisCluster.from_url(spec.url, **options)
        else:
            client = Redis.from_url(spec.url, **options)
        deadline_s = (spec.timeout_ms + spec.connect_timeout_ms) / 1000
        plain = not spec.cluster and spec.url.startswith(("redis://", "unix://"))
        fast_get = PipelinedGet.from_url(spec.url) if plain else None
        return cls(client, deadline_s=deadline_s, where=redis_where(spec.url), fast_get=fast_get)

    async def _run(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self.deadline_s):
                return await call()
        # Every way a store can fail: redis-py's own errors (RedisClusterException is not
        # a RedisError), and OSError, which takes in ssl errors and the deadline above.
        except (RedisError, RedisClusterException, OSError) as exc:
            raise CacheUnavailable(f"{self.name}: {type(exc).__name__}: {exc}") from exc

    async def get(self, key: str) -> bytes | None:
        fast_get = self.fast_get
        if fast_get is not None:
            return await self._run(lambda: fast_get.get(key))
        value = await self._run(lambda: self.client.get(key))
        return cast(bytes | None, value)  # bytes: the client never decodes responses

    async def set(self, key: str, value: bytes, *, ttl_ms: int) -> None:
        await self._run(lambda: self.client.set(key, value, px=ttl_ms))

    async def lock(self, key: str, token: str, *, ttl_ms: int) -> bool:
        return bool(await self._run(lambda: self.client.set(key, token, nx=True, px=ttl_ms)))

    async def extend(self, key: str, token: str, *, ttl_ms: int) -> bool:
        renewed = await self._run(lambda: self._eval(_EXTEND, key, token, str(ttl_ms)))
        return bool(renewed)

    async def unlock(self, key: str, token: str) -> None:
        await self._run(lambda: self._eval(_UNLOCK, key, token))

    async def _eval(self, script: str, key: str, *args: str) -> object:
        # EVAL with the script text each time: a few dozen bytes, once per generation,
        # and no NOSCRIPT dance after a Redis restart.
        result: object = await self.client.eval(script, 1, key, *args)
        return result

    async def aclose(self) -> None:
        if self.fast_get is not None:
            await self.fast_get.aclose()
        await self.client.aclose()


# ---------------------------------------------------------------------------- the front


class CacheObserver(Protocol):
    """What the cache reports as it happens; `CacheCounters` keeps plain counts, and the
    metrics module can implement this to feed Prometheus."""

    def lookup(self, result: str, seconds: float) -> None:
        """result: hit | miss | bypass | error"""

    def store(self, result: str, seconds: float) -> None:
        """result: stored | too_big (over max_entry_bytes) | bypass | error"""

    def error(self, op: str) -> None:
        """op: get | set | lock | extend | unlock (any failed call to the store)"""

    def coalesced(self, scope: str) -> None:
        """scope: local (shared this process's generation) | remote (another replica's)"""


@dataclass
class CacheCounters:
    """Plain counts: the observer when none is given (unit tests, the benchmark); the
    app gives `gateway.metrics.CacheMetrics`, which keeps the same counts for /metrics."""

    lookups: Counter[str] = field(default_factory=Counter)
    stores: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    coalesced_requests: Counter[str] = field(default_factory=Counter)
    lookup_seconds: float = 0.0  # total, over lookups that reached the store
    store_seconds: float = 0.0

    def lookup(self, result: str, seconds: float) -> None:
        self.lookups[result] += 1
        self.lookup_seconds += seconds

    def store(self, result: str, seconds: float) -> None:
        self.stores[result] += 1
        self.store_seconds += seconds

    def error(self, op: str) -> None:
        self.errors[op] += 1

    def coalesced(self, scope: str) -> None:
        self.coalesced_requests[scope] += 1


class Breaker:
    """Consecutive failures open it for a cool-down; then one call probes the store and
    its outcome closes the breaker or opens it again. It logs when it opens and when it
    closes: once per cool-down, never once per request."""

    def __init__(
        self, *, threshold: int, cooldown_s: float, clock: Callable[[], float], name: str
    ) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.failures = 0
        self.open_until: float | None = None
        self.probing = False
        self._clock = clock
        self._name = name

    def admit(self) -> Literal["call", "probe"] | None:
        """May a call go to the store now? None while cooling down."""
        if self.open_until is None:
            return "call"
        if self.probing or self._clock() < self.open_until:
            return None
        self.probing = True
        return "probe"

    def succeeded(self) -> None:
        if self.open_until is not None:
            logger.warning("cache %s answers again; using it", self._name)
        self.failures, self.open_until, self.probing = 0, None, False

    def failed(self, exc: CacheUnavailable, *, probe: bool) -> None:
        self.failures += 1
        if self.failures < self.threshold or (self.open_until is not None and not probe):
            return  # below the threshold, or a straggler from before it opened
        self.open_until = self._clock() + self.cooldown_s
        self.probing = False
        logger.warning(
            "cache unavailable (%d failures in a row, last: %s); bypassing it for %.1f s",
            self.failures,
            exc,
            self.cooldown_s,
        )

    def abandoned(self, *, probe: bool) -> None:
        """The call was cancelled before it said anything about the store."""
        if probe:
            self.probing = False


class Skipped(enum.Enum):
    """Why a guarded call gave no answer; the value is what lookups count it as."""

    COOLING = "bypass"
    FAILED = "error"


@dataclass(frozen=True, slots=True)
class Lookup:
    body: bytes | None
    status: Literal["hit", "miss", "bypass"]  # what X-Cache says


_BYPASSED = Lookup(None, "bypass")


class ResultCache:
    """The pipeline's view of the cache. Never raises for the store's sake: a failed call
    is counted, and reads as a miss (or as 'not locked' for the coalescer)."""

    def __init__(
        self,
        *,
        backend: CacheBackend,
        spec: CacheSpec,
        observer: CacheObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.spec = spec
        self.observer: CacheObserver = observer if observer is not None else CacheCounters()
        self.breaker = Breaker(
            threshold=spec.failure_threshold,
            cooldown_s=spec.cooldown_s,
            clock=clock,
            name=backend.name,
        )
        self._clock = clock
        self._ttl_ms = max(1, round(spec.ttl_s * 1000))

    def key(self, adapter: AdapterSpec, job: WorkerRequest, *, variant: str | None = None) -> str:
        return cache_key(adapter, job, namespace=self.spec.namespace, variant=variant)

    def policy(self, asked: CachePolicy) -> CachePolicy:
        return asked if self.spec.enabled else CachePolicy.BYPASS

    async def lookup(self, key: str, policy: CachePolicy) -> Lookup:
        if not policy.reads:
            self.observer.lookup("bypass", 0.0)
            return _BYPASSED
        started = self._clock()
        body = await self._call("get", lambda: self.backend.get(key))
        if isinstance(body, Skipped):
            self.observer.lookup(body.value, self._clock() - started)
            # A store that failed is a miss; one we did not ask (cooling down) a bypass.
            return _BYPASSED if body is Skipped.COOLING else Lookup(None, "miss")
        self.observer.lookup("miss" if body is None else "hit", self._clock() - started)
        return Lookup(body, "miss" if body is None else "hit")

    async def store(self, key: str, body: bytes, policy: CachePolicy) -> None:
        if not policy.writes:
            self.observer.store("bypass", 0.0)
            return
        if len(body) > self.spec.max_entry_bytes:
            self.observer.store("too_big", 0.0)
            return
        started = self._clock()
        done = await self._call("set", lambda: self.backend.set(key, body, ttl_ms=self._ttl_ms))
        result = done.value if isinstance(done, Skipped) else "stored"
        self.observer.store(result, self._clock() - started)

    async def peek(self, key: str) -> bytes | None:
        """A read for the coalescer: not counted as a lookup, None when unavailable."""
        body = await self._call("get", lambda: self.backend.get(key))
        return None if isinstance(body, Skipped) else body

    async def lock(self, key: str, token: str) -> bool | None:
        """True: held; False: another holds it; None: the store cannot say."""
        ttl_ms = self.spec.lock_ttl_ms
        held = await self._call("lock", lambda: self.backend.lock(key, token, ttl_ms=ttl_ms))
        return None if isinstance(held, Skipped) else held

    async def extend(self, key: str, token: str) -> bool:
        ttl_ms = self.spec.lock_ttl_ms
        held = await self._call("extend", lambda: self.backend.extend(key, token, ttl_ms=ttl_ms))
        return held is True

    async def unlock(self, key: str, token: str) -> None:
        await self._call("unlock", lambda: self.backend.unlock(key, token))

    async def _call(self, op: str, call: Callable[[], Awaitable[T]]) -> T | Skipped:
        admitted = self.breaker.admit()
        if admitted is None:
            return Skipped.COOLING
        probe = admitted == "probe"
        settled = False
        try:
            result = await call()
            settled = True
        except CacheUnavailable as exc:
            settled = True
            self.observer.error(op)
            self.breaker.failed(exc, probe=probe)
            return Skipped.FAILED
        finally:
            if not settled:
                self.breaker.abandoned(probe=probe)
        self.breaker.succeeded()
        return result


@asynccontextmanager
async def open_cache(
    spec: CacheSpec, *, observer: CacheObserver | None = None
) -> AsyncIterator[ResultCache]:
    """The process's result cache for the app's lifespan: Redis when a URL is set,
    memory otherwise; the Redis client's connections are closed on the way out."""
    backend: CacheBackend
    if spec.url is not None:
        backend = RedisCache.from_spec(spec)
    else:
        backend = MemoryCache(max_bytes=spec.memory_max_bytes)
    state = "on" if spec.enabled else "off"
    logger.info("result cache %s: %s, namespace %r", state, backend.name, spec.namespace)
    try:
        yield ResultCache(backend=backend, spec=spec, observer=observer)
    finally:
        await backend.aclose()
