"""Adapter placement: on which workers each adapter should be warm.

Plain data and functions, sans-IO: the caller passes the time and the workers as
`Holder`s; nothing here reads a clock or knows a `Pool`. gateway/balancer.py asks for
a plan every few seconds and routes by it; bench/balance.py measures it.

Popularity. Each granted request counts once, decayed with a half-life: an adapter's
share is its decayed count over all of them (its recent share of the pool's GPU time
when requests are alike; a count, not a measured time, so that one slow worker does
not make its adapters look popular). Shares are ratios, so the decay is kept as a
growing scale rather than applied to every count.

The plan. The pool can keep sum(memory - spare) adapters warm at once. Those places
go by highest averages: an adapter's n-th copy bids share / n, at most one copy per
worker, and its first copy bids FIRST (10) x share: an adapter gets a second copy
before another gets its first only if it is over 20 times as popular, since a miss on
any adapter costs the same load. So the tail is covered first and the hot adapters
are copied in proportion to their shares. A copy
the last plan had bids STICK times more, so that noise in the counts does not move
adapters about. Copies are laid on workers, most copies first, each on the worker
whose capacity is least covered by the shares placed on it so far (traffic follows
capacity), a worker that already holds the adapter or had it in the last plan
counting as half as covered (moving an adapter costs a load). `spare` places per
worker stay unplanned: the unplaced adapters load there without evicting a placed one.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

_MAX_EXPONENT = 40.0  # rescale the counts before e^x grows past float comfort
_FORGET = 1e-6  # a share below this, at a rescale, is forgotten


@dataclass
class Popularity:
    """Decayed request counts per adapter."""

    half_life_s: float
    counts: dict[str, float] = field(default_factory=dict)
    origin: float = 0.0  # counts are in units of e^((t - origin) / tau) at time t

    @property
    def tau(self) -> float:
        return self.half_life_s / math.log(2)

    def add(self, adapter: str, now: float, amount: float = 1.0) -> None:
        exponent = (now - self.origin) / self.tau
        if exponent > _MAX_EXPONENT:
            self._rescale(now)
            exponent = 0.0
        self.counts[adapter] = self.counts.get(adapter, 0.0) + amount * math.exp(exponent)

    def shares(self) -> dict[str, float]:
        total = sum(self.counts.values())
        if total <= 0:
            return {}
        return {adapter: count / total for adapter, count in self.counts.items()}

    def retune(self, half_life_s: float, now: float) -> None:
        """A new half-life from now on; what was counted keeps its weight."""
        self._rescale(now)
        self.half_life_s = half_life_s

    def _rescale(self, now: float) -> None:
        factor = math.exp(-(now - self.origin) / self.tau)
        scaled = {a: c * factor for a, c in self.counts.items()}
        total = sum(scaled.values())
        self.counts = {a: c for a, c in scaled.items() if c > _FORGET * total}
        self.origin = now


@dataclass(frozen=True)
class Holder:
    """A worker as the plan sees it."""

    capacity: float  # its share of the pool's work: slots x weight
    memory: int  # adapters it keeps warm at once
    warm: Collection[str] = ()  # those it holds now


Plan = Mapping[str, frozenset[int]]  # adapter -> indexes of the holders it is placed on


def copies(
    shares: Mapping[str, float], places: int, most: int, had: Mapping[str, int] | None = None
) -> dict[str, int]:
    """How many workers each adapter should be warm on: `places` in all, at most `most`
    each, by highest averages: an adapter's n-th copy bids share / n, its first one
    FIRST x share (cover many adapters once before copying the hot ones), and a copy
    the last plan had bids STICK times more (noise in the counts moves nothing)."""
    had = had or {}

    def bid(adapter: str, n: int) -> float:
        weight = FIRST if n == 1 else 1.0 / n
        return shares[adapter] * weight * (STICK if n <= had.get(adapter, 0) else 1.0)

    bids = [(-bid(a, 1), a, 1) for a, share in shares.items() if share > 0]
    heapq.heapify(bids)
    counts: dict[str, int] = {}
    while bids and places > 0:
        _, adapter, n = heapq.heappop(bids)
        counts[adapter] = n
        places -= 1
        if n < most:
            heapq.heappush(bids, (-bid(adapter, n + 1), adapter, n + 1))
    return counts


FIRST = 10.0
STICK = 1.5
STAY = 0.5  # a worker the adapter is on (warm, or placed last time) counts half as full


def plan(
    shares: Mapping[str, float],
    holders: Sequence[Holder],
    *,
    spare: int,
    previous: Plan | None = None,
) -> Plan:
    """Which holders each adapter should be warm on (see the module's docstring)."""
    previous = previous or {}
    if not holders or sum(h.capacity for h in holders) <= 0:
        return {}
    room = [max(0, h.memory - spare) if h.capacity > 0 else 0 for h in holders]
    wanted = copies(shares, sum(room), len(holders), {a: len(at) for a, at in previous.items()})
    covered = [0.0] * len(holders)  # placed share per unit of capacity
    placed: dict[str, frozenset[int]] = {}
    for adapter in sorted(wanted, key=lambda a: (-wanted[a], -shares[a], a)):
        part = shares[adapter] / wanted[adapter]
        there = {i for i in previous.get(adapter, ()) if i < len(holders)}
        there |= {i for i, h in enumerate(holders) if adapter in h.warm}
        chosen: list[int] = []
        for _ in range(wanted[adapter]):
            free = [i for i in range(len(holders)) if room[i] > 0 and i not in chosen]
            if not free:
                break
            levels = {
                i: (covered[i] + part / holders[i].capacity) * (STAY if i in there else 1.0)
                for i in free
            }
            chosen.append(min(free, key=lambda i: (levels[i], i)))
        if chosen:
            capacity = sum(holders[i].capacity for i in chosen)
            for i in chosen:
                room[i] -= 1
                covered[i] += shares[adapter] / capacity  # its traffic splits by capacity
            placed[adapter] = frozenset(chosen)
    return placed
