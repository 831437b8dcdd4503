"""Pools of GPU workers: admission, the choice of a worker, retries and their budget.

The core of a `Pool` is sans-IO: `submit`, `withdraw`, `release` and `dispatch` change
its state and hand slots to waiting tickets by calling each ticket's `notify`; they
never sleep and read the time only from the injected `clock`. `Attempt` (from
`Pool.attempt()`) is the thin async layer the pipeline's forward step uses: queue
waits, the deadline, retries. bench/balance.py drives the same core from a
discrete-event simulation on a virtual clock. Nothing here knows HTTP. With several
gateway processes on one Redis, `Pool.relay` (gateway.coordination) sends this
process's tries to the pool's elected dispatcher, whose core serves everyone's.

Choice. Waiting tickets (one try of one request each) are served in FIFO order. For
each, among in-service workers with a free slot that it has not tried yet:
  1. a worker warm for its adapter (in the worker's LRU of recently served ones);
  2. else wait for a busy warm worker, if a slot there is expected within
     `adapter_load_s` (loading the adapter elsewhere would cost about that much);
  3. else a cold worker that no waiter close behind (AFFINITY_WINDOW) is warm on;
  4. else step aside: the waiter behind takes that slot and saves a load.
A waiter that waits (2) or steps aside (4) holds nothing: the free slot stays free for
whoever is next, so no GPU idles while anyone in the queue could use it.
Between several candidates: power of two choices on in_flight / max_concurrency, the
two drawn in proportion to `weight` and a tie broken at random in proportion to
`weight` (never by list order).

The affinity bound. Steps 2 and 4 let requests behind one go first. That can happen
to a request only within `adapter_load_s` of the first time it did; from then on no
request behind it is served before it, and it takes the first slot free for it. So
its wait beyond its FIFO turn is at most `adapter_load_s`, plus the time for the slot
releases it was overtaken by during that `adapter_load_s` to come round again.
tests/test_balancer.py::test_affinity_bound_* check the rule on a fake clock;
bench/balance.py measures the wait beyond the FIFO turn (at most 1.7 s there, with
adapter_load_s 1 s and 9 slots).

Metrics hooks: `PoolStats` and `WorkerStats` are plain counters bumped where things
happen; `Worker.in_flight` and `len(Pool.queue)` are the gauges.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

from gateway.causes import Cause, Stage
from gateway.errors import Overloaded, RequestError, UpstreamError
from gateway.health import WorkerHealth
from gateway.registry import PoolSpec, Registry, WorkerSpec

Clock = Callable[[], float]
# What a finished try says about its worker: "answered" is a 4xx (the input was bad,
# the worker is fine), "busy" a 429 or a 503 with Retry-After (no verdict),
# "cancelled" no verdict either; "failed" includes a 200 without an image.
Outcome = Literal["ok", "answered", "failed", "busy", "cancelled"]

AFFINITY_WINDOW = 4  # how many waiters behind one may claim a slot for affinity
_EWMA = 0.2  # weight of the newest service time in the running estimate
_RATE_WINDOW_S = 60.0  # completions this recent give the service rate for Retry-After


@dataclass
class WorkerStats:
    tries: int = 0
    failures: int = 0
    adapter_loads: int = 0  # cold choices: the worker had to load the adapter
    ejections: int = 0


@dataclass
class PoolStats:
    admitted: int = 0  # tries given a slot
    queued: int = 0  # of those and the rejected, the ones that had to wait
    queue_wait_s: float = 0.0  # total wait of admitted tries
    queue_wait_max_s: float = 0.0
    rejected_full: int = 0  # 503: the queue was full
    rejected_timeout: int = 0  # 503: waited queue_timeout_s
    retries: int = 0
    retries_denied: int = 0  # by the retry budget
    retries_peak: int = 0  # most budgeted retries in progress at once
    adapter_loads: int = 0
    ejections: int = 0


def _ignore(ticket: Ticket) -> None:
    pass


@dataclass(eq=False)
class Ticket:
    """One try of one request: waiting for a slot, then holding it."""

    adapter: str | None  # the LoRA the worker must hold; None: the base model
    notify: Callable[[Ticket], None] = _ignore  # called once: granted or failed
    exclude: Collection[Worker] = ()  # workers this request already tried
    retry: bool = False  # retries wait at the front of the queue: they came first
    worker: Worker | None = None
    error: RequestError | None = None
    queued_at: float = 0.0
    granted_at: float = 0.0
    passed_at: float | None = None  # first time affinity kept it waiting
    wake_at: float | None = None  # when that allowance runs out: dispatch again


@dataclass(eq=False)
class Worker:
    name: str  # "<pool>-<n>": what logs, metrics and error messages show
    spec: WorkerSpec
    health: WorkerHealth
    warm_size: int
    in_flight: int = 0
    # Slots this process may use, when not max_concurrency: its share while the
    # replicas' coordination is cut off from Redis (gateway.coordination).
    capacity: int | None = None
    service_s: float | None = None  # running estimate of one successful try
    warm: OrderedDict[str, None] = field(default_factory=OrderedDict)
    running: set[Ticket] = field(default_factory=set)
    stats: WorkerStats = field(default_factory=WorkerStats)

    @classmethod
    def create(cls, name: str, spec: WorkerSpec, *, pool: PoolSpec) -> Worker:
        worker = cls(name, spec, WorkerHealth(pool.health), pool.warm_adapters)
        for adapter in spec.adapters:
            worker.touch(adapter)
        return worker

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def slots(self) -> int:
        return self.spec.max_concurrency if self.capacity is None else self.capacity

    @property
    def load(self) -> float:
        return self.in_flight / max(1, self.slots)

    @property
    def free_slots(self) -> int:
        return max(0, self.slots - self.in_flight)

    @property
    def in_service(self) -> bool:
        return self.health.in_service

    def is_warm(self, adapter: str | None) -> bool:
        return adapter is None or adapter in self.warm

    def touch(self, adapter: str | None) -> bool:
        """`adapter` is now the most recently used here; True when it was cold."""
        if adapter is None:
            return False
        cold = adapter not in self.warm
        self.warm[adapter] = None
        self.warm.move_to_end(adapter)
        while len(self.warm) > self.warm_size:
            self.warm.popitem(last=False)
        return cold


class Relay(Protocol):
    """Where a pool's own tries go when several gateway processes share its workers
    (gateway.coordination): `takes` says which tickets are the relay's (the process's
    own tries) rather than the core's (tickets the relay itself feeds to the core)."""

    def takes(self, ticket: Ticket) -> bool: ...
    def submit(self, ticket: Ticket) -> None: ...
    def withdraw(self, ticket: Ticket) -> None: ...
    def release(self, ticket: Ticket, outcome: Outcome) -> None: ...


class _Defer:
    """The choice to wait for a busy warm worker."""


DEFER = _Defer()


class Pool:
    """Live state of one pool: its workers, their slots, the FIFO admission queue."""

    def __init__(self, name: str, spec: PoolSpec, *, clock: Clock, rng: random.Random) -> None:
        self.name = name
        self.spec = spec
        self.clock = clock
        self._rng = rng
        self.workers: list[Worker] = []
        self.queue: deque[Ticket] = deque()
        self.stats = PoolStats()
        self.active = 0  # requests trying this pool now: the retry budget's base
        self.active_retries = 0
        self.service_s: float | None = None  # pool-wide estimate, for untried workers
        self._done_at: deque[float] = deque(maxlen=64)  # recent successes: service rate
        self._named = 0  # worker names are never reused, so metrics never mix two
        self.relay: Relay | None = None  # set while coordinated with other processes
        self.set_workers(spec.workers)

    # -- configuration --------------------------------------------------------------

    def set_workers(self, specs: Sequence[WorkerSpec]) -> None:
        """The workers become `specs`. One whose URL stays keeps its state (slots,
        health, warm adapters); one removed leaves now, its tries in flight finish."""
        by_url = {worker.url: worker for worker in self.workers}
        workers = []
        for spec in specs:
            worker = by_url.get(spec.url)
            if worker is None:
                worker = Worker.create(f"{self.name}-{self._named}", spec, pool=self.spec)
                self._named += 1
            worker.spec = spec
            workers.append(worker)
        self.workers = workers
        self._changed()

    def reconfigure(self, spec: PoolSpec) -> None:
        """A reloaded registry: new settings, same live workers where URLs match."""
        self.spec = spec
        for worker in self.workers:
            worker.health.spec, worker.warm_size = spec.health, spec.warm_adapters
        if spec.discover is None:
            self.set_workers(spec.workers)
        else:  # keep what DNS gave until it is asked again, with the new settings
            self.set_workers([spec.discover.worker_spec(w.url) for w in self.workers])

    def close(self) -> None:
        """The pool left the registry: its waiters get 503, its tries finish."""
        while self.queue:
            msg = f"pool {self.name!r} was removed by a registry reload"
            self._fail(self.queue.popleft(), Overloaded(msg, retry_after_s=1))

    # -- the sans-IO core -----------------------------------------------------------

    def can_serve(self, exclude: Collection[Worker] = ()) -> bool:
        return any(w.in_service and w not in exclude for w in self.workers)

    def submit(self, ticket: Ticket) -> None:
        """Queue `ticket` and serve the queue; it may be granted before this returns.
        Raises Overloaded when the queue is full, UpstreamError (NO_WORKER) when no worker it
        may use is in service."""
        if self.relay is not None and self.relay.takes(ticket):
            return self.relay.submit(ticket)
        if not self.can_serve(ticket.exclude):
            raise no_healthy_worker(self.name)
        ticket.queued_at = self.clock()
        (self.queue.appendleft if ticket.retry else self.queue.append)(ticket)
        self.dispatch()
        if ticket.worker is not None:
            return
        self.stats.queued += 1
        if len(self.queue) > self.spec.max_queue:
            self.queue.remove(ticket)
            self.stats.rejected_full += 1
            msg = f"pool {self.name!r} is overloaded: {self.spec.max_queue} requests waiting"
            raise Overloaded(msg, retry_after_s=self.retry_after_s())

    def withdraw(self, ticket: Ticket) -> None:
        """The request behind `ticket` gave up (client gone, wait over): out of the
        queue, or its slot given back unused."""
        if self.relay is not None and self.relay.takes(ticket):
            return self.relay.withdraw(ticket)
        if ticket.worker is not None:
            self.release(ticket, "cancelled")
        elif ticket in self.queue:
            self.queue.remove(ticket)

    def release(self, ticket: Ticket, outcome: Outcome) -> None:
        """The try is over: free its slot, learn from it, serve the queue. Idempotent."""
        if self.relay is not None and self.relay.takes(ticket):
            return self.relay.release(ticket, outcome)
        worker = ticket.worker
        if worker is None or ticket not in worker.running:
            return
        worker.running.remove(ticket)
        worker.in_flight -= 1
        self._learn(worker, outcome, self.clock() - ticket.granted_at)
        self.dispatch()

    def hold(self, ticket: Ticket, worker: Worker) -> None:
        """`ticket` already holds a slot of `worker`, granted elsewhere (by a dispatcher
        before a takeover, or while Redis was away): count it, even past capacity."""
        ticket.worker, ticket.granted_at = worker, self.clock()
        worker.in_flight += 1
        worker.running.add(ticket)

    def probed(self, worker: Worker, ok: bool) -> None:
        """An active probe's result (from `gateway.prober.Prober`)."""
        was = worker.in_service
        worker.health.probed(ok, self.clock())
        if worker.in_service != was:
            self._changed()

    def dispatch(self) -> None:
        """Hand free slots to waiters, in FIFO order, by the rules in the docstring."""
        while self.queue and self._dispatch_pass():
            pass

    def next_wakeup(self) -> float | None:
        """The next time a waiter's affinity allowance runs out (for a simulation)."""
        now = self.clock()
        times = [t.wake_at for t in self.queue if t.wake_at is not None and t.wake_at > now]
        return min(times, default=None)

    def retry_after_s(self) -> int:
        """Seconds until the queue, plus one, is likely served at the recent rate."""
        now = self.clock()
        recent = [t for t in self._done_at if now - t <= _RATE_WINDOW_S]
        if len(recent) < 2:
            return math.ceil(self.spec.queue_timeout_s)
        rate = len(recent) / max(now - recent[0], 1e-3)
        return min(3600, math.ceil((len(self.queue) + 1) / rate))

    def retry_allowed(self) -> bool:
        """Envoy's retry budget: retries in progress below a share of active requests."""
        share = self.active * self.spec.retry_budget_percent / 100
        return self.active_retries < max(self.spec.retry_budget_min, share)

    def healthy_count(self) -> int:
        return sum(w.in_service for w in self.workers)

    # -- the choice -----------------------------------------------------------------

    def _dispatch_pass(self) -> bool:
        now = self.clock()
        free = {w: w.free_slots for w in self.workers if w.in_service and w.free_slots}
        spare = sum(free.values())
        waiters = list(self.queue)
        deferred: Counter[Worker] = Counter()  # waiters in this pass waiting per worker
        granted = False
        for i, ticket in enumerate(waiters):
            if spare == 0:
                break
            behind = waiters[i + 1 : i + 1 + AFFINITY_WINDOW]
            choice = self._choose(ticket, free, behind, deferred, now)
            if isinstance(choice, Worker):
                self._grant(ticket, choice, now)
                free[choice] -= 1
                spare -= 1
                granted = True
        return granted

    def _choose(
        self,
        ticket: Ticket,
        free: Mapping[Worker, int],
        behind: Sequence[Ticket],
        deferred: Counter[Worker],
        now: float,
    ) -> Worker | _Defer | None:
        candidates = [w for w, n in free.items() if n and w not in ticket.exclude]
        if not candidates:
            return None
        warm = [w for w in candidates if w.is_warm(ticket.adapter)]
        if warm:
            return self._p2c(warm)
        allowance = self._allowance(ticket, now)
        if allowance > 0:
            wait, worker = self._warm_wait(ticket, deferred, now)
            if worker is not None and wait <= allowance:
                deferred[worker] += 1
                self._passed(ticket, now)
                return DEFER
            candidates = [w for w in candidates if not _claimed(w, behind)]
            if not candidates:
                self._passed(ticket, now)
                return None
        return self._p2c(candidates)

    def _allowance(self, ticket: Ticket, now: float) -> float:
        """How much longer affinity may keep `ticket` waiting (the stated bound)."""
        start = now if ticket.passed_at is None else ticket.passed_at
        return start + self.spec.adapter_load_s - now

    def _passed(self, ticket: Ticket, now: float) -> None:
        if ticket.passed_at is None:
            ticket.passed_at = now
            ticket.wake_at = now + self.spec.adapter_load_s

    def _warm_wait(
        self, ticket: Ticket, deferred: Counter[Worker], now: float
    ) -> tuple[float, Worker | None]:
        """The busy warm worker expected to free a slot for `ticket` first, and when."""
        best: tuple[float, Worker | None] = (math.inf, None)
        for worker in self.workers:
            if worker.free_slots or not worker.in_service or worker in ticket.exclude:
                continue
            if worker.is_warm(ticket.adapter):
                wait = self._slot_free_in(worker, deferred[worker], now)
                best = min(best, (wait, worker), key=lambda pair: pair[0])
        return best

    def _slot_free_in(self, worker: Worker, ahead: int, now: float) -> float:
        """Expected seconds until `worker` frees a slot for the waiter after `ahead`
        others: its tries' running times against its usual service time."""
        mean = worker.service_s if worker.service_s is not None else self.service_s
        if mean is None:
            return math.inf  # nothing measured yet: no grounds to wait
        left = sorted(max(0.0, mean - (now - t.granted_at)) for t in worker.running)
        return left[ahead] if ahead < len(left) else math.inf

    def _p2c(self, workers: Sequence[Worker]) -> Worker:
        """Power of two choices on load; the two drawn by weight, a tie broken by weight."""
        if len(workers) == 1:
            return workers[0]
        first = self._rng.choices(workers, [w.spec.weight for w in workers])[0]
        rest = [w for w in workers if w is not first]
        second = self._rng.choices(rest, [w.spec.weight for w in rest])[0]
        if first.load != second.load:
            return first if first.load < second.load else second
        pair = (first, second)  # a tie goes by weight too: with two workers it is all
        return self._rng.choices(pair, [w.spec.weight for w in pair])[0]

    # -- bookkeeping ----------------------------------------------------------------

    def _grant(self, ticket: Ticket, worker: Worker, now: float) -> None:
        self.queue.remove(ticket)
        ticket.worker, ticket.granted_at, ticket.wake_at = worker, now, None
        worker.in_flight += 1
        worker.running.add(ticket)
        worker.stats.tries += 1
        if worker.touch(ticket.adapter):
            worker.stats.adapter_loads += 1
            self.stats.adapter_loads += 1
        wait = now - ticket.queued_at
        self.stats.admitted += 1
        self.stats.queue_wait_s += wait
        self.stats.queue_wait_max_s = max(self.stats.queue_wait_max_s, wait)
        ticket.notify(ticket)

    def _fail(self, ticket: Ticket, error: RequestError) -> None:
        ticket.error = error
        ticket.notify(ticket)

    def _learn(self, worker: Worker, outcome: Outcome, took: float) -> None:
        now = self.clock()
        if outcome == "ok":
            worker.service_s = _ewma(worker.service_s, took)
            self.service_s = _ewma(self.service_s, took)
            self._done_at.append(now)
        if outcome in ("ok", "answered"):
            worker.health.succeeded(now)
        elif outcome == "failed":
            worker.stats.failures += 1
            if worker.health.failed(now, peers=[w.health for w in self.workers]):
                worker.stats.ejections += 1
                self.stats.ejections += 1
                self._changed()

    def _changed(self) -> None:
        """Workers came, went or changed health: waiters that no worker can serve now
        fail at once (502, not a wait for the queue timeout); the rest are served."""
        for ticket in [t for t in self.queue if not self.can_serve(t.exclude)]:
            self.queue.remove(ticket)
            self._fail(ticket, no_healthy_worker(self.name))
        self.dispatch()

    # -- the async layer ------------------------------------------------------------

    @contextmanager
    def attempt(
        self, *, adapter: str | None, on_queued: Callable[[], None] | None = None
    ) -> Iterator[Attempt]:
        """One client request's stay in this pool (counted for the retry budget).
        `on_queued` is called when a try has to wait for a slot (the front then
        watches for the client going away, which it need not do otherwise)."""
        attempt = Attempt(self, adapter, on_queued)
        self.active += 1
        try:
            yield attempt
        finally:
            self.active -= 1
            attempt.end_retry()


def _claimed(worker: Worker, behind: Sequence[Ticket]) -> bool:
    """Is a waiter behind warm on `worker` (so giving it the slot saves a load)?"""
    return any(
        t.adapter is not None and t.adapter in worker.warm and worker not in t.exclude
        for t in behind
    )


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + _EWMA * (new - old)


def no_healthy_worker(pool: str) -> UpstreamError:
    return UpstreamError(Cause.NO_WORKER, f"pool {pool!r}")


def outcome_of(exc: BaseException | None) -> Outcome:
    """What a try's ending says of its worker: the cause's verdict, for a failure."""
    if exc is None:
        return "ok"
    cause = getattr(exc, "cause", None)  # UpstreamError and UpstreamRejected carry one
    if isinstance(cause, Cause) and cause.verdict != "none":
        return cause.verdict
    return "cancelled"  # the client left, or the gateway broke: no verdict on the worker


class Attempt:
    """One request's tries on a pool: queue waits, the deadline, retries.

    with pool.attempt(adapter=...) as attempt:
        while True:
            async with attempt.slot() as worker:
                try:
                    return await send(worker, timeout=attempt.try_timeout_s())
                except UpstreamError as exc:
                    attempt.retry_or_raise(exc)
    """

    def __init__(
        self, pool: Pool, adapter: str | None, on_queued: Callable[[], None] | None = None
    ) -> None:
        self.pool = pool
        self.adapter = adapter
        self.on_queued = on_queued
        self.deadline = pool.clock() + pool.spec.timeout_s
        self.tried: list[Worker] = []
        self.retries = 0
        self.accepted_retries = 0
        self._ticket: Ticket | None = None
        self._budgeted = False  # a retry that counts against the budget is running

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Worker]:
        """A worker's slot for one try, given back however the try ends."""
        ticket = await self._admit()
        assert ticket.worker is not None
        try:
            yield ticket.worker
        except BaseException as exc:
            self.pool.release(ticket, outcome_of(exc))
            raise
        self.pool.release(ticket, "ok")

    def waited_s(self) -> float:
        """How long the try now holding a slot waited in the queue for it."""
        ticket = self._ticket
        return 0.0 if ticket is None else max(0.0, ticket.granted_at - ticket.queued_at)

    def try_timeout_s(self) -> float:
        left = self.deadline - self.pool.clock()
        per_try = self.pool.spec.per_try_timeout_s
        return max(0.001, left if per_try is None else min(per_try, left))

    def retry_or_raise(self, exc: UpstreamError) -> None:
        """Record the failed try; return to retry on another worker, or raise `exc`."""
        if self._ticket is not None:
            self.pool.release(self._ticket, outcome_of(exc))
        self.end_retry()
        cause = exc.cause
        if not self._may_retry(cause):
            raise exc
        self.retries += 1
        self.pool.stats.retries += 1
        if cause.stage is Stage.ACCEPTED:
            self.accepted_retries += 1
        if cause.budgeted:
            self._budgeted = True
            self.pool.active_retries += 1
            self.pool.stats.retries_peak = max(
                self.pool.stats.retries_peak, self.pool.active_retries
            )

    def end_retry(self) -> None:
        if self._budgeted:
            self._budgeted = False
            self.pool.active_retries -= 1

    def _may_retry(self, cause: Cause) -> bool:
        spec, pool = self.pool.spec, self.pool
        if cause.stage is Stage.FINAL:
            return False
        if self.retries >= spec.max_retries or pool.clock() >= self.deadline:
            return False
        if not pool.can_serve(self.tried):
            return False  # every worker in service was tried
        if cause.stage is Stage.ACCEPTED and (
            cause.retry_on not in spec.retry_on
            or self.accepted_retries >= spec.max_accepted_retries
        ):
            return False
        if cause.budgeted and not pool.retry_allowed():
            pool.stats.retries_denied += 1
            return False
        return True

    async def _admit(self) -> Ticket:
        pool = self.pool
        done = asyncio.get_running_loop().create_future()

        def notify(ticket: Ticket) -> None:
            if not done.done():
                done.set_result(None)

        ticket = Ticket(self.adapter, notify, exclude=tuple(self.tried), retry=bool(self.tried))
        until = min(self.deadline, pool.clock() + pool.spec.queue_timeout_s)
        pool.submit(ticket)
        if ticket.worker is None and ticket.error is None and self.on_queued is not None:
            self.on_queued()
        try:
            while ticket.worker is None and ticket.error is None:
                await self._wait(ticket, done, until)
        except BaseException:
            pool.withdraw(ticket)  # cancelled or timed out: leave the queue, or the slot
            raise
        if ticket.error is not None:
            raise ticket.error
        assert ticket.worker is not None
        self.tried.append(ticket.worker)
        self._ticket = ticket
        return ticket

    async def _wait(self, ticket: Ticket, done: asyncio.Future[None], until: float) -> None:
        now = self.pool.clock()
        if now >= until:
            raise self._timed_out()
        wake = until
        if ticket.wake_at is not None and ticket.wake_at > now:
            wake = min(wake, ticket.wake_at)
        await asyncio.wait([done], timeout=wake - now)
        if not done.done():
            self.pool.dispatch()  # its affinity allowance may have run out

    def _timed_out(self) -> RequestError:
        pool = self.pool
        if pool.clock() >= self.deadline:
            what = f"no worker within {pool.spec.timeout_s:g}s"
            return UpstreamError(Cause.DEADLINE, f"pool {pool.name!r}", what)
        pool.stats.rejected_timeout += 1
        msg = (
            f"pool {pool.name!r} is overloaded: no free worker within {pool.spec.queue_timeout_s}s"
        )
        return Overloaded(msg, retry_after_s=pool.retry_after_s())


class Balancer:
    """Every pool of the registry; `update` takes a new registry and keeps live state."""

    def __init__(
        self,
        registry: Registry,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.clock = clock
        self._rng = rng if rng is not None else random.Random()
        self.pools: dict[str, Pool] = {}
        self.update(registry)

    def update(self, registry: Registry) -> None:
        """Pools and workers that stay keep their slots, queue, health and warm
        adapters; new ones start fresh; removed pools fail their waiters with 503."""
        pools: dict[str, Pool] = {}
        for name, spec in registry.pools.items():
            pool = self.pools.get(name)
            if pool is None:
                pool = Pool(name, spec, clock=self.clock, rng=self._rng)
            else:
                pool.reconfigure(spec)
            pools[name] = pool
        for name, pool in self.pools.items():
            if name not in pools:
                pool.close()
        self.pools = pools

    def pool(self, name: str) -> Pool:
        return self.pools[name]
