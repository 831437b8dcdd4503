"""Pools of GPU workers: admission, the choice of a worker, retries and their budget.

The core of a `Pool` is sans-IO: `submit`, `withdraw`, `release` and `dispatch` change
its state and hand slots to waiting tickets by calling each ticket's `notify`; they
never sleep and read the time only from the injected `clock`. `Attempt` (from
`Pool.attempt()`) is the thin async layer the pipeline's forward step uses: queue
waits, the deadline, retries. bench/balance.py drives the same core from a
discrete-event simulation on a virtual clock. Nothing here knows HTTP. With several
gateway processes on one Redis, `Pool.relay` (gateway.coordination) sends this
process's tries to the pool's elected dispatcher, whose core serves everyone's.

Choice. Waiting tickets (one try of one request each) are served in the order of
the pool's `FairQueue` (gateway/fairness.py: fair shares of GPU time between teams,
priorities, FIFO within a team; with one team it is FIFO).
A free slot goes to the head or to at most `affinity_lookahead` waiters behind it,
never further back. For each of those, in order, among in-service workers with a free
slot that it has not tried yet:
  1. a worker warm for its adapter (in the worker's LRU of recently served ones),
     those the adapter is placed on first;
  2. once the affinity bound (below) is reached, the cheapest cold worker;
  3. else wait for a busy warm worker, if a slot there is expected within
     `adapter_load_s` (loading the adapter elsewhere would cost about that much) and
     within its allowance; an adapter warm nowhere waits so for a worker it is placed on;
  4. else a cold worker that no waiter in the look-ahead is warm on, and whose LRU
     would evict no needed adapter (one placed there and warm on no other worker: it
     would be loaded again soon), the cheapest of those; when every such worker would,
     and the pool is saturated (as many waiting as slots in service), wait: one that
     would not may free, or a request for the needed adapter may come, and a slot
     idles for that at most the pool's recent time between releases; then the
     cheapest (not saturated: at once);
  5. else step aside: a waiter behind takes that slot and saves a load.
A waiter that waits (3, 4) or steps aside (5) holds nothing: the free slot stays free
for whoever is next. The cheapest cold worker: one the adapter is placed on, else
where a load's cost is least: its share of a try's slot time there (1 / the worker's
service time: a slow worker loses less), doubled if it would evict a needed adapter. Between
several candidates: power of two choices on in_flight / max_concurrency, the two drawn
in proportion to `weight` and a tie broken at random in proportion to `weight` (never
by list order).

Placement. Every REPLAN_S the pool plans, with gateway/placement.py, on which workers
each adapter should be warm: from its share of the requests granted, decayed with
`placement_half_life_s`; hot adapters on several workers, the tail on one or none,
PLACEMENT_SPARE places per worker left to unplaced ones. The view of what each worker
holds is the pool's own: its sends, and `adapters:` in the registry at start.
`placement: false` plans nothing (rules 1-5 without the placed preferences).

The affinity bound. Steps 3 and 5 let requests behind one go first, within two limits.
Overtakes: a waiter sees at most `affinity_overtakes` (default 6 per slot in service)
waiters behind it granted first. Each such grant delays its turn (FIFO within a team,
fair between teams) by one grant, so this bounds its wait beyond its turn: about six
service times by default, whatever the pool's size. Time: once its turn has come (it
is the head, or the pool is not saturated: every waiter would be served within a
round) a waiter is held back for at most its allowance, fixed the first time it is
held back so: `adapter_load_s` x the waiters per slot in service (at least 1), at most
`affinity_wait_max_s` (default 4 x `adapter_load_s`). Deep in a saturated queue only
overtakes count: a clock started there runs out during the ordinary wait for its turn
and then forces a load that saves nobody time. Overtaken by another team, though, its
allowance starts at once and lasts at most `adapter_load_s`: its team's fair share is
at stake, not only its own wait. Once either limit is reached no request behind it is
served before it, and it takes the first slot free for it.
tests/test_balancer.py::test_affinity_bound_*, ::test_a_waiter_is_overtaken_*,
::test_the_time_allowance_starts_* and ::test_no_slot_leaks_and_the_bound_holds_* check
it on a fake clock; bench/balance.py measures the wait beyond the FIFO turn
(`--placement` prints it per seed).

Deadlines. A ticket may carry `deadline_at`, when its client wants the image. Its
latest useful start is that minus its estimated service time. `submit` refuses it at
once (503, Retry-After) when its predicted start, the estimated work queued ahead of it
in service order plus the work left on the running tries, spread over the slots in
service, is later; `expire` takes out of the queue (503) every waiter whose latest
start has passed. Before the pool has timed a step, nothing is refused by prediction.

Metrics hooks: `PoolStats` and `WorkerStats` are plain counters bumped where things
happen; `Worker.in_flight` and `len(Pool.queue)` are the gauges.
"""

from __future__ import annotations

import asyncio
import itertools
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
from gateway.fairness import DEFAULT_TEAM, NO_CLAIM, Claim, FairQueue, Priority
from gateway.health import WorkerHealth
from gateway.placement import Holder, Popularity, plan
from gateway.registry import PoolSpec, Registry, WorkerSpec

Clock = Callable[[], float]
# What a finished try says about its worker: "answered" is a 4xx (the input was bad,
# the worker is fine), "busy" a 429 or a 503 with Retry-After (no verdict),
# "cancelled" no verdict either; "failed" includes a 200 without an image.
Outcome = Literal["ok", "answered", "failed", "busy", "cancelled"]

REPLAN_S = 5.0  # how often the placement is planned again
PLACEMENT_SPARE = 1  # places per worker the plan leaves to unplaced adapters
OVERTAKES_PER_SLOT = 6  # affinity_overtakes when unset: per slot in service
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
    rejected_deadline: int = 0  # 503: could not start by its deadline (refused or expired)
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
    passed_at: float | None = None  # its time allowance started: held back once its turn came
    wake_at: float | None = None  # when that allowance runs out: dispatch again
    overtaken: int = 0  # waiters behind it granted a slot first (the affinity bound)
    recheck_at: float | None = None  # held off a load that would evict a needed adapter
    # Fair order (gateway.fairness): whose share it uses, and how much of it.
    team: str = DEFAULT_TEAM
    weight: float = 1.0  # its team's weight, from the registry it was admitted under
    priority: Priority = "interactive"
    steps: int = 1  # num_inference_steps: the estimate of its GPU time scales with it
    deadline_at: float | None = None  # on the pool's clock: when its client wants the image


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
    freed_at: float = -math.inf  # when it last gave a slot back

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
        self.queue: FairQueue[Ticket] = FairQueue(
            clock=clock,
            batch_aging_s=lambda: self.spec.batch_aging_s,
            credit_s=lambda: self.spec.share_credit_s,
        )
        self.stats = PoolStats()
        self.active = 0  # requests trying this pool now: the retry budget's base
        self.active_retries = 0
        self.service_s: float | None = None  # pool-wide estimate, for untried workers
        self._done_at: deque[float] = deque(maxlen=64)  # recent successes: service rate
        self._named = 0  # worker names are never reused, so metrics never mix two
        self.popularity = Popularity(spec.placement_half_life_s)
        self.placed: dict[str, frozenset[Worker]] = {}  # adapter -> workers it should be on
        self._planned_at = -math.inf
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
        self.popularity.retune(spec.placement_half_life_s, self.clock())
        self._planned_at = -math.inf  # plan again, with the new settings, at once
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
        latest = self.latest_start(ticket)
        start = None if latest is None else self.predicted_start(ticket)
        if start is not None and latest is not None and start > latest:
            self.queue.remove(ticket)
            self.stats.rejected_deadline += 1
            msg = (
                f"pool {self.name!r} cannot start this request by its deadline: it would "
                f"start in about {start - ticket.queued_at:.1f}s, after the work queued ahead of it"
            )
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
        worker.freed_at = self.clock()
        took = worker.freed_at - ticket.granted_at
        self.queue.finished(ticket, took, ok=outcome == "ok")  # the team's actual charge
        self._learn(worker, outcome, took)
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
        """The next time a waiter's affinity allowance runs out, or its latest start
        passes (for a simulation: then `expire` and `dispatch`). For the allowance only
        the look-ahead's waiters count: one further back changes no choice."""
        now = self.clock()
        window = itertools.islice(self.queue, self.spec.affinity_lookahead + 1)
        times = [t for x in window for t in (x.wake_at, x.recheck_at) if t is not None and t > now]
        times += [t for t in map(self.latest_start, self.queue) if t is not None and t > now]
        return min(times, default=None)

    # -- deadlines ------------------------------------------------------------------

    def latest_start(self, ticket: Ticket) -> float | None:
        """The last moment `ticket` can start and still be done by its deadline."""
        if ticket.deadline_at is None:
            return None
        return ticket.deadline_at - self.queue.timed_estimate(ticket)

    def predicted_start(self, ticket: Ticket) -> float | None:
        """When a queued `ticket` is likely to get a slot: the work ahead of it in
        service order and the work left on running tries, over the slots in service.
        None before the pool has timed a step (no grounds to refuse anything)."""
        slots = self.slots_in_service()
        if self.queue.step_s is None or not slots:
            return None
        now = self.clock()
        running = sum(
            max(0.0, cost - (now - t.granted_at)) for t, cost in self.queue.running_estimates()
        )
        return now + (self.queue.work_ahead(ticket) + running) / slots

    def expire(self) -> None:
        """Waiters whose latest start has passed leave the queue with 503: a slot
        given now would draw an image its client no longer waits for."""
        now = self.clock()
        for ticket in list(self.queue):
            latest = self.latest_start(ticket)
            if latest is not None and latest <= now:
                self.queue.remove(ticket)
                self.stats.rejected_deadline += 1
                msg = f"pool {self.name!r} could not start this request by its deadline"
                self._fail(ticket, Overloaded(msg, retry_after_s=self.retry_after_s()))

    def retry_after_s(self) -> int:
        """Seconds until the queue, plus one, is likely served at the recent rate."""
        now = self.clock()
        recent = self._recent_successes(now)
        if len(recent) < 2:
            return math.ceil(self.spec.queue_timeout_s)
        rate = len(recent) / max(now - recent[0], 1e-3)
        return min(3600, math.ceil((len(self.queue) + 1) / rate))

    def _recent_successes(self, now: float) -> list[float]:
        """When the last successes (at most 64) ended, those within _RATE_WINDOW_S."""
        return [t for t in self._done_at if now - t <= _RATE_WINDOW_S]

    def slots_in_service(self) -> int:
        return sum(w.spec.max_concurrency for w in self.workers if w.in_service)

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
        if spare == 0:
            return False
        self._replan(now)
        # The look-ahead is bounded: the head and affinity_lookahead waiters behind it.
        waiters = list(itertools.islice(self.queue, self.spec.affinity_lookahead + 1))
        deferred: Counter[Worker] = Counter()  # waiters in this pass waiting per worker
        held: list[Ticket] = []  # waiters this pass passed over: a grant behind overtakes them
        most = self._overtakes_max()
        granted = False
        for i, ticket in enumerate(waiters):
            if spare == 0:
                break
            choice = self._choose(ticket, free, waiters[i + 1 :], deferred, now, head=i == 0)
            if isinstance(choice, Worker):
                for ahead in held:
                    ahead.overtaken += 1
                    if ahead.team != ticket.team:
                        self._overtaken_by_another_team(ahead, now)
                self._grant(ticket, choice, now)
                free[choice] -= 1
                spare -= 1
                granted = True
                if any(ahead.overtaken >= most for ahead in held):
                    break  # its limit is reached: the next pass serves it before those behind
            else:
                held.append(ticket)
        return granted

    def _choose(
        self,
        ticket: Ticket,
        free: Mapping[Worker, int],
        behind: Sequence[Ticket],
        deferred: Counter[Worker],
        now: float,
        *,
        head: bool,
    ) -> Worker | _Defer | None:
        candidates = [w for w, n in free.items() if n and w not in ticket.exclude]
        if not candidates:
            return None
        home = self._home(ticket.adapter)
        warm = [w for w in candidates if w.is_warm(ticket.adapter)]
        if warm:
            return self._p2c([w for w in warm if w in home] or warm)
        allowance = self._allowance(ticket, now)
        if allowance <= 0:
            return self._cold(ticket.adapter, candidates)
        wait, worker = self._warm_wait(ticket, deferred, now)
        if worker is not None and wait <= min(allowance, self.spec.adapter_load_s):
            deferred[worker] += 1
            self._held_back(ticket, now, head=head)
            return DEFER
        candidates = [w for w in candidates if not _claimed(w, behind)]
        if not candidates:
            self._held_back(ticket, now, head=head)
            return None
        harmless = [w for w in candidates if not self._evicts_needed(w)]
        if harmless:
            return self._cold(ticket.adapter, harmless)
        if self._saturated():
            # Every free slot would evict a needed adapter: one may be about to free
            # that does not, or a waiter warm on these may arrive. A slot idles at most
            # the pool's time between releases for it.
            idle = self._idle_s()
            ready = [w for w in candidates if now - w.freed_at >= idle]
            if not ready:
                ticket.recheck_at = min(w.freed_at for w in candidates) + idle
                self._held_back(ticket, now, head=head)
                return None
            candidates = ready
        return self._cold(ticket.adapter, candidates)

    def _home(self, adapter: str | None) -> frozenset[Worker]:
        """The workers the plan places `adapter` on."""
        return self.placed.get(adapter, frozenset()) if adapter is not None else frozenset()

    def _cold(self, adapter: str | None, candidates: Sequence[Worker]) -> Worker:
        """Where to load `adapter`: a worker it is placed on, else where the load costs
        least (its share of a try's slot time there, doubled if it evicts a placed
        adapter, which will be loaded again). Loads that cost nothing: by load alone."""
        home = self._home(adapter)
        placed = [w for w in candidates if w in home]
        if placed or adapter is None or not self.spec.adapter_load_s:
            return self._p2c(placed or candidates)
        costs = {w: self._load_cost(w) for w in candidates}
        least = min(costs.values())
        return self._p2c([w for w, cost in costs.items() if cost <= least * (1 + 1e-9)])

    def _load_cost(self, worker: Worker) -> float:
        mean = worker.service_s if worker.service_s is not None else self.service_s
        cost = 1.0 / mean if mean else worker.spec.weight
        return cost * 2 if self._evicts_needed(worker) else cost

    def _evicts_needed(self, worker: Worker) -> bool:
        """Would a load on `worker` push out (its LRU) a needed adapter: one placed
        there and warm on no other worker in service (it would be loaded again)?"""
        if not worker.warm or len(worker.warm) < worker.warm_size:
            return False
        oldest = next(iter(worker.warm))
        if worker not in self._home(oldest):
            return False
        return not any(w is not worker and w.in_service and oldest in w.warm for w in self.workers)

    def _saturated(self) -> bool:
        """As many waiting as slots in service: a slot held free is soon taken."""
        return len(self.queue) >= self.slots_in_service()

    def _idle_s(self) -> float:
        """The pool's recent time between successes: how long a slot may idle to keep
        a needed adapter (0 before any was timed: none idles)."""
        recent = self._recent_successes(self.clock())
        if len(recent) < 2:
            return 0.0
        return (recent[-1] - recent[0]) / (len(recent) - 1)

    def _replan(self, now: float) -> None:
        if now < self._planned_at + REPLAN_S:
            return
        self._planned_at = now
        if not self.spec.placement:
            self.placed = {}
            return
        workers = [w for w in self.workers if w.in_service]
        index = {w: i for i, w in enumerate(workers)}
        holders = [
            Holder(w.spec.max_concurrency * w.spec.weight, w.warm_size, w.warm) for w in workers
        ]
        previous = {
            a: frozenset(index[w] for w in ws if w in index) for a, ws in self.placed.items()
        }
        shares = self.popularity.shares()
        at = plan(shares, holders, spare=PLACEMENT_SPARE, previous=previous)
        self.placed = {a: frozenset(workers[i] for i in where) for a, where in at.items()}

    def _allowance(self, ticket: Ticket, now: float) -> float:
        """How much longer affinity may hold `ticket` back (the stated bound)."""
        if ticket.overtaken >= self._overtakes_max():
            return 0.0
        if ticket.passed_at is None or ticket.wake_at is None:
            return self._bound_s()
        return ticket.wake_at - now

    def _bound_s(self) -> float:
        """adapter_load_s x the waiters per slot (at least 1), at most
        affinity_wait_max_s: the longer the queue, the more a saved load is worth
        against one request's wait."""
        spec = self.spec
        most = spec.affinity_wait_max_s
        most = 4 * spec.adapter_load_s if most is None else most
        slots = self.slots_in_service() or 1
        return min(most, spec.adapter_load_s * max(1.0, len(self.queue) / slots))

    def _overtakes_max(self) -> int:
        """affinity_overtakes, or OVERTAKES_PER_SLOT per slot in service: about as many
        service times of delay beyond its turn, whatever the pool's size."""
        if self.spec.affinity_overtakes is not None:
            return self.spec.affinity_overtakes
        return OVERTAKES_PER_SLOT * max(1, self.slots_in_service())

    def _overtaken_by_another_team(self, ticket: Ticket, now: float) -> None:
        """Its team's fair share is at stake: its time allowance runs from now if it
        did not yet, and for at most adapter_load_s (what one load would cost)."""
        if ticket.passed_at is None:
            ticket.passed_at = now
        end = ticket.passed_at + min(self._bound_s(), self.spec.adapter_load_s)
        ticket.wake_at = end if ticket.wake_at is None else min(ticket.wake_at, end)

    def _held_back(self, ticket: Ticket, now: float, *, head: bool) -> None:
        """Affinity holds `ticket` back. Its time allowance starts the first time that
        happens once its turn has come: at the head, or anywhere while the pool is not
        saturated (every waiter would be served within a round). Before that only the
        overtakes count: a clock started there would run out during the ordinary wait
        for its turn, and force a load that saves nobody time."""
        if ticket.passed_at is None and (head or not self._saturated()):
            ticket.passed_at = now
            ticket.wake_at = now + self._bound_s()

    def _warm_wait(
        self, ticket: Ticket, deferred: Counter[Worker], now: float
    ) -> tuple[float, Worker | None]:
        """The busy worker expected to free a slot for `ticket` first, and when: one
        warm for its adapter, or one it is placed on if it is warm nowhere."""
        home = self._home(ticket.adapter)
        if any(w.is_warm(ticket.adapter) for w in self.workers):
            home = frozenset()
        best: tuple[float, Worker | None] = (math.inf, None)
        for worker in self.workers:
            if worker.free_slots or not worker.in_service or worker in ticket.exclude:
                continue
            if worker.is_warm(ticket.adapter) or worker in home:
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
        if ticket.adapter is not None:
            self.popularity.add(ticket.adapter, now)
        ticket.worker, ticket.granted_at, ticket.wake_at = worker, now, None
        ticket.recheck_at = None
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
        self,
        *,
        adapter: str | None,
        on_queued: Callable[[], None] | None = None,
        claim: Claim = NO_CLAIM,
    ) -> Iterator[Attempt]:
        """One client request's stay in this pool (counted for the retry budget).
        `on_queued` is called when a try has to wait for a slot (the front then
        watches for the client going away, which it need not do otherwise); `claim`
        says whose share its tries use (team, weight, priority, steps, deadline)."""
        attempt = Attempt(self, adapter, on_queued, claim)
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
        self,
        pool: Pool,
        adapter: str | None,
        on_queued: Callable[[], None] | None = None,
        claim: Claim = NO_CLAIM,
    ) -> None:
        self.pool = pool
        self.adapter = adapter
        self.on_queued = on_queued
        self.claim = claim
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

        claim = self.claim
        ticket = Ticket(
            self.adapter,
            notify,
            exclude=tuple(self.tried),
            retry=bool(self.tried),
            team=claim.team,
            weight=claim.weight,
            priority=claim.priority,
            steps=claim.steps,
            deadline_at=claim.deadline_at,
        )
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
        for when in (ticket.wake_at, ticket.recheck_at):
            if when is not None and when > now:
                wake = min(wake, when)
        latest = self.pool.latest_start(ticket)
        if latest is not None:
            wake = max(now, min(wake, latest))
        await asyncio.wait([done], timeout=wake - now)
        if not done.done():
            self.pool.expire()  # its latest start may have passed: 503, out of the queue
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
