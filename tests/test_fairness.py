"""The fair order of a pool's waiters, on a fake clock: weights in GPU-seconds,
priorities and aging, retries first, no credit for idle time, deadlines refused and
expired; then the real Pool and Attempt around it."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pytest

from gateway.balancer import Balancer, Pool, Ticket
from gateway.errors import Overloaded
from gateway.fairness import Claim, Priority
from tests.support import FakeClock, make_registry

STEP_S = 0.1  # every try here takes steps x this, unless a test says otherwise


def one_pool(slots: int = 1, **options: Any) -> tuple[Pool, FakeClock]:
    """A pool of one worker; strict SFQ (no share credit) unless `options` say."""
    options.setdefault("share_credit_s", 0)
    clock = FakeClock()
    worker = {"url": "http://127.0.0.1:1", "max_concurrency": slots}
    registry = make_registry({"p": [worker]}, **options)
    return Balancer(registry, clock=clock, rng=random.Random(1)).pool("p"), clock


def ticket(
    team: str,
    *,
    steps: int = 10,
    weight: float = 1.0,
    priority: Priority = "interactive",
    deadline_at: float | None = None,
    retry: bool = False,
) -> Ticket:
    return Ticket(
        None,
        team=team,
        steps=steps,
        weight=weight,
        priority=priority,
        deadline_at=deadline_at,
        retry=retry,
    )


def hold(pool: Pool, clock: FakeClock, steps: int = 10) -> Ticket:
    """A try that takes the only slot; releasing it after `steps` x STEP_S teaches the
    pool its seconds per step."""
    blocker = ticket("blocker", steps=steps)
    pool.submit(blocker)
    assert blocker.worker is not None
    return blocker


def run(
    pool: Pool, clock: FakeClock, blocker: Ticket, *, cost: dict[str, float] | None = None
) -> list[Ticket]:
    """Release the blocker, then serve the queue one slot at a time until it is empty;
    each try takes steps x STEP_S (x `cost[team]` when given). The grants, in order."""
    served: list[Ticket] = []
    running = [blocker]
    clock.advance(blocker.steps * STEP_S)
    while running:
        done = running.pop()
        pool.release(done, "ok")
        granted = [t for w in pool.workers for t in w.running]
        for t in granted:
            if t not in served and t not in running:
                served.append(t)
                running.append(t)
        if running:
            t = running[-1]
            clock.advance(t.steps * STEP_S * (cost or {}).get(t.team, 1.0))
    return served


def submit_all(pool: Pool, tickets: Iterable[Ticket]) -> list[Ticket]:
    queued = list(tickets)
    for t in queued:
        pool.submit(t)
    return queued


def teams(tickets: Iterable[Ticket]) -> str:
    return "".join(t.team for t in tickets)


def test_one_team_is_served_in_fifo_order() -> None:
    pool, clock = one_pool()
    blocker = hold(pool, clock)
    queued = submit_all(pool, [ticket("a", steps=s) for s in (5, 50, 1, 20)])
    assert run(pool, clock, blocker) == queued


def test_equal_weights_alternate() -> None:
    pool, clock = one_pool()
    blocker = hold(pool, clock)
    submit_all(pool, [ticket("a") for _ in range(6)])
    submit_all(pool, [ticket("b") for _ in range(3)])
    # b came after all six of a's (FIFO would serve it last) and gets the second slot.
    assert teams(run(pool, clock, blocker)) == "abababaaa"


def test_weights_share_gpu_seconds_not_requests() -> None:
    pool, clock = one_pool()
    blocker = hold(pool, clock)
    submit_all(pool, [ticket("a", steps=40) for _ in range(5)])
    submit_all(pool, [ticket("b", steps=10) for _ in range(20)])
    order = teams(run(pool, clock, blocker))
    # One 40-step request of a costs what four of b's 10-step ones do.
    assert order[:15] == "abbbb" * 3, order


def test_a_weight_of_two_gets_two_thirds_while_both_wait() -> None:
    pool, clock = one_pool()
    blocker = hold(pool, clock)
    submit_all(pool, [ticket("a", weight=2) for _ in range(20)])
    submit_all(pool, [ticket("b", weight=1) for _ in range(20)])
    # The order the pool walks (several slots at once are granted from it) already
    # holds the shares, before anything is charged.
    assert Counter(teams(pool.queue)[:18]) == {"a": 12, "b": 6}
    window = teams(run(pool, clock, blocker))[:18]
    assert Counter(window) == {"a": 12, "b": 6}, window


def test_actual_service_time_corrects_the_estimate() -> None:
    """Team a's 10-step requests really take three times as long (a slow adapter):
    charged what they used, a gets a quarter of the grants and half the GPU time."""
    pool, clock = one_pool()
    blocker = hold(pool, clock)
    submit_all(pool, [ticket("a") for _ in range(40)])
    submit_all(pool, [ticket("b") for _ in range(40)])
    served = run(pool, clock, blocker, cost={"a": 3.0})
    window = teams(served)[:40]  # both still waiting throughout
    gpu = Counter({team: n * (3.0 if team == "a" else 1.0) for team, n in Counter(window).items()})
    assert abs(gpu["a"] - gpu["b"]) <= 3.0 + 1.0, window  # within one request each


def test_idle_time_is_not_credit() -> None:
    """a used the pool alone for a while; b, arriving then, does not get as long again
    to itself: the two alternate from b's arrival."""
    pool, clock = one_pool()
    blocker = hold(pool, clock)
    submit_all(pool, [ticket("b"), *(ticket("a") for _ in range(8))])
    assert teams(run(pool, clock, blocker)) == "baaaaaaaa"  # b idle after its first
    blocker = hold(pool, clock)
    submit_all(pool, [ticket("a") for _ in range(4)])
    submit_all(pool, [ticket("b") for _ in range(4)])
    # b starts at the virtual time of the try in service, one request ahead of a's
    # next: not the seven it sat out (that would be "bbbbaaaa").
    assert teams(run(pool, clock, blocker)) == "bbababaa"


def test_a_team_under_its_share_banks_at_most_the_share_credit() -> None:
    """With share_credit_s: 3 (three of these requests), b, idle while a used the
    pool, starts three requests behind the virtual time of a's try in service (a's
    next is one further): four of b's go before a's next, a fifth wins the tie (b
    came first), then they alternate.
    (Strict SFQ, share_credit_s: 0, gives "bbababaa..." in test_idle_time_is_not_credit.)"""
    pool, clock = one_pool(share_credit_s=3)
    blocker = hold(pool, clock)
    submit_all(pool, [ticket("b"), *(ticket("a") for _ in range(8))])
    run(pool, clock, blocker)
    blocker = hold(pool, clock)
    submit_all(pool, [ticket("a") for _ in range(6)])
    submit_all(pool, [ticket("b") for _ in range(6)])
    assert teams(run(pool, clock, blocker)) == "bbbbbabaaaaa"


def test_a_team_alone_takes_every_free_slot() -> None:
    pool, _ = one_pool(slots=3)
    queued = submit_all(pool, [ticket("a") for _ in range(3)])
    assert all(t.worker is not None for t in queued)
    assert not pool.queue


def test_batch_waits_for_interactive_until_it_has_aged() -> None:
    pool, clock = one_pool(batch_aging_s=3.0)
    blocker = hold(pool, clock)
    first = ticket("nightly", priority="batch")
    pool.submit(first)
    clock.advance(0.5)
    # An endless interactive stream: each second one more arrives.
    pool.submit(ticket("app"))
    served: list[Ticket] = []
    running = blocker
    for _ in range(6):
        clock.advance(1.0)
        pool.release(running, "ok")
        pool.submit(ticket("app"))
        (running,) = [t for w in pool.workers for t in w.running]
        served.append(running)
    # Served at the first free slot after it has waited 3 s (releases at 1.5, 2.5,
    # 3.5 s): then as interactive, and its team had used nothing yet.
    when = served.index(first)
    assert when == 2, teams(served)
    assert all(t.team == "app" for t in served[:when])


def test_batch_is_served_when_no_interactive_waits() -> None:
    pool, clock = one_pool(batch_aging_s=1000)
    blocker = hold(pool, clock)
    submit_all(pool, [ticket("nightly", priority="batch") for _ in range(3)])
    submit_all(pool, [ticket("app") for _ in range(2)])
    assert teams(run(pool, clock, blocker)) == "appapp" + "nightly" * 3


def test_retries_go_first() -> None:
    pool, clock = one_pool()
    blocker = hold(pool, clock)
    submit_all(pool, [ticket("a"), ticket("b")])
    retry = ticket("c", retry=True)
    pool.submit(retry)
    assert next(iter(pool.queue)) is retry
    assert run(pool, clock, blocker)[0] is retry


def test_a_withdrawn_waiter_costs_its_team_nothing() -> None:
    pool, clock = one_pool()
    blocker = hold(pool, clock)
    gone = [ticket("a", steps=50) for _ in range(3)]
    submit_all(pool, gone)
    for t in gone:
        pool.withdraw(t)
    submit_all(pool, [ticket("a"), ticket("b"), ticket("a"), ticket("b")])
    assert teams(run(pool, clock, blocker)) == "abab"


# -- deadlines ------------------------------------------------------------------------


def learned(pool: Pool, clock: FakeClock) -> Ticket:
    """The pool has timed 10 steps at 1 s; a new blocker holds the slot."""
    blocker = hold(pool, clock)
    clock.advance(1.0)
    pool.release(blocker, "ok")
    assert pool.queue.step_s == pytest.approx(STEP_S)
    return hold(pool, clock)


def test_a_request_that_cannot_start_by_its_deadline_is_refused_at_once() -> None:
    pool, clock = one_pool()
    learned(pool, clock)
    submit_all(pool, [ticket("a") for _ in range(5)])  # 1 s each; 1 s left running
    late = ticket("a", deadline_at=clock() + 4.0)  # behind its team's 5: starts at +6 s
    with pytest.raises(Overloaded) as refused:
        pool.submit(late)
    assert refused.value.retry_after_s >= 1
    assert late not in pool.queue
    assert pool.stats.rejected_deadline == 1
    # The same deadline for another team's request is met: in fair order only one of
    # a's is ahead of it, so it starts at +2 s, before its latest start at +3 s.
    ok = ticket("b", deadline_at=clock() + 4.0)
    pool.submit(ok)
    assert ok in pool.queue
    assert pool.predicted_start(ok) == pytest.approx(clock() + 2.0)


def test_a_waiter_leaves_the_queue_when_it_can_no_longer_start_in_time() -> None:
    pool, clock = one_pool()
    blocker = learned(pool, clock)
    waiter = ticket("a", deadline_at=clock() + 3.0)  # 1 s of work: start by +2 s
    other = ticket("a")
    submit_all(pool, [waiter, other])
    assert pool.next_wakeup() == pytest.approx(clock() + 2.0)
    clock.advance(1.9)
    pool.expire()
    assert waiter in pool.queue
    clock.advance(0.1)
    pool.expire()
    assert waiter not in pool.queue
    assert isinstance(waiter.error, Overloaded)
    assert pool.stats.rejected_deadline == 1
    pool.release(blocker, "ok")
    assert other.worker is not None  # the slot went to the next, not to the expired one


def test_no_deadline_refusal_before_the_pool_has_timed_anything() -> None:
    pool, clock = one_pool()
    hold(pool, clock)
    submit_all(pool, [ticket("a") for _ in range(5)])
    waiter = ticket("b", deadline_at=clock() + 0.5)
    pool.submit(waiter)  # no grounds to predict: queued, and leaves at its deadline
    assert waiter in pool.queue
    assert pool.latest_start(waiter) == pytest.approx(clock() + 0.5)


async def test_an_attempt_past_its_deadline_gets_503_and_leaves_the_queue() -> None:
    registry = make_registry({"p": [{"url": "http://127.0.0.1:1", "max_concurrency": 1}]})
    pool = Balancer(registry).pool("p")
    blocker = Ticket(None)
    pool.submit(blocker)
    claim = Claim(team="a", deadline_at=pool.clock() + 0.2)

    async def admitted() -> None:
        with pool.attempt(adapter=None, claim=claim) as attempt:
            async with attempt.slot():
                pass

    with pytest.raises(Overloaded, match="deadline"):
        await asyncio.wait_for(admitted(), 10)  # generous: the deadline is 0.2 s
    assert not pool.queue
    assert pool.stats.rejected_deadline == 1


def test_affinity_overtakes_the_fair_order_within_its_bound_and_is_charged() -> None:
    """Light's cold request heads the fair order; heavy's warm ones behind may take
    the slot (to save a load) only within light's allowance (capped here at 1 s) of the
    first time they did. Then light's turn comes, and heavy, charged for going ahead,
    waits for light's next request too."""
    clock = FakeClock()
    worker = {"url": "http://127.0.0.1:1", "adapters": ["a"]}
    registry = make_registry(
        {"p": [worker]}, adapter_load_s=1.0, affinity_wait_max_s=1.0, share_credit_s=0
    )
    pool = Balancer(registry, clock=clock, rng=random.Random(1)).pool("p")

    def warm(team: str, adapter: str) -> Ticket:
        return Ticket(adapter, team=team, steps=4)  # 0.4 s each, once timed

    running = warm("heavy", "a")
    pool.submit(running)
    clock.advance(0.4)
    pool.release(running, "ok")  # the pool has timed a step: 0.1 s
    running = warm("heavy", "a")
    pool.submit(running)
    light = [warm("light", "x"), warm("light", "x")]
    heavy = [warm("heavy", "a") for _ in range(6)]
    submit_all(pool, [*light, *heavy])
    assert next(iter(pool.queue)) is light[0]  # its fair turn is next
    granted: list[Ticket] = []
    while light[1].worker is None:
        clock.advance(0.4)
        pool.release(running, "ok")
        (running,) = [t for w in pool.workers for t in w.running]
        granted.append(running)
    # Passed over at +0.4, +0.8 and +1.2; its allowance ran out at +1.4, so the
    # release at +1.6 is its: 1.2 s beyond its turn (its allowance plus one slot).
    assert granted[:4] == [heavy[0], heavy[1], heavy[2], light[0]]
    assert light[0].passed_at == pytest.approx(light[0].queued_at + 0.4)
    assert light[0].granted_at - (light[0].queued_at + 0.4) <= 1.0 + 0.4
    # Heavy went ahead three times and was charged for it: light's next goes first.
    assert granted[4] is light[1]


def test_another_teams_overtake_starts_the_time_allowance_anywhere() -> None:
    """Saturated, a waiter behind the head counts only overtakes by its own team; one
    by another team starts its time allowance there and then, and for at most
    adapter_load_s (1 s here, though the queue would allow 8): its team's share is at
    stake. The fair order interleaves light and heavy: L0, H0, L1, H1, ..."""
    clock = FakeClock()
    worker = {"url": "http://127.0.0.1:1", "adapters": ["a"]}
    registry = make_registry(
        {"p": [worker]}, adapter_load_s=1.0, affinity_wait_max_s=10.0, share_credit_s=0
    )
    pool = Balancer(registry, clock=clock, rng=random.Random(1)).pool("p")
    running = Ticket("a", team="heavy", steps=4)
    pool.submit(running)
    clock.advance(0.4)
    pool.release(running, "ok")  # the pool has timed a step, heavy was charged
    running = Ticket("a", team="heavy", steps=4)
    pool.submit(running)
    light = [Ticket("x", team="light", steps=4) for _ in range(3)]
    heavy = [Ticket("a", team="heavy", steps=4) for _ in range(6)]
    submit_all(pool, [*light, *heavy])
    assert list(pool.queue)[:3] == [light[0], heavy[0], light[1]]
    clock.advance(0.4)
    pool.release(running, "ok")
    assert heavy[0].worker is not None, "warm, it went first"
    assert light[0].wake_at == pytest.approx(clock.now + 1.0), "the head: 1 s, not 8"
    assert light[1].passed_at is None, "not overtaken yet"
    clock.advance(0.4)
    pool.release(heavy[0], "ok")
    assert heavy[1].worker is not None
    assert light[1].passed_at == clock.now
    assert light[1].wake_at == pytest.approx(clock.now + 1.0)
