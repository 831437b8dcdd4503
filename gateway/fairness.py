"""The order a pool serves its waiters in: fair shares of GPU time between teams.

`FairQueue` is the pool's queue (sans-IO, the same small surface as the deque it
replaced: append, appendleft, remove, popleft, iteration in service order, len, in).
`gateway.balancer.Pool` walks it in service order and grants slots by its own rules.

Teams. A waiter belongs to a team (its API key's `team`, else the key's own name;
"default" on a gateway without keys) and carries its team's `weight`. Costs are
GPU-seconds, strictly slot-seconds: the time a try holds one worker slot. A waiter's
cost is estimated as `steps` x the seconds per step this pool has observed, charged to
its team when it is granted a slot, and corrected by the time the try actually held
the slot when it ends (`finished`).

Order: start-time fair queuing (Goyal et al., SFQ) across teams, FIFO within a team.
Each team has a virtual time, the GPU-seconds charged to it divided by its weight;
the team with the smallest virtual time is served next. The pool's virtual time is
that of the latest grant (SFQ's "start tag of the one in service"), or of a waiting
team if one is behind it. A team that joins the queue is brought up to that, less the
pool's `share_credit_s`: a team that used less than its share (or was idle) may run
ahead of the others by at most that many GPU-seconds per unit of weight, however long
it was away. That credit lets a light team's Poisson bursts through at once instead
of at 1/n of the slots (bench/fairness.py: B's p99 during A's burst is 3x its p99
alone without credit, about 1.3x with 60 s); 0 is strict SFQ. Either way a light team
arriving during another's burst is served at the next free slot, not after the burst.

Bounds. With every team backlogged, each team's GPU-seconds track its weight within
one request's cost per team (SFQ's bound) plus the credit it brought when it joined.
A team alone takes every free slot (work-conserving: the order never leaves a slot
idle, it only decides who gets it). Before the pool has timed a step, a grant is
charged nothing until its try ends, then all it took: a guessed cost would stick to
the teams that joined while it was believed.

Priorities. Interactive waiters come before every batch waiter. Aging: a batch waiter
that has waited `batch_aging_s` (a pool setting) is served as interactive from then
on, in its team's FIFO by arrival, so it waits at most `batch_aging_s` plus its
team's fair turn among the interactive: batch never starves.

Retries (`appendleft`) go before all of that, as they did in the FIFO: they came first.

Affinity. The balancer may grant a waiter behind (within its look-ahead) before one
ahead in this order, to save an adapter load. Both bounds still hold, with "fair
turn" for "FIFO turn": a waiter is overtaken at most `affinity_overtakes` times, and
held back for at most its time allowance once its turn has come or another team went
first (balancer.py: `adapter_load_s` x waiters per slot, at most `affinity_wait_max_s`;
at most `adapter_load_s` against another team), so its wait beyond its fair turn is
bounded by those; and since the charge follows the grant, a team that went ahead
through affinity is charged for it and falls back by as much: shares drift from the
weights by at most the work of those grants, and that drift is repaid, not lost.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

DEFAULT_TEAM = "default"  # every request on a gateway without API keys
Priority = Literal["interactive", "batch"]
UNKNOWN_STEP_S = 1.0  # a step's cost before the pool has timed one: a unit, for order
_EWMA = 0.2  # weight of the newest observation in the seconds-per-step estimate


class Waiter(Protocol):
    """What the queue reads of a waiting try (gateway.balancer.Ticket's fields)."""

    @property
    def team(self) -> str: ...
    @property
    def weight(self) -> float: ...
    @property
    def priority(self) -> Priority: ...
    @property
    def steps(self) -> int: ...
    @property
    def queued_at(self) -> float: ...
    @property
    def worker(self) -> object | None: ...


W = TypeVar("W", bound=Waiter)


@dataclass(eq=False)
class _Team(Generic[W]):
    vtime: float = 0.0  # GPU-seconds charged / weight
    interactive: deque[W] = field(default_factory=deque)
    batch: deque[W] = field(default_factory=deque)

    def waiting(self) -> bool:
        return bool(self.interactive or self.batch)


class FairQueue(Generic[W]):
    """A pool's waiters, iterated in the order they are to be served."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        batch_aging_s: Callable[[], float],
        credit_s: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.clock = clock
        self.batch_aging_s = batch_aging_s  # read at each use: a reload changes it
        self.credit_s = credit_s
        self.step_s: float | None = None  # observed seconds per step; None: none timed yet
        self._front: deque[W] = deque()  # retries
        self._teams: dict[str, _Team[W]] = {}
        self._members: set[W] = set()
        self._floor = 0.0  # the virtual time of the latest grant
        self._leaving: list[W] = []  # removed: charged once they are seen granted
        self._charged: dict[W, float] = {}  # granted and running: the cost charged
        # The order, kept until something changes it (a waiter in or out, a charge, a
        # batch waiter aging): the pool walks it several times per event.
        self._order: list[W] | None = None
        self._order_until = math.inf  # when the next batch waiter ages
        self._aging_s = 0.0  # the batch_aging_s it was made with (a reload may change it)

    # -- the deque's surface --------------------------------------------------------

    def append(self, waiter: W) -> None:
        self._settle()
        team = self._team(waiter.team)
        if not team.waiting():  # (re)joining: idle time is worth share_credit_s at most
            team.vtime = max(team.vtime, self._virtual_now() - self.credit_s())
        (team.batch if waiter.priority == "batch" else team.interactive).append(waiter)
        self._members.add(waiter)
        self._order = None

    def appendleft(self, waiter: W) -> None:
        self._settle()
        self._front.appendleft(waiter)
        self._members.add(waiter)
        self._order = None

    def remove(self, waiter: W) -> None:
        """Out of the queue: granted a slot (charged to its team, seen at the next
        call) or gone (withdrawn, failed: nothing charged). ValueError if absent."""
        if waiter not in self._members:
            raise ValueError("not in the queue")
        self._members.discard(waiter)
        if waiter in self._front:
            self._front.remove(waiter)
        else:
            team = self._teams[waiter.team]
            (team.batch if waiter in team.batch else team.interactive).remove(waiter)
        self._leaving.append(waiter)
        self._order = None

    def popleft(self) -> W:
        order = self.order()
        if not order:
            raise IndexError("pop from an empty queue")
        self.remove(order[0])
        return order[0]

    def __iter__(self) -> Iterator[W]:
        return iter(self.order())

    def __len__(self) -> int:
        return len(self._members)

    def __bool__(self) -> bool:
        return bool(self._members)

    def __contains__(self, waiter: object) -> bool:
        return waiter in self._members

    # -- costs ----------------------------------------------------------------------

    def estimate(self, waiter: W) -> float:
        """Its expected slot-seconds: steps x the observed seconds per step (a unit
        per step before any was timed, which orders as well)."""
        return waiter.steps * (UNKNOWN_STEP_S if self.step_s is None else self.step_s)

    def timed_estimate(self, waiter: W) -> float:
        """The estimate in seconds, for deadlines: 0 before any step was timed."""
        return 0.0 if self.step_s is None else waiter.steps * self.step_s

    def finished(self, waiter: W, took_s: float, *, ok: bool) -> None:
        """A granted try ended after holding its slot `took_s`: its team's charge
        becomes that; a success teaches the seconds per step."""
        self._settle()
        charged = self._charged.pop(waiter, None)
        if charged is None:
            return
        self._team(waiter.team).vtime += (took_s - charged) / waiter.weight
        self._order = None
        if ok and waiter.steps > 0:
            per_step = took_s / waiter.steps
            self.step_s = (
                per_step if self.step_s is None else self.step_s + _EWMA * (per_step - self.step_s)
            )

    def work_ahead(self, waiter: W) -> float:
        """Estimated slot-seconds of the waiters served before `waiter`."""
        total = 0.0
        for other in self.order():
            if other is waiter:
                return total
            total += self.estimate(other)
        return total

    def running_estimates(self) -> Iterable[tuple[W, float]]:
        """Granted tries still running, with the cost charged for each."""
        self._settle()
        return self._charged.items()

    # -- the order ------------------------------------------------------------------

    def order(self) -> list[W]:
        """Retries; then interactive and aged batch waiters; then the other batch
        waiters: each group merged across teams by virtual time, FIFO within a team."""
        self._settle()
        now, aging_s = self.clock(), self.batch_aging_s()
        if self._order is not None and now < self._order_until and aging_s == self._aging_s:
            return self._order
        aged = now - aging_s
        self._aging_s = aging_s
        self._order_until = math.inf
        first: list[tuple[str, Sequence[W]]] = []
        later: list[tuple[str, Sequence[W]]] = []
        for name, team in self._teams.items():
            if not team.waiting():
                continue
            ripe = 0
            while ripe < len(team.batch) and team.batch[ripe].queued_at <= aged:
                ripe += 1
            if ripe < len(team.batch):
                ages_at = team.batch[ripe].queued_at + aging_s
                self._order_until = min(self._order_until, ages_at)
            ahead = list(team.interactive)
            if ripe:
                ahead = sorted(ahead + list(team.batch)[:ripe], key=_arrival)
                later.append((name, list(team.batch)[ripe:]))
            else:
                later.append((name, team.batch))
            first.append((name, ahead))
        vtimes = {name: team.vtime for name, team in self._teams.items()}
        order = [*self._front, *self._merge(first, vtimes), *self._merge(later, vtimes)]
        self._order = order
        return order

    def _merge(
        self, streams: Sequence[tuple[str, Sequence[W]]], vtimes: dict[str, float]
    ) -> list[W]:
        """SFQ on paper: the team of the smallest virtual time serves its next waiter,
        whose estimated cost moves that team on; ties go to the earlier arrival."""
        live = [(name, stream) for name, stream in streams if stream]
        if len(live) == 1:  # one team waiting (the common case): its order as it is
            name, stream = live[0]
            vtime = vtimes[name]
            for waiter in stream:
                vtime += self.estimate(waiter) / waiter.weight
            vtimes[name] = vtime
            return list(stream)
        heap = [
            (vtimes[name], stream[0].queued_at, i, 0)
            for i, (name, stream) in enumerate(streams)
            if stream
        ]
        heapq.heapify(heap)
        out: list[W] = []
        while heap:
            vtime, _, i, k = heapq.heappop(heap)
            name, stream = streams[i]
            waiter = stream[k]
            out.append(waiter)
            vtime += self.estimate(waiter) / waiter.weight
            vtimes[name] = vtime
            if k + 1 < len(stream):
                heapq.heappush(heap, (vtime, stream[k + 1].queued_at, i, k + 1))
        return out

    # -- bookkeeping ----------------------------------------------------------------

    def _team(self, name: str) -> _Team[W]:
        team = self._teams.get(name)
        if team is None:  # team names come from the registry: a bounded set
            team = self._teams[name] = _Team(vtime=self._virtual_now() - self.credit_s())
        return team

    def _virtual_now(self) -> float:
        """The latest grant's virtual time, but never past a team still waiting (an
        estimate that came out too high must not put a newcomer behind everyone)."""
        waiting = [team.vtime for team in self._teams.values() if team.waiting()]
        return min([self._floor, *waiting])

    def _settle(self) -> None:
        """Charge the waiters that left the queue for a slot. The Pool removes a
        waiter, then gives it its worker: so the charge waits for the next call."""
        if not self._leaving:
            return
        for waiter in self._leaving:
            if waiter.worker is None:
                continue  # withdrawn or failed: it cost nothing
            team = self._team(waiter.team)
            self._floor = max(self._floor, team.vtime)
            cost = self.timed_estimate(waiter)  # before any timing: all of it at the end
            team.vtime += cost / waiter.weight
            self._charged[waiter] = cost
            self._order = None
        self._leaving.clear()


def _arrival(waiter: Waiter) -> float:
    return waiter.queued_at


@dataclass(frozen=True, slots=True)
class Claim:
    """Who a request's tries are for, for the fair order: copied onto each Ticket."""

    team: str = DEFAULT_TEAM
    weight: float = 1.0
    priority: Priority = "interactive"
    steps: int = 1
    deadline_at: float | None = None  # on the pool's clock


NO_CLAIM = Claim()  # the default team, interactive, one step, no deadline
