"""Balancing policies for one pool of GPU workers, in a discrete-event simulation.

    python -m bench.balance [--duration 2000] [--seed 1]
    python -m bench.balance --placement [--duration 2000] [--jobs 2]   # issue 13

Virtual clock, no sleeping, seeded and repeatable; it runs in seconds. The scenario
(issue 3): 4 workers with 1, 2, 2 and 4 slots and speeds 1.0, 1.0, 1.5 and 2.0; a
generation takes lognormal time, mean 2.0 s at speed 1.0 (sigma 0.3 in log space),
divided by the worker's speed; 50 adapters with Zipf(1.1) popularity; each worker
holds at most 8 adapters (LRU) and loading one adds 0.3 s; Poisson arrivals at
rho = 0.5, 0.8 and 0.95 of the capacity without loads (sum of slots x speed / 2.0 s
= 7 requests/s). Every policy sees the same requests (arrival, adapter, work).

Policies:
  round-robin, random   push at arrival; each worker queues its own backlog
  least-loaded push     push to the lowest (outstanding + 1) / slots, adapter-blind
                        (Envoy's least-request, with a full scan: a strong baseline)
  central FIFO, blind   the REAL gateway.balancer.Pool with affinity off
                        (warm_adapters: 0): one queue, free slots by weighted P2C
  ideal central queue   the same, and adapter loads cost nothing: the lower bound
  this balancer         the REAL gateway.balancer.Pool with the pool defaults but
                        for warm_adapters: 8 and weight = speed (placement on)
  ..., placement off    the same with placement: false

Measured over the requests that arrive after a warm-up (a tenth of the run): p50 and
p99 latency (arrival to done), throughput, adapter loads per 1,000 requests; and the
backlog (requests not yet started) when arrivals stop: a growing one means unstable.

--placement (issue 13) prints, for seeds 1-3: the targets near saturation, each met or
not; the "max stable load" (the highest rho, in 0.01 steps, at which the requests
finished over the second half of a 4,000 s run are at least 99.5% of those that
arrived then), for the ideal queue too; the same table with 2 s loads and 4 adapters
per worker; and a popularity shift (the Zipf ranking shuffled half-way through a
rho 0.9 run): how fast the pool's view of where adapters belong follows it.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import multiprocessing
import random
import statistics
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.balancer import Balancer, Pool, Ticket, Worker
from gateway.coordination import MemoryHub
from gateway.registry import PoolSpec, Registry

SLOTS = (1, 2, 2, 4)
SPEEDS = (1.0, 1.0, 1.5, 2.0)
MEAN_S = 2.0
SIGMA = 0.3
ADAPTERS = 50
ZIPF_S = 1.1
LOADED_MAX = 8
LOAD_S = 0.3
CAPACITY = sum(s * v for s, v in zip(SLOTS, SPEEDS, strict=True)) / MEAN_S  # 7 req/s
RHOS = (0.5, 0.8, 0.95)
DEFAULT_ADAPTER_LOAD_S = PoolSpec.model_fields["adapter_load_s"].default


@dataclass
class Job:
    arrived: float
    adapter: str
    work_s: float  # service time at speed 1.0, without an adapter load
    started: float = math.nan
    done: float = math.nan
    loaded: bool = False  # its worker had to load the adapter first


def rankings(seed: int) -> tuple[list[str], list[str]]:
    """The adapters by popularity, before and after the shift of `workload`."""
    names = [f"lora-{k}" for k in range(ADAPTERS)]
    return names, random.Random(seed + 1000).sample(names, len(names))


def workload(
    rho: float, duration_s: float, seed: int, *, shift_at: float | None = None
) -> list[Job]:
    """Poisson arrivals at rho x capacity for duration_s, Zipf adapters, lognormal work.
    From `shift_at` on, the popularity ranking is shuffled (the same Zipf weights fall
    on other adapters: a seeded permutation)."""
    rng = random.Random(seed)
    names, shuffled = rankings(seed)
    weights = [1 / (k + 1) ** ZIPF_S for k in range(ADAPTERS)]
    mu = math.log(MEAN_S) - SIGMA**2 / 2  # so that the mean is MEAN_S
    jobs, now = [], 0.0
    while (now := now + rng.expovariate(rho * CAPACITY)) < duration_s:
        ranked = shuffled if shift_at is not None and now >= shift_at else names
        adapter = rng.choices(ranked, weights)[0]
        jobs.append(Job(now, adapter, rng.lognormvariate(mu, SIGMA)))
    return jobs


class Sim:
    """An event heap on a virtual clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._seq), action))

    def run(self) -> None:
        while self._events:
            self.now, _, action = heapq.heappop(self._events)
            action()


@dataclass(eq=False)
class Gpu:
    """The ground truth of one worker: its slots, speed and loaded adapters."""

    slots: int
    speed: float
    load_s: float
    loaded_max: int = LOADED_MAX
    running: int = 0
    backlog: deque[Job] = field(default_factory=deque)  # push policies queue here
    loaded: OrderedDict[str, None] = field(default_factory=OrderedDict)
    loads: int = 0

    def duration(self, job: Job) -> float:
        """Time for `job` here, loading its adapter first if it is not held."""
        cost = 0.0
        if job.adapter not in self.loaded:
            cost, self.loads, job.loaded = self.load_s, self.loads + 1, True
        self.loaded[job.adapter] = None
        self.loaded.move_to_end(job.adapter)
        while len(self.loaded) > self.loaded_max:
            self.loaded.popitem(last=False)
        return job.work_s / self.speed + cost


def gpus(load_s: float = LOAD_S, loaded_max: int = LOADED_MAX) -> list[Gpu]:
    return [Gpu(s, v, load_s, loaded_max) for s, v in zip(SLOTS, SPEEDS, strict=True)]


# -- push policies: the choice is made at arrival, each worker queues its own ------------

Chooser = Callable[[Sequence[Gpu], random.Random], Gpu]


def round_robin() -> Chooser:
    turn = itertools.count()
    return lambda workers, rng: workers[next(turn) % len(workers)]


def at_random() -> Chooser:
    return lambda workers, rng: rng.choice(workers)


def least_loaded() -> Chooser:
    def choose(workers: Sequence[Gpu], rng: random.Random) -> Gpu:
        def score(gpu: Gpu) -> float:
            return (gpu.running + len(gpu.backlog) + 1) / gpu.slots

        best = min(score(gpu) for gpu in workers)
        return rng.choice([gpu for gpu in workers if score(gpu) == best])

    return choose


def run_push(jobs: Sequence[Job], choose: Chooser, seed: int) -> list[Gpu]:
    sim, workers, rng = Sim(), gpus(), random.Random(seed)

    def start(gpu: Gpu, job: Job) -> None:
        gpu.running += 1
        job.started = sim.now
        sim.at(sim.now + gpu.duration(job), lambda: finish(gpu, job))

    def finish(gpu: Gpu, job: Job) -> None:
        job.done, gpu.running = sim.now, gpu.running - 1
        if gpu.backlog:
            start(gpu, gpu.backlog.popleft())

    def arrive(job: Job) -> None:
        gpu = choose(workers, rng)
        if gpu.running < gpu.slots:
            start(gpu, job)
        else:
            gpu.backlog.append(job)

    for job in jobs:
        sim.at(job.arrived, lambda job=job: arrive(job))  # type: ignore[misc]
    sim.run()
    return workers


# -- the real balancer, on the virtual clock ------------------------------------------


def pool_registry(*, warm_adapters: int, adapter_load_s: float, **options: object) -> Registry:
    workers = [
        {"url": f"http://gpu-{i}:8000", "max_concurrency": s, "weight": v}
        for i, (s, v) in enumerate(zip(SLOTS, SPEEDS, strict=True))
    ]
    pool = {
        "workers": workers,
        "warm_adapters": warm_adapters,
        "adapter_load_s": adapter_load_s,
        "max_queue": 100_000,  # the simulation measures the backlog instead of refusing
        "queue_timeout_s": 3600,
        **options,
    }
    return Registry.model_validate(
        {"pools": {"gpu": pool}, "adapters": [{"name": "base", "pool": "gpu"}]}
    )


PROBE_S = 10.0


@dataclass
class PoolRun:
    workers: list[Gpu]
    pool: Pool
    beyond_fifo_s: list[float]  # per request: its grant minus its turn under FIFO


def run_pool(
    jobs: Sequence[Job],
    registry: Registry,
    seed: int,
    *,
    load_s: float = LOAD_S,
    loaded_max: int = LOADED_MAX,
    probe: Callable[[Pool, float], None] | None = None,
) -> PoolRun:
    """Drive the real Pool. Each request's FIFO turn is the grant that strict FIFO
    would have given it on the same sequence of grants: the (n+1)-th after its
    arrival, n being the requests queued ahead of it then."""
    sim, workers = Sim(), gpus(load_s, loaded_max)
    pool = Balancer(registry, clock=lambda: sim.now, rng=random.Random(seed)).pool("gpu")
    gpu_of: dict[Worker, Gpu] = dict(zip(pool.workers, workers, strict=True))
    job_of: dict[Ticket, Job] = {}
    turn_of: dict[Ticket, int] = {}  # index into grants of its FIFO turn
    grants: list[float] = []
    beyond: list[float] = []
    wake_later = waker(sim)

    def granted(ticket: Ticket) -> None:
        assert ticket.worker is not None
        gpu, job = gpu_of[ticket.worker], job_of.pop(ticket)
        job.started = sim.now
        grants.append(sim.now)
        turn = turn_of.pop(ticket)
        beyond.append(sim.now - grants[turn] if turn < len(grants) else 0.0)
        sim.at(sim.now + gpu.duration(job), lambda: finish(ticket, job))

    def finish(ticket: Ticket, job: Job) -> None:
        job.done = sim.now
        pool.release(ticket, "ok")
        wake_later(pool)

    def arrive(job: Job) -> None:
        ticket = Ticket(job.adapter, granted)
        job_of[ticket], turn_of[ticket] = job, len(grants) + len(pool.queue)
        pool.submit(ticket)
        wake_later(pool)

    def look() -> None:  # `probe` sees the pool every PROBE_S while requests arrive
        assert probe is not None
        probe(pool, sim.now)
        if jobs and sim.now + PROBE_S <= jobs[-1].arrived:
            sim.at(sim.now + PROBE_S, look)

    for job in jobs:
        sim.at(job.arrived, lambda job=job: arrive(job))  # type: ignore[misc]
    if probe is not None:
        sim.at(PROBE_S, look)
    sim.run()
    return PoolRun(workers, pool, beyond)


# -- replicas: several gateway processes on the same workers (issue 12) -------------------

REPLICAS = (1, 2, 4, 8)
REPLICA_RHOS = (0.5, 0.8)
REPLICA_SEEDS = (1, 2, 3)
REDIS_HOP_S = 0.0002  # one message through Redis: a round trip on a LAN, or more


def replica_pools(replicas: int, registry: Registry, sim: Sim, seed: int) -> list[Pool]:
    """One real Pool per gateway process, on the simulation's clock."""
    return [
        Balancer(registry, clock=lambda: sim.now, rng=random.Random(seed * 100 + r)).pool("gpu")
        for r in range(replicas)
    ]


def run_uncoordinated(
    jobs: Sequence[Job], registry: Registry, seed: int, replicas: int
) -> tuple[list[Gpu], int]:
    """Today: each process's Pool believes it owns every worker's slots; arrivals go to
    the processes in turn. What a worker gets beyond its real slots waits inside it, in
    FIFO order, where no gateway can re-route it. Also returns the most that waited
    inside one worker at once."""
    sim, workers = Sim(), gpus()
    pools = replica_pools(replicas, registry, sim, seed)
    gpu_of = {w: gpu for pool in pools for w, gpu in zip(pool.workers, workers, strict=True)}
    peak = 0

    def start(pool: Pool, ticket: Ticket, job: Job) -> None:
        gpu = gpu_of[ticket.worker]  # type: ignore[index]
        gpu.running += 1
        job.started = sim.now
        sim.at(sim.now + gpu.duration(job), lambda: finish(pool, ticket, job, gpu))

    def finish(pool: Pool, ticket: Ticket, job: Job, gpu: Gpu) -> None:
        job.done, gpu.running = sim.now, gpu.running - 1
        pool.release(ticket, "ok")
        if gpu.backlog:
            start(*gpu.backlog.popleft())  # type: ignore[misc]
        wake_later(pool)

    def arrive(i: int, job: Job) -> None:
        nonlocal peak
        pool = pools[i % replicas]

        def granted(ticket: Ticket) -> None:
            nonlocal peak
            gpu = gpu_of[ticket.worker]  # type: ignore[index]
            if gpu.running < gpu.slots:
                start(pool, ticket, job)
            else:
                gpu.backlog.append((pool, ticket, job))  # type: ignore[arg-type]
                peak = max(peak, len(gpu.backlog))

        pool.submit(Ticket(job.adapter, granted))
        wake_later(pool)

    wake_later = waker(sim)
    for i, job in enumerate(jobs):
        sim.at(job.arrived, lambda i=i, job=job: arrive(i, job))  # type: ignore[misc]
    sim.run()
    return workers, peak


def run_coordinated(
    jobs: Sequence[Job], registry: Registry, seed: int, replicas: int, hop_s: float
) -> tuple[list[Gpu], int]:
    """gateway.coordination: the same Pools, one elected dispatcher (the first) serving
    every process's tries through an in-memory hub whose every message takes `hop_s`.
    Returns the workers and the most that ever waited inside one (0: never overcommitted)."""
    sim, workers = Sim(), gpus()
    pools = replica_pools(replicas, registry, sim, seed)
    hub = MemoryHub(deliver=lambda act: sim.at(sim.now + hop_s, lambda: settled(act)))
    members = [hub.join(pool, f"r{r}") for r, pool in enumerate(pools)]
    hub.elect("r0")
    leader = members[0].pool
    gpu_of = {w: gpu for pool in pools for w, gpu in zip(pool.workers, workers, strict=True)}
    peak = 0

    def settled(action: Callable[[], None]) -> None:
        action()
        wake_later(leader)

    def arrive(i: int, job: Job) -> None:
        pool = pools[i % replicas]

        def granted(ticket: Ticket) -> None:
            nonlocal peak
            gpu = gpu_of[ticket.worker]  # type: ignore[index]
            gpu.running += 1
            peak = max(peak, gpu.running - gpu.slots)
            job.started = sim.now
            sim.at(sim.now + gpu.duration(job), lambda: finish(ticket, gpu))

        def finish(ticket: Ticket, gpu: Gpu) -> None:
            job.done, gpu.running = sim.now, gpu.running - 1
            pool.release(ticket, "ok")
            wake_later(leader)

        pool.submit(Ticket(job.adapter, granted))
        wake_later(leader)

    wake_later = waker(sim)
    for i, job in enumerate(jobs):
        sim.at(job.arrived, lambda i=i, job=job: arrive(i, job))  # type: ignore[misc]
    sim.run()
    return workers, peak


def waker(sim: Sim) -> Callable[[Pool], None]:
    """`wake_later(pool)`, to call after anything changes a pool: a waiter's affinity
    allowance running out, or its latest start passing, is an event too."""
    wakeups: set[tuple[int, float]] = set()

    def wake_later(pool: Pool) -> None:
        when = pool.next_wakeup()
        if when is not None and (id(pool), when) not in wakeups:
            wakeups.add((id(pool), when))
            sim.at(when, lambda: wake(pool, when))

    def wake(pool: Pool, when: float) -> None:
        wakeups.discard((id(pool), when))
        pool.expire()
        pool.dispatch()
        wake_later(pool)

    return wake_later


@dataclass
class ReplicaRow:
    rho: float
    replicas: int
    mode: str  # "uncoordinated" | "coordinated"
    result: Result
    worker_queue_peak: int


def run_replicas(
    mode: str, rho: float, replicas: int, duration_s: float, seeds: Sequence[int], hop_s: float
) -> ReplicaRow:
    """One mode at one load and replica count, over several seeds measured as one."""
    registry = balancer_registry(BALANCER)
    jobs: list[Job] = []
    workers: list[Gpu] = []
    peak = 0
    for seed in seeds:
        more = workload(rho, duration_s, seed)
        if mode == "coordinated":
            gpus_, worst = run_coordinated(more, registry, seed, replicas, hop_s)
        else:
            gpus_, worst = run_uncoordinated(more, registry, seed, replicas)
        jobs, workers, peak = jobs + more, workers + gpus_, max(peak, worst)
    result = measure(f"{mode}, R={replicas}", rho, jobs, workers, duration_s)
    result = replace(result, throughput=result.throughput / len(seeds))
    return ReplicaRow(rho, replicas, mode, result, peak)


def replica_table(rows: Sequence[ReplicaRow]) -> Iterator[str]:
    base = {r.rho: r.result.p99_s for r in rows if r.replicas == 1 and r.mode == "uncoordinated"}
    yield "| rho | replicas | coordination | p50 s | p99 s | p99 / R=1 | worker queue peak |"
    yield "|---|---:|---|---:|---:|---:|---:|"
    for r in rows:
        res = r.result
        yield (
            f"| {r.rho} | {r.replicas} | {r.mode} | {res.p50_s:.2f} | {res.p99_s:.2f} "
            f"| {res.p99_s / base[r.rho]:.2f}x | {r.worker_queue_peak} |"
        )


def replica_targets(rows: Sequence[ReplicaRow]) -> Iterator[str]:
    def ratio(replicas: int, mode: str) -> float:
        row = next(r for r in rows if (r.rho, r.replicas, r.mode) == (0.8, replicas, mode))
        one = next(r for r in rows if (r.rho, r.replicas, r.mode) == (0.8, 1, "uncoordinated"))
        return row.result.p99_s / one.result.p99_s

    for replicas, limit in ((8, 1.10), (4, 1.08)):
        got = ratio(replicas, "coordinated")
        verdict = "met" if got <= limit else "NOT MET"
        contrast = ratio(replicas, "uncoordinated")
        yield (
            f"{verdict}: rho 0.8, R={replicas}: coordinated p99 / R=1 <= {limit}: {got:.2f} "
            f"(uncoordinated: {contrast:.2f})"
        )
    overcommitted = [r for r in rows if r.mode == "coordinated" and r.worker_queue_peak]
    yield (
        f"{'NOT MET' if overcommitted else 'met'}: coordinated rows never send a worker "
        "more than its slots (worker queue peak 0)"
    )


def replicas_main(duration_s: float, hop_s: float) -> int:
    started = time.perf_counter()
    rows = [
        run_replicas(mode, rho, replicas, duration_s, REPLICA_SEEDS, hop_s)
        for rho in REPLICA_RHOS
        for replicas in REPLICAS
        for mode in ("uncoordinated", "coordinated")
    ]
    print("\n".join(replica_table(rows)))
    print()
    print("\n".join(replica_targets(rows)))
    print(
        f"\n({duration_s:.0f} virtual s per run, seeds {REPLICA_SEEDS}, Redis hop "
        f"{hop_s * 1000:g} ms a message, {time.perf_counter() - started:.1f} s of real time)"
    )
    return 0


# -- measuring ------------------------------------------------------------------------


@dataclass
class Result:
    policy: str
    rho: float
    p50_s: float
    p99_s: float
    throughput: float  # requests finished per second, after the warm-up
    loads_per_1000: float
    backlog: int  # requests not started when arrivals stopped


def measure(
    policy: str, rho: float, jobs: Sequence[Job], workers: Sequence[Gpu], end_s: float
) -> Result:
    warm_up = end_s / 10
    latencies = sorted(j.done - j.arrived for j in jobs if j.arrived >= warm_up)
    finished = sum(warm_up <= j.done < end_s for j in jobs)
    cuts = statistics.quantiles(latencies, n=100)
    return Result(
        policy,
        rho,
        p50_s=cuts[49],
        p99_s=cuts[98],
        throughput=finished / (end_s - warm_up),
        loads_per_1000=1000 * sum(g.loads for g in workers) / len(jobs),
        backlog=sum(j.started > end_s or math.isnan(j.started) for j in jobs),
    )


PUSH = {"round robin": round_robin, "random": at_random, "least-loaded push": least_loaded}
BALANCER = "this balancer"
IDEAL = "ideal central queue"
NO_PLACEMENT = f"{BALANCER}, placement off"
POLICIES = (
    *PUSH,
    "central FIFO, blind",
    IDEAL,
    BALANCER,
    NO_PLACEMENT,
    f"{BALANCER}, adapter_load_s {LOAD_S}",
)


@dataclass(frozen=True)
class Scenario:
    """What a load costs and how many adapters a worker holds (the issue-3 values, or
    issue 13's heavier adapters)."""

    load_s: float = LOAD_S
    loaded_max: int = LOADED_MAX


ISSUE3 = Scenario()
HEAVY = Scenario(load_s=2.0, loaded_max=4)


def balancer_registry(policy: str, scenario: Scenario = ISSUE3) -> Registry:
    """The pool as the gateway would run it. "this balancer" keeps the pool defaults
    (adapter_load_s: 1 s, placement on, the affinity knobs) but for two facts of the
    scenario an operator would write down: how many adapters each worker holds, and
    that its weight is its speed."""
    if policy in ("central FIFO, blind", IDEAL):
        return pool_registry(warm_adapters=0, adapter_load_s=0)
    adapter_load_s = DEFAULT_ADAPTER_LOAD_S
    if policy == f"{BALANCER}, adapter_load_s {LOAD_S}":
        adapter_load_s = scenario.load_s
    options = {"placement": False} if policy == NO_PLACEMENT else {}
    return pool_registry(
        warm_adapters=scenario.loaded_max, adapter_load_s=adapter_load_s, **options
    )


def simulate(
    policy: str,
    rho: float,
    duration_s: float,
    seed: int,
    *,
    scenario: Scenario = ISSUE3,
    shift_at: float | None = None,
    probe: Callable[[Pool, float], None] | None = None,
) -> tuple[list[Job], list[Gpu], list[float]]:
    """One policy at one load: its requests (timed), its workers, and each request's
    wait beyond its FIFO turn (central-queue policies only, which `probe` sees)."""
    jobs = workload(rho, duration_s, seed, shift_at=shift_at)
    if policy in PUSH:
        return jobs, run_push(jobs, PUSH[policy](), seed), []
    load_s = 0.0 if policy == IDEAL else scenario.load_s
    registry = balancer_registry(policy, scenario)
    run = run_pool(jobs, registry, seed, load_s=load_s, loaded_max=scenario.loaded_max, probe=probe)
    return jobs, run.workers, run.beyond_fifo_s


def run_policy(policy: str, rho: float, duration_s: float, seed: int) -> tuple[Result, list[float]]:
    """One policy at one load: the result, and each request's wait beyond its FIFO turn."""
    jobs, workers, beyond = simulate(policy, rho, duration_s, seed)
    return measure(policy, rho, jobs, workers, duration_s), beyond


def run_seeds(policy: str, rho: float, duration_s: float, seeds: Sequence[int]) -> Result:
    """One policy at one load over several seeded runs, measured as one: percentiles
    over all their requests (each run's warm-up left out), loads per 1,000 of them,
    throughput per run, backlog of all runs together."""
    jobs: list[Job] = []
    workers: list[Gpu] = []
    for seed in seeds:
        more_jobs, more_workers, _ = simulate(policy, rho, duration_s, seed)
        jobs += more_jobs
        workers += more_workers
    result = measure(policy, rho, jobs, workers, duration_s)
    return replace(result, throughput=result.throughput / len(seeds))


# -- the report -----------------------------------------------------------------------


def table(results: Sequence[Result]) -> Iterator[str]:
    yield "| rho | policy | p50 s | p99 s | throughput /s | loads /1000 | backlog at end |"
    yield "|---|---|---:|---:|---:|---:|---:|"
    for r in results:
        yield (
            f"| {r.rho} | {r.policy} | {r.p50_s:.2f} | {r.p99_s:.2f} | {r.throughput:.2f} "
            f"| {r.loads_per_1000:.0f} | {r.backlog} |"
        )


def targets(results: Sequence[Result], beyond_fifo_s: Sequence[float]) -> Iterator[str]:
    def get(policy: str, rho: float) -> Result:
        return next(r for r in results if r.policy == policy and r.rho == rho)

    ours, ideal = get(BALANCER, 0.8), get("ideal central queue", 0.8)
    push, blind = get("least-loaded push", 0.8), get("central FIFO, blind", 0.95)
    ours95 = get(BALANCER, 0.95)
    checks = [
        ("rho 0.8: p99 / ideal central queue <= 1.35", ours.p99_s / ideal.p99_s, 1.35),
        ("rho 0.8: p99 / ideal central queue <= 1.25 (stretch)", ours.p99_s / ideal.p99_s, 1.25),
        ("rho 0.8: p99 / least-loaded push <= 0.8", ours.p99_s / push.p99_s, 0.8),
        (
            "rho 0.8: adapter loads / least-loaded push <= 0.7",
            ours.loads_per_1000 / push.loads_per_1000,
            0.7,
        ),
    ]
    for name, ratio, limit in checks:
        yield f"{'met' if ratio <= limit else 'NOT MET'}: {name}: {ratio:.2f}"
    more = ours95.throughput > blind.throughput and ours95.backlog < blind.backlog
    yield (
        f"{'met' if more else 'NOT MET'}: rho 0.95: throughput {ours95.throughput:.2f} vs "
        f"{blind.throughput:.2f} (central FIFO, blind), backlog {ours95.backlog} vs {blind.backlog}"
    )
    worst = sorted(beyond_fifo_s)
    yield (
        f"wait beyond the FIFO turn ({BALANCER}, every load): max {worst[-1]:.2f} s, "
        f"p99 {worst[int(len(worst) * 0.99)]:.2f} s; bound: {6 * sum(SLOTS)} overtakes (6 per "
        f"slot), and at the head adapter_load_s ({DEFAULT_ADAPTER_LOAD_S} s) x waiters per "
        "slot, at most 4 x that"
    )


# -- issue 13: placement near saturation ---------------------------------------------

SEEDS = (1, 2, 3)
STABLE_S = 4000.0  # the "max stable load" runs
STABLE_SHARE = 0.995


def stable(
    policy: str, rho: float, seed: int, scenario: Scenario, duration_s: float = STABLE_S
) -> bool:
    """Over the second half of a STABLE_S run, were at least 99.5% as many requests
    finished as arrived? (Arrivals, not rho x capacity: Poisson noise alone moves the
    offered rate by ~1% over 2,000 s, more than the margin. A diverging queue falls
    behind by its growth; a long but steady one does not.)"""
    jobs, _, _ = simulate(policy, rho, duration_s, seed, scenario=scenario)
    half = duration_s / 2
    offered = sum(half <= j.arrived < duration_s for j in jobs)
    done = sum(half <= j.done < duration_s for j in jobs)
    return done >= STABLE_SHARE * offered


def max_stable(
    policy: str, seed: int, scenario: Scenario, top: float, duration_s: float = STABLE_S
) -> float:
    """The highest rho in 0.01 steps, from 0.50 to `top`, that is `stable`: `top` is
    tried first, then a bisection (about 6 runs instead of 50). The bisection takes
    stability to be monotone in rho, which is the step definition's answer unless a
    higher rho is stable again after a lower one was not. 0.5: not even that."""
    low, high = 50, round(top * 100)
    if stable(policy, high / 100, seed, scenario, duration_s):
        return high / 100
    while high - low > 1:  # low is taken as stable, high is not
        middle = (low + high) // 2
        if stable(policy, middle / 100, seed, scenario, duration_s):
            low = middle
        else:
            high = middle
    return low / 100


def lru_loads(adapters: Sequence[str], places: int) -> int:
    """Loads of one LRU cache of `places` adapters serving `adapters` in this order."""
    cache: OrderedDict[str, None] = OrderedDict()
    loads = 0
    for adapter in adapters:
        if adapter in cache:
            cache.move_to_end(adapter)
            continue
        loads += 1
        cache[adapter] = None
        if len(cache) > places:
            cache.popitem(last=False)
    return loads


def min_loads(adapters: Sequence[str], places: int) -> int:
    """Belady's MIN: the fewest loads any cache of `places` adapters can make serving
    `adapters` in this order (on a load, evict the adapter needed again latest)."""
    never = len(adapters)
    next_use = [never] * len(adapters)
    seen: dict[str, int] = {}
    for i in range(len(adapters) - 1, -1, -1):
        next_use[i] = seen.get(adapters[i], never)
        seen[adapters[i]] = i
    cache: dict[str, int] = {}  # adapter -> when it is needed next
    loads = 0
    for i, adapter in enumerate(adapters):
        if adapter not in cache:
            loads += 1
            if len(cache) >= places:
                del cache[max(cache, key=cache.__getitem__)]
        cache[adapter] = next_use[i]
    return loads


@dataclass(frozen=True)
class CacheFloor:
    """What one cache holding all the pool's places would do with the same requests
    (in arrival order, rho 0.95), beside how many distinct adapters the pool's own
    per-worker caches held (sampled every PROBE_S): copies of one adapter on several
    workers take places that could hold others."""

    places: int
    lru: float  # loads per 1,000: one shared LRU cache of `places`
    least: float  # Belady's MIN with `places`
    distinct: float  # mean distinct adapters warm in the pool (this balancer)
    lru_distinct: float  # loads per 1,000 of one shared LRU cache that size


def cache_floor(jobs: Sequence[Job], held: Sequence[int], places: int) -> CacheFloor:
    """The floor for these requests; `held`: the pool's distinct warm adapters, sampled."""
    order = [job.adapter for job in sorted(jobs, key=lambda job: job.arrived)]
    distinct = statistics.mean(held)

    def per_1000(loads: int) -> float:
        return 1000 * loads / len(order)

    return CacheFloor(
        places,
        lru=per_1000(lru_loads(order, places)),
        least=per_1000(min_loads(order, places)),
        distinct=distinct,
        lru_distinct=per_1000(lru_loads(order, round(distinct))),
    )


def distinct_warm(held: list[int]) -> Callable[[Pool, float], None]:
    """A probe that appends how many distinct adapters the pool's workers hold."""

    def probe(pool: Pool, now: float) -> None:
        held.append(len(set().union(*(worker.warm for worker in pool.workers))))

    return probe


@dataclass
class SeedReport:
    seed: int
    results: dict[tuple[str, float], Result]
    beyond_fifo_s: list[float]  # this balancer, rho 0.8 and 0.95
    stable_ideal: float
    stable_ours: float
    floor: CacheFloor


def seed_report(
    seed: int, scenario: Scenario, duration_s: float, stable_s: float = STABLE_S
) -> SeedReport:
    results, beyond = {}, []
    held: list[int] = []
    floor = None
    for rho in (0.8, 0.95):
        for policy in (IDEAL, BALANCER, NO_PLACEMENT):
            probe = distinct_warm(held) if (policy, rho) == (BALANCER, 0.95) else None
            jobs, workers, waits = simulate(
                policy, rho, duration_s, seed, scenario=scenario, probe=probe
            )
            results[policy, rho] = measure(policy, rho, jobs, workers, duration_s)
            beyond += waits if policy == BALANCER else []
            if probe is not None:
                floor = cache_floor(jobs, held, len(SLOTS) * scenario.loaded_max)
    assert floor is not None
    ideal = max_stable(IDEAL, seed, scenario, top=1.03, duration_s=stable_s)
    ours = max_stable(BALANCER, seed, scenario, top=ideal, duration_s=stable_s)
    return SeedReport(seed, results, beyond, ideal, ours, floor)


def _verdict(goal: str, values: Sequence[float], ok: Callable[[float], bool]) -> str:
    if not goal:
        return "| — | |"
    return f"| {goal} | {'met' if all(ok(v) for v in values) else 'NOT MET'} |"


def placement_table(reports: Sequence[SeedReport], *, goals: bool) -> Iterator[str]:
    """Issue 13's table: per seed, this balancer (the ideal queue in brackets)."""
    seeds = " | ".join(f"seed {r.seed}" for r in reports)
    yield f"| measure | {seeds} | goal | |"
    yield "|---|" + "---:|" * len(reports) + "---|---|"

    def row(name: str, cells: Sequence[str], goal: str, values: Sequence[float], ok: Any) -> str:
        return f"| {name} | {' | '.join(cells)} {_verdict(goal if goals else '', values, ok)}"

    def get(r: SeedReport, policy: str, rho: float) -> Result:
        return r.results[policy, rho]

    backlog = [get(r, BALANCER, 0.95).backlog for r in reports]
    cells = [f"{b} ({get(r, IDEAL, 0.95).backlog})" for b, r in zip(backlog, reports, strict=True)]
    yield row("rho 0.95: backlog when arrivals stop", cells, "<= 20", backlog, lambda v: v <= 20)
    p99 = [get(r, BALANCER, 0.95).p99_s / get(r, IDEAL, 0.95).p99_s for r in reports]
    cells = [
        f"{get(r, BALANCER, 0.95).p99_s:.1f} s ({get(r, IDEAL, 0.95).p99_s:.1f} s): {x:.2f}x"
        for x, r in zip(p99, reports, strict=True)
    ]
    yield row("rho 0.95: p99 (ideal)", cells, "<= 2.5x ideal", p99, lambda v: v <= 2.5)
    loads = [get(r, BALANCER, 0.95).loads_per_1000 for r in reports]
    yield row(
        "rho 0.95: loads per 1,000",
        [f"{v:.0f}" for v in loads],
        "<= 180",
        loads,
        lambda v: v <= 180,
    )
    p99 = [get(r, BALANCER, 0.8).p99_s / get(r, IDEAL, 0.8).p99_s for r in reports]
    cells = [f"{x:.2f}" for x in p99]
    yield row("rho 0.8: p99 / ideal", cells, "<= 1.16", p99, lambda v: v <= 1.16)
    loads = [get(r, BALANCER, 0.8).loads_per_1000 for r in reports]
    yield row("rho 0.8: loads per 1,000", [f"{v:.0f}" for v in loads], "", loads, None)
    floors = [r.floor for r in reports]
    cells = [f"{f.distinct:.1f} of {f.places}: LRU {f.lru_distinct:.0f}" for f in floors]
    yield row("rho 0.95: distinct adapters warm (a shared LRU that size)", cells, "", [], None)
    cells = [f"LRU {r.floor.lru:.0f}, MIN {r.floor.least:.0f}" for r in reports]
    yield row("rho 0.95: one cache of all places, loads per 1,000", cells, "", [], None)
    top = [r.stable_ours for r in reports]
    cells = [f"{r.stable_ours:.2f} ({r.stable_ideal:.2f})" for r in reports]
    yield row("max stable rho (ideal)", cells, ">= 0.96", top, lambda v: v >= 0.96 - 1e-9)
    for policy in (NO_PLACEMENT,):
        cells = [
            f"bl {get(r, policy, 0.95).backlog}, p99 {get(r, policy, 0.95).p99_s:.1f} s, "
            f"{get(r, policy, 0.95).loads_per_1000:.0f} loads"
            for r in reports
        ]
        yield row(f"rho 0.95, {policy}", cells, "", [], None)
    cells = []
    for r in reports:
        worst = sorted(r.beyond_fifo_s)
        cells.append(f"max {worst[-1]:.2f} s, p99 {worst[int(len(worst) * 0.99)]:.2f} s")
    yield row("wait beyond the FIFO turn (rho 0.8 + 0.95)", cells, "", [], None)


SHIFT_RHO = 0.9
SHIFT_S = 3000.0
WINDOW_S = 100.0


def shift_report(seed: int, duration_s: float = SHIFT_S) -> list[str]:
    """The Zipf ranking shuffled half-way through a run at rho 0.9. The pool's view:
    the share of requests (by the true ranking of the moment) for adapters it has
    placed, every PROBE_S, and how long after the shift it is back to 95% of its
    level before. Then loads per 1,000 and p99 per 100 s window of arrivals, for
    this balancer and with placement off."""
    shift_at = duration_s / 2
    before_names, after_names = rankings(seed)
    total = sum(1 / (k + 1) ** ZIPF_S for k in range(ADAPTERS))
    share_before = {a: 1 / (k + 1) ** ZIPF_S / total for k, a in enumerate(before_names)}
    share_after = {a: 1 / (k + 1) ** ZIPF_S / total for k, a in enumerate(after_names)}
    covered: list[tuple[float, float]] = []

    def probe(pool: Pool, now: float) -> None:
        shares = share_after if now >= shift_at else share_before
        covered.append((now, sum(shares[a] for a in pool.placed)))

    lines = []
    for policy in (BALANCER, NO_PLACEMENT):
        jobs = workload(SHIFT_RHO, duration_s, seed, shift_at=shift_at)
        registry = balancer_registry(policy)
        run_pool(jobs, registry, seed, probe=probe if policy == BALANCER else None)

        def window(start: float, end: float, jobs: list[Job] = jobs) -> tuple[float, float]:
            inside = [j for j in jobs if start <= j.arrived < end]
            loads = 1000 * sum(j.loaded for j in inside) / max(1, len(inside))
            cuts = statistics.quantiles([j.done - j.arrived for j in inside], n=100)
            return loads, cuts[98]

        before = window(shift_at / 3, shift_at)
        after = [window(shift_at + k * WINDOW_S, shift_at + (k + 1) * WINDOW_S) for k in range(6)]
        shown = ", ".join(f"{loads:.0f}/{p99:.1f}" for loads, p99 in after)
        view = "—"
        if policy == BALANCER:
            level = statistics.mean(c for t, c in covered if shift_at / 3 <= t < shift_at)
            back = next((t for t, c in covered if t > shift_at and c >= 0.95 * level), None)
            at = {round(t): c for t, c in covered}
            seen = ", ".join(
                f"{at.get(round(shift_at + d), math.nan):.2f}" for d in (0.0, 60.0, 120.0, 240.0)
            )
            late = "never" if back is None else f"{back - shift_at:.0f} s"
            view = f"{level:.2f} before; {seen} at +0/60/120/240 s; 95% at {late}"
        lines.append(f"| {seed} | {policy} | {view} | {before[0]:.0f}/{before[1]:.1f} | {shown} |")
    return lines


def _seed_task(args: tuple[int, Scenario, float]) -> SeedReport:
    return seed_report(*args)


def placement_report(duration_s: float, seeds: Sequence[int], jobs: int) -> None:
    """Issue 13: the targets per seed, the heavier-adapter table, the popularity shift."""
    tasks = [(seed, scenario, duration_s) for scenario in (ISSUE3, HEAVY) for seed in seeds]
    with multiprocessing.Pool(jobs) as workers:
        reports = workers.map(_seed_task, tasks)
        shifts = workers.map(shift_report, seeds)
    n = len(seeds)
    print(
        f"Issue 13, the issue-3 scenario ({duration_s:.0f} virtual s; max stable: "
        f"{STABLE_S:.0f} s runs):\n"
    )
    print("\n".join(placement_table(reports[:n], goals=True)))
    print(f"\nHeavier adapters: loads cost {HEAVY.load_s} s, workers hold {HEAVY.loaded_max}:\n")
    print("\n".join(placement_table(reports[n:], goals=False)))
    print(
        f"\nPopularity shift at {SHIFT_S / 2:.0f} s (rho {SHIFT_RHO}). The view: share of "
        "requests for placed adapters. Then loads per 1,000 / p99 s, before the shift and "
        f"per {WINDOW_S:.0f} s window after:\n"
    )
    print("| seed | policy | the view | before | after, by window |")
    print("|---|---|---|---|---|")
    print("\n".join(line for lines in shifts for line in lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.balance", description=__doc__)
    parser.add_argument("--duration", type=float, default=2000.0, help="virtual seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--placement", action="store_true", help="issue 13's report instead (seeds 1-3)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="processes for --placement")
    parser.add_argument(
        "--replicas",
        action="store_true",
        help="gateway processes R = 1, 2, 4, 8 on the same workers, coordinated or not",
    )
    parser.add_argument("--redis-hop-ms", type=float, default=REDIS_HOP_S * 1000)
    args = parser.parse_args(argv)
    if args.replicas:
        return replicas_main(args.duration, args.redis_hop_ms / 1000)
    started = time.perf_counter()
    if args.placement:
        placement_report(args.duration, SEEDS, args.jobs)
        print(f"\n({time.perf_counter() - started:.1f} s of real time)")
        return 0
    results: list[Result] = []
    beyond: list[float] = []
    for rho in RHOS:
        for policy in POLICIES:
            result, waits = run_policy(policy, rho, args.duration, args.seed)
            results.append(result)
            beyond += waits if policy == BALANCER else []
    print("\n".join(table(results)))
    print()
    print("\n".join(targets(results, beyond)))
    print(f"\n({args.duration:.0f} virtual s per run, seed {args.seed}, ", end="")
    print(f"{time.perf_counter() - started:.1f} s of real time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
