"""Is a worker fit for traffic: passive ejection and active probes.

Passive (Envoy's consecutive-5xx outlier detection): the balancer reports every
try's outcome; `consecutive_failures` connection errors, 5xx or timeouts in a row
eject a worker for `base_ejection_s` x (times ejected), capped at `max_ejection_s`.
Never more than `max_ejection_percent` of a pool is out at once: a worker that
reaches the threshold while the cap is full stays in, marked UNKNOWN, and is probed.
A 4xx is the client's input and counts as an answer; a 429, or a 503 with
Retry-After, is "busy" and counts not; a 200 without an image counts as a failure.

Active: `gateway.prober.Prober` probes every worker that is not known good (ejected,
down, new, or failing but kept in by the cap) on its protocol's health path every
`probe_interval_s`. A failed probe takes an UNKNOWN worker out (DOWN): that is how a
pool whose workers are all dead ends with none in service, and /readyz?pool= says so.
`healthy_threshold` good probes in a row bring a worker back (an ejected one only
once its ejection time is over).

    UNKNOWN --success--> HEALTHY --N failures--> EJECTED --time + good probes--> HEALTHY
       |                    |  (cap full: UNKNOWN)                                 ^
       +--failed probe--> DOWN ---------------- good probes -----------------------+
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.registry import HealthSpec


class State(enum.Enum):
    HEALTHY = "healthy"  # in service, known good
    UNKNOWN = "unknown"  # in service, not known good: new, or failing but kept in
    EJECTED = "ejected"  # out until its ejection time is over and probes pass
    DOWN = "down"  # out: a probe failed; back after healthy_threshold good probes


@dataclass(eq=False)
class WorkerHealth:
    spec: HealthSpec
    state: State = State.UNKNOWN
    failures: int = 0  # consecutive
    ejections: int = 0  # sets the next ejection's length
    ejected_until: float = 0.0
    good_probes: int = 0  # consecutive
    next_probe_at: float = 0.0

    @property
    def in_service(self) -> bool:
        return self.state in (State.HEALTHY, State.UNKNOWN)

    @property
    def needs_probe(self) -> bool:
        return self.state is not State.HEALTHY

    def succeeded(self, now: float) -> None:
        self.failures = 0
        if self.state is State.UNKNOWN:
            self.state = State.HEALTHY
        # A worker good for a whole max ejection since its last one starts afresh.
        if self.ejections and now - self.ejected_until >= self.spec.max_ejection_s:
            self.ejections = 0

    def failed(self, now: float, *, peers: Sequence[WorkerHealth]) -> bool:
        """Count a failure; True when this one ejected the worker."""
        self.failures += 1
        if not self.in_service or self.failures < self.spec.consecutive_failures:
            return False
        if not ejection_allowed(peers, self.spec):
            self.state = State.UNKNOWN  # kept in by the cap; its probes will tell
            return False
        self.ejections += 1
        length = min(self.spec.base_ejection_s * self.ejections, self.spec.max_ejection_s)
        self.state, self.ejected_until = State.EJECTED, now + length
        self.failures = self.good_probes = 0
        self.next_probe_at = now
        return True

    def probed(self, ok: bool, now: float) -> None:
        self.next_probe_at = now + self.spec.probe_interval_s
        if not ok:
            self.good_probes = 0
            if self.state is State.UNKNOWN:
                self.state = State.DOWN
            return
        self.good_probes += 1
        if self.good_probes < self.spec.healthy_threshold:
            return
        if self.state is State.EJECTED and now < self.ejected_until:
            return
        self.state, self.failures = State.HEALTHY, 0


def ejection_allowed(peers: Sequence[WorkerHealth], spec: HealthSpec) -> bool:
    """May one more of `peers` go out? At most max_ejection_percent of them (at least
    one, as Envoy), and never the last one in service."""
    out = sum(not peer.in_service for peer in peers)
    limit = min(len(peers) - 1, max(1, len(peers) * spec.max_ejection_percent // 100))
    return out < limit
