"""Fair sharing of one GPU pool between teams, and deadlines, in a discrete-event
simulation of the real `gateway.balancer.Pool` (issue 15).

    python -m bench.fairness [--seeds 5] [--duration 300]

The pool model is bench/balance.py's (4 workers, 1+2+2+4 slots, speeds 1/1/1.5/2,
50 Zipf adapters, 8 held per worker, 0.3 s to load one; the pool configured as
"this balancer"). A request of `steps` steps takes steps/30 x lognormal(mean 2 s)
at speed 1, so capacity is 7 requests/s of 30 steps.

Burst: team A sends 400 requests of 50 steps at t=0; teams B (30 steps) and C (4..50
steps, mean 27) send Poisson traffic at 30% of the capacity each for `duration` s.
Policies: today's FIFO (every request one team), fair 1:1:1, fair 2:1:1, and B and C
alone (no burst). Per team p50/p99 latency; B's and C's p99 over the requests that
arrive while A's burst still waits; each team's share of the slot-seconds used while
all three teams have requests waiting; requests finished per second over the run.
Saturated: the same, but B and C send 400 each at t=0 too, so all three are
backlogged for minutes: the shares there against the weights.

Deadline: one team at 2x the capacity for `duration` s, every request with a 10 s
deadline: today's FIFO (deadlines unknown to it; max_queue 100 and queue_timeout_s
30 s, the pool defaults) against the fair queue with deadlines. Goodput: requests
done within their deadline per second; lateness: how far past its deadline an
admitted request finished, against its own service time.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from bench.balance import (
    ADAPTERS,
    BALANCER,
    CAPACITY,
    LOAD_S,
    MEAN_S,
    SIGMA,
    ZIPF_S,
    Job,
    Sim,
    balancer_registry,
    gpus,
    waker,
)
from gateway.balancer import Balancer, Ticket, Worker
from gateway.errors import Overloaded

BURST = 400
SHARE_OF_CAPACITY = 0.3  # B's and C's each
BASE_STEPS = 30  # the steps of a MEAN_S request
DEADLINE_S = 10.0
OVERLOAD = 2.0
TEAMS = ("A", "B", "C")


@dataclass
class TeamJob(Job):
    team: str = ""
    steps: int = BASE_STEPS
    deadline: float | None = None  # absolute, virtual s
    refused: bool = False  # 503 at once, or left the queue
    service_s: float = math.nan


def _work(rng: random.Random, steps: int) -> float:
    mu = math.log(MEAN_S) - SIGMA**2 / 2
    return steps / BASE_STEPS * rng.lognormvariate(mu, SIGMA)


def _adapter(rng: random.Random) -> str:
    weights = [1 / (k + 1) ** ZIPF_S for k in range(ADAPTERS)]
    return f"lora-{rng.choices(range(ADAPTERS), weights)[0]}"


def _steps_c(rng: random.Random) -> int:
    return rng.randint(4, 50)


def poisson(
    team: str, rate: float, until: float, rng: random.Random, steps: int | None
) -> list[TeamJob]:
    jobs, now = [], 0.0
    while (now := now + rng.expovariate(rate)) < until:
        n = steps if steps is not None else _steps_c(rng)
        jobs.append(TeamJob(now, _adapter(rng), _work(rng, n), team=team, steps=n))
    return jobs


def burst(team: str, count: int, rng: random.Random, steps: int | None) -> list[TeamJob]:
    jobs = []
    for k in range(count):
        n = steps if steps is not None else _steps_c(rng)
        jobs.append(TeamJob(k * 1e-6, _adapter(rng), _work(rng, n), team=team, steps=n))
    return jobs


def burst_workload(
    duration_s: float, seed: int, *, a: bool = True, count: int = BURST
) -> list[TeamJob]:
    rng = random.Random(seed)
    rate_b = SHARE_OF_CAPACITY * CAPACITY  # 30-step requests: one capacity unit each
    rate_c = SHARE_OF_CAPACITY * CAPACITY * BASE_STEPS / 27  # mean 27 steps
    jobs = burst("A", count, rng, 50) if a else []
    jobs += poisson("B", rate_b, duration_s, rng, BASE_STEPS)
    jobs += poisson("C", rate_c, duration_s, rng, None)
    return sorted(jobs, key=lambda j: j.arrived)


def saturated_workload(seed: int, count: int = BURST) -> list[TeamJob]:
    rng = random.Random(seed)
    jobs = burst("A", count, rng, 50) + burst("B", count, rng, BASE_STEPS)
    return sorted(jobs + burst("C", count, rng, None), key=lambda j: j.arrived)


def deadline_workload(duration_s: float, seed: int) -> list[TeamJob]:
    rng = random.Random(seed)
    jobs = poisson("A", OVERLOAD * CAPACITY, duration_s, rng, BASE_STEPS)
    for job in jobs:
        job.deadline = job.arrived + DEADLINE_S
    return jobs


# -- driving the real Pool ------------------------------------------------------------


@dataclass
class Run:
    jobs: list[TeamJob]
    loads: int
    # Slot-seconds each team held while every team had a request waiting.
    backlogged_s: dict[str, float] = field(default_factory=dict)
    drained_at: dict[str, float] = field(default_factory=dict)  # a team's last grant


class Tracked(Sim):
    """The event heap, with a look at the state before each event."""

    def __init__(self, run: Run, waiting: Counter[str], running: Counter[str]) -> None:
        super().__init__()
        self.record, self.waiting, self.running = run, waiting, running
        self.teams: tuple[str, ...] = ()

    def run(self) -> None:
        while self._events:
            when, _, action = heapq.heappop(self._events)
            if self.teams and all(self.waiting[t] for t in self.teams):
                held = self.record.backlogged_s
                for team in self.teams:
                    held[team] = held.get(team, 0.0) + self.running[team] * (when - self.now)
            self.now = when
            action()


def simulate(
    jobs: Sequence[TeamJob],
    seed: int,
    *,
    weights: Mapping[str, float] | None,
    deadlines: bool = False,
    queue_limits: bool = False,
    pool_options: Mapping[str, object] | None = None,
) -> Run:
    """`weights` None: today's FIFO (one team). `deadlines`: tickets carry them.
    `queue_limits`: the pool defaults (max_queue 100, queue_timeout_s 30) apply, as
    the gateway's Attempt applies them; otherwise the queue is unbounded."""
    registry = balancer_registry(BALANCER)
    update = dict(pool_options or {})
    if queue_limits:
        update.update(max_queue=100, queue_timeout_s=30)
    spec = registry.pools["gpu"].model_copy(update=update)
    registry = registry.model_copy(update={"pools": {"gpu": spec}})
    waiting: Counter[str] = Counter()
    running: Counter[str] = Counter()
    record = Run(list(jobs), 0)
    sim = Tracked(record, waiting, running)
    sim.teams = tuple(sorted({j.team for j in jobs})) if len({j.team for j in jobs}) > 1 else ()
    workers = gpus(LOAD_S)
    pool = Balancer(registry, clock=lambda: sim.now, rng=random.Random(seed)).pool("gpu")
    gpu_of = dict(zip(pool.workers, workers, strict=True))
    job_of: dict[Ticket, TeamJob] = {}
    wake_later = waker(sim)

    def notified(ticket: Ticket) -> None:
        job = job_of[ticket]
        waiting[job.team] -= 1
        if ticket.error is not None:  # left the queue at its deadline
            job.refused = True
            return
        assert isinstance(ticket.worker, Worker)
        gpu = gpu_of[ticket.worker]
        job.started = sim.now
        job.service_s = gpu.duration(job)
        running[job.team] += 1
        record.drained_at[job.team] = sim.now
        sim.at(sim.now + job.service_s, lambda: finish(ticket, job))

    def finish(ticket: Ticket, job: TeamJob) -> None:
        job.done = sim.now
        running[job.team] -= 1
        pool.release(ticket, "ok")
        wake_later(pool)

    def arrive(job: TeamJob) -> None:
        fair = weights is not None
        ticket = Ticket(
            job.adapter,
            notified,
            team=job.team if fair else "default",
            weight=weights.get(job.team, 1.0) if weights is not None else 1.0,
            steps=job.steps,
            deadline_at=job.deadline if deadlines else None,
        )
        job_of[ticket] = job
        waiting[job.team] += 1
        try:
            pool.submit(ticket)
        except Overloaded:
            waiting[job.team] -= 1
            job.refused = True
            return
        if queue_limits and ticket.worker is None:
            sim.at(sim.now + pool.spec.queue_timeout_s, lambda: give_up(ticket, job))
        wake_later(pool)

    def give_up(ticket: Ticket, job: TeamJob) -> None:
        if ticket in pool.queue:  # the Attempt's queue_timeout_s: 503
            pool.withdraw(ticket)
            waiting[job.team] -= 1
            job.refused = True

    for job in jobs:
        sim.at(job.arrived, lambda job=job: arrive(job))  # type: ignore[misc]
    sim.run()
    record.loads = sum(g.loads for g in workers)
    return record


# -- measuring ------------------------------------------------------------------------


def _quantiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (math.nan, math.nan)
    cuts = statistics.quantiles(values, n=100)
    return cuts[49], cuts[98]


@dataclass
class BurstResult:
    policy: str
    p50: dict[str, float]
    p99: dict[str, float]
    p99_during: dict[str, float]  # B, C: arrived while A's burst waited
    shares: dict[str, float]  # of slot-seconds while all three waited
    throughput: float  # requests finished per second, over the run


def measure_burst(policy: str, runs: Sequence[Run], windows: Sequence[float]) -> BurstResult:
    """`windows`: per run, when the burst's last request was granted (the window for
    "during the burst", the same for a policy and its no-burst baseline)."""
    p50, p99, during, held = {}, {}, {}, Counter[str]()
    teams = sorted({j.team for run in runs for j in run.jobs})
    for team in teams:
        done = [j.done - j.arrived for run in runs for j in run.jobs if j.team == team]
        p50[team], p99[team] = _quantiles(done)
        in_burst = [
            j.done - j.arrived
            for run, end in zip(runs, windows, strict=True)
            for j in run.jobs
            if j.team == team and j.arrived < end
        ]
        during[team] = _quantiles(in_burst)[1]
    for run in runs:
        held.update(run.backlogged_s)
    total = sum(held.values())
    shares = {team: held[team] / total for team in teams} if total else {}
    finished = sum(1 for run in runs for j in run.jobs if not math.isnan(j.done))
    span = sum(max(j.done for j in run.jobs if not math.isnan(j.done)) for run in runs)
    return BurstResult(policy, p50, p99, during, shares, finished / span)


@dataclass
class DeadlineResult:
    policy: str
    goodput: float  # done within the deadline, per second
    refused: float  # share of requests refused or expired (503)
    late_max_s: float  # the furthest past its deadline an admitted request finished
    late_over_service: float  # the same, over that request's own service time (max)
    p99: float


def measure_deadline(policy: str, runs: Sequence[Run], duration_s: float) -> DeadlineResult:
    jobs = [j for run in runs for j in run.jobs]
    started = [j for j in jobs if not math.isnan(j.done)]
    assert all(j.deadline is not None for j in jobs)
    good = sum(1 for j in started if j.done <= (j.deadline or 0))
    late = [j.done - (j.deadline or 0) for j in started]
    ratio = [max(0.0, j.done - (j.deadline or 0)) / j.service_s for j in started]
    return DeadlineResult(
        policy,
        goodput=good / (duration_s * len(runs)),
        refused=sum(j.refused for j in jobs) / len(jobs),
        late_max_s=max(late, default=0.0),
        late_over_service=max(ratio, default=0.0),
        p99=_quantiles([j.done - j.arrived for j in started])[1],
    )


# -- the report -----------------------------------------------------------------------

FIFO = "today's FIFO"
FAIR_111 = "fair 1:1:1"
FAIR_211 = "fair 2:1:1"
NO_BURST = "B and C alone (no burst)"
WEIGHTS: dict[str, dict[str, float] | None] = {
    FIFO: None,
    FAIR_111: {"A": 1, "B": 1, "C": 1},
    FAIR_211: {"A": 2, "B": 1, "C": 1},
}


@dataclass
class Report:
    burst: list[BurstResult]
    saturated: list[BurstResult]
    deadline: list[DeadlineResult]


def run_all(seeds: Sequence[int], duration_s: float, burst_size: int = BURST) -> Report:
    burst_results, saturated = [], []
    windows: dict[str, list[float]] = defaultdict(list)
    for policy, weights in WEIGHTS.items():
        runs = [
            simulate(burst_workload(duration_s, s, count=burst_size), s, weights=weights)
            for s in seeds
        ]
        windows[policy] = [run.drained_at["A"] for run in runs]
        burst_results.append(measure_burst(policy, runs, windows[policy]))
        if weights is not None:
            runs = [simulate(saturated_workload(s, burst_size), s, weights=weights) for s in seeds]
            saturated.append(measure_burst(policy, runs, [0.0] * len(runs)))
    alone = [simulate(burst_workload(duration_s, s, a=False), s, weights=None) for s in seeds]
    for policy in (FAIR_111, FAIR_211):  # the baseline over each policy's burst window
        result = measure_burst(NO_BURST, alone, windows[policy])
        result.policy = f"{NO_BURST}, {policy}'s window"
        burst_results.append(result)
    deadline = []
    for policy, weights, deadlines in (
        (FIFO, None, False),
        ("fair queue + deadlines", {"A": 1.0}, True),
    ):
        runs = [
            simulate(
                deadline_workload(duration_s, s),
                s,
                weights=weights,
                deadlines=deadlines,
                queue_limits=True,
            )
            for s in seeds
        ]
        deadline.append(measure_deadline(policy, runs, duration_s))
    return Report(burst_results, saturated, deadline)


def _f(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def tables(report: Report) -> Iterator[str]:
    yield "Burst: A sends a burst of 50-step requests at t=0; B, C Poisson at 30% of capacity each"
    yield ""
    yield (
        "| policy | A p50 / p99 s | B p50 / p99 s | C p50 / p99 s | B / C p99 during burst s "
        "| shares A/B/C while all wait | requests /s |"
    )
    yield "|---|---|---|---|---|---|---:|"
    for r in report.burst:
        cells = [f"{_f(r.p50.get(t, math.nan))} / {_f(r.p99.get(t, math.nan))}" for t in TEAMS]
        during = f"{_f(r.p99_during['B'])} / {_f(r.p99_during['C'])}"
        shares = "/".join(f"{r.shares[t]:.2f}" for t in TEAMS) if len(r.shares) == 3 else "-"
        yield f"| {r.policy} | {' | '.join(cells)} | {during} | {shares} | {r.throughput:.2f} |"
    yield ""
    yield "Saturated: A, B and C each send a burst at t=0 (50, 30, 4..50 steps)"
    yield ""
    yield "| policy | shares A/B/C while all wait | weights |"
    yield "|---|---|---|"
    for r in report.saturated:
        weights = WEIGHTS[r.policy] or {}
        total = sum(weights.values())
        expected = "/".join(f"{weights[t] / total:.2f}" for t in TEAMS)
        yield f"| {r.policy} | {'/'.join(f'{r.shares[t]:.3f}' for t in TEAMS)} | {expected} |"
    yield ""
    yield f"Deadline: {OVERLOAD:g}x capacity, every request due {DEADLINE_S:g} s after it is sent"
    yield ""
    yield (
        "| policy | goodput /s | refused (503) | latest finish past deadline s "
        "| / its service time | p99 s |"
    )
    yield "|---|---:|---:|---:|---:|---:|"
    for d in report.deadline:
        yield (
            f"| {d.policy} | {d.goodput:.2f} | {d.refused:.0%} | {d.late_max_s:.2f} "
            f"| {d.late_over_service:.2f} | {d.p99:.2f} |"
        )


def targets(report: Report) -> Iterator[str]:
    burst = {r.policy: r for r in report.burst}
    saturated = {r.policy: r for r in report.saturated}

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT MET"

    for policy in (FAIR_111, FAIR_211):
        ours, alone = burst[policy], burst[f"{NO_BURST}, {policy}'s window"]
        for team in ("B", "C"):
            ratio = ours.p99_during[team] / alone.p99_during[team]
            yield (
                f"{verdict(ratio <= 1.5)}: {policy}: {team}'s p99 during the burst / with no "
                f"burst <= 1.5: {ratio:.2f} (FIFO: "
                f"{burst[FIFO].p99_during[team] / alone.p99_during[team]:.1f})"
            )
        weights = WEIGHTS[policy] or {}
        total = sum(weights.values())
        worst = max(abs(saturated[policy].shares[t] / (weights[t] / total) - 1) for t in TEAMS)
        yield (
            f"{verdict(worst <= 0.05)}: {policy}: GPU shares while all three wait within 5% of "
            f"the weights (saturated): worst {worst:.1%} off"
        )
        fifo = burst[FIFO].throughput
        yield (
            f"{verdict(ours.throughput >= fifo)}: {policy}: throughput no lower than FIFO's: "
            f"{ours.throughput:.3f} vs {fifo:.3f} requests/s"
        )
    fifo_d, ours_d = report.deadline
    yield (
        f"{verdict(ours_d.late_over_service <= 1.0)}: deadlines: no admitted request finishes "
        f"later than one service time past its deadline: worst {ours_d.late_over_service:.2f} "
        f"service times (FIFO: {fifo_d.late_over_service:.2f})"
    )
    yield (
        f"{verdict(ours_d.goodput > fifo_d.goodput)}: deadlines: goodput above FIFO's: "
        f"{ours_d.goodput:.2f} vs {fifo_d.goodput:.2f} /s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fairness", description=__doc__)
    parser.add_argument("--seeds", type=int, default=5, help="runs per policy, seeds 1..N")
    parser.add_argument("--duration", type=float, default=300.0, help="virtual s of arrivals")
    parser.add_argument("--burst", type=int, default=BURST, help="requests in each burst")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    report = run_all(range(1, args.seeds + 1), args.duration, args.burst)
    print("\n".join(tables(report)))
    print()
    print("\n".join(targets(report)))
    print(f"\n({args.seeds} seeds x {args.duration:.0f} virtual s, ", end="")
    print(f"{time.perf_counter() - started:.1f} s of real time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
