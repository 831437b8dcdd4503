from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from gateway.balancer import Balancer, Outcome, Pool, Ticket, Worker, outcome_of
from gateway.causes import Cause
from gateway.errors import Overloaded, UpstreamError, UpstreamRejected
from gateway.health import State
from tests.support import FakeClock, make_registry


def urls(n: int) -> list[str]:
    # Never contacted: these tests drive the balancer alone.
    return [f"http://127.0.0.1:{9100 + i}" for i in range(n)]


def make_pool(
    workers: Sequence[str | dict[str, Any]], clock: FakeClock, seed: int = 7, **options: Any
) -> Pool:
    registry = make_registry({"p": workers}, **options)
    return Balancer(registry, clock=clock, rng=random.Random(seed)).pool("p")


def submit(pool: Pool, adapter: str | None = None, **kwargs: Any) -> Ticket:
    ticket = Ticket(adapter, **kwargs)
    pool.submit(ticket)
    return ticket


def names(workers: list[Worker]) -> list[str]:
    return [w.name for w in workers]


# -- admission ----------------------------------------------------------------------


def test_free_slots_first_then_a_fifo_queue() -> None:
    clock = FakeClock()
    pool = make_pool([{"url": u, "max_concurrency": 1} for u in urls(2)], clock)
    tickets = [submit(pool) for _ in range(4)]
    assert [t.worker is not None for t in tickets] == [True, True, False, False]
    assert list(pool.queue) == tickets[2:]
    first = tickets[0].worker
    pool.release(tickets[0], "ok")
    assert tickets[2].worker is first, "the slot goes to the longest waiter"
    assert tickets[3].worker is None
    pool.release(tickets[1], "ok")
    assert tickets[3].worker is not None
    for ticket in tickets[2:]:
        pool.release(ticket, "ok")
    assert [w.in_flight for w in pool.workers] == [0, 0]


def test_full_queue_is_overloaded_with_retry_after_from_the_service_rate() -> None:
    clock = FakeClock()
    pool = make_pool([{"url": urls(1)[0], "max_concurrency": 1}], clock, max_queue=2)
    # Serve 11 requests, one every 0.5 s: the pool's recent rate is 2 a second.
    for _ in range(11):
        clock.advance(0.5)
        pool.release(submit(pool), "ok")
    holder, waiting = submit(pool), [submit(pool), submit(pool)]
    with pytest.raises(Overloaded) as caught:
        submit(pool)
    assert caught.value.status_code == 503
    # 2 waiting + this one = 3 requests at ~2/s.
    assert caught.value.headers() == {"Retry-After": "2"}
    assert pool.stats.rejected_full == 1
    assert list(pool.queue) == waiting, "a refused request is not queued"
    assert holder.worker is not None


def test_retry_after_without_history_is_the_queue_timeout() -> None:
    pool = make_pool([urls(1)[0]], FakeClock(), max_queue=0, queue_timeout_s=7)
    submit(pool)
    with pytest.raises(Overloaded) as caught:
        submit(pool)
    assert caught.value.retry_after_s == 7


def test_a_withdrawn_waiter_leaves_the_queue_and_takes_no_slot() -> None:
    clock = FakeClock()
    pool = make_pool([urls(1)[0]], clock)
    holder, gone, next_one = submit(pool), submit(pool), submit(pool)
    pool.withdraw(gone)
    pool.release(holder, "ok")
    assert gone.worker is None
    assert next_one.worker is pool.workers[0]
    assert pool.workers[0].in_flight == 1


def test_withdraw_after_grant_and_double_release_free_the_slot_once() -> None:
    pool = make_pool([urls(1)[0]], FakeClock())
    ticket = submit(pool)
    pool.withdraw(ticket)
    pool.release(ticket, "ok")
    pool.withdraw(ticket)
    assert pool.workers[0].in_flight == 0


def test_no_worker_in_service_is_refused_at_once() -> None:
    pool = make_pool(urls(2), FakeClock())
    with pytest.raises(UpstreamError, match="no healthy worker"):
        submit(pool, exclude=tuple(pool.workers))


# -- choice ---------------------------------------------------------------------------


def test_a_warm_worker_is_preferred_and_the_lru_is_seeded_and_bounded() -> None:
    clock = FakeClock()
    specs: Sequence[str | dict[str, Any]] = [
        {"url": urls(3)[0], "max_concurrency": 4},
        {"url": urls(3)[1], "max_concurrency": 4, "adapters": ["a", "b", "c"]},
        {"url": urls(3)[2], "max_concurrency": 4},
    ]
    pool = make_pool(specs, clock, warm_adapters=2)
    warm = pool.workers[1]
    assert list(warm.warm) == ["b", "c"], "seeded from `adapters:`, bounded by warm_adapters"
    for _ in range(4):
        assert submit(pool, "c").worker is warm
    assert pool.stats.adapter_loads == 0
    assert submit(pool, "c").worker is not warm, "warm but full: another worker loads it"
    assert pool.stats.adapter_loads == 1


def choices_when_idle(pool: Pool, n: int) -> Counter[str]:
    """Which worker each of `n` requests gets, each alone in the pool."""
    chosen: Counter[str] = Counter()
    for _ in range(n):
        ticket = submit(pool)
        assert ticket.worker is not None
        chosen[ticket.worker.name] += 1
        pool.release(ticket, "ok")
    return chosen


def test_ties_never_favour_the_first_worker() -> None:
    pool = make_pool(urls(3), FakeClock())
    chosen = choices_when_idle(pool, 3000)
    # Every worker counted, so that one never chosen (absent from `chosen`) fails too.
    assert min(chosen.get(w.name, 0) for w in pool.workers) > 800, chosen


def test_weight_sets_the_share_among_idle_workers() -> None:
    specs: Sequence[str | dict[str, Any]] = [
        {"url": urls(2)[0], "weight": 3},
        {"url": urls(2)[1], "weight": 1},
    ]
    chosen = choices_when_idle(make_pool(specs, FakeClock()), 4000)
    # Two workers are always the two choices; the tie (both idle) goes 3:1 by weight.
    assert 0.68 < chosen["p-0"] / 4000 < 0.82, chosen


def test_the_less_loaded_of_two_is_chosen() -> None:
    specs: Sequence[str | dict[str, Any]] = [{"url": u, "max_concurrency": 4} for u in urls(2)]
    pool = make_pool(specs, FakeClock())
    busy = pool.workers[0]
    for _ in range(3):
        pool.submit(ticket := Ticket(None, exclude=(pool.workers[1],)))
        assert ticket.worker is busy
    assert all(submit(pool).worker is pool.workers[1] for _ in range(3))


def warm_busy_pool(clock: FakeClock, **options: Any) -> tuple[Pool, Ticket]:
    """Worker p-0 is warm for "a", has taken 2 s a request, and is busy since now;
    p-1 is free and cold."""
    specs: Sequence[str | dict[str, Any]] = [
        {"url": urls(2)[0], "adapters": ["a"]},
        {"url": urls(2)[1]},
    ]
    pool = make_pool(specs, clock, adapter_load_s=1.0, **options)
    warm = pool.workers[0]
    for _ in range(3):  # teach the pool p-0's service time
        ticket = submit(pool, "a", exclude=(pool.workers[1],))
        clock.advance(2.0)
        pool.release(ticket, "ok")
    busy = submit(pool, "a", exclude=(pool.workers[1],))
    assert busy.worker is warm
    return pool, busy


def test_waits_for_a_busy_warm_worker_when_that_is_cheaper_than_a_load() -> None:
    clock = FakeClock()
    pool, busy = warm_busy_pool(clock)
    clock.advance(1.5)  # p-0 should be done in about 0.5 s: less than a load
    waiter = submit(pool, "a")
    assert waiter.worker is None, "waits for the warm worker, though p-1 is free"
    clock.advance(0.4)
    pool.release(busy, "ok")
    assert waiter.worker is pool.workers[0]
    assert pool.stats.adapter_loads == 0


def test_takes_a_free_cold_worker_when_the_warm_one_is_far_off() -> None:
    clock = FakeClock()
    pool, _ = warm_busy_pool(clock)
    clock.advance(0.2)  # p-0 needs about 1.8 s more: a load (1 s) is cheaper
    waiter = submit(pool, "a")
    assert waiter.worker is pool.workers[1]
    assert pool.stats.adapter_loads == 1
    assert pool.workers[1].stats.adapter_loads == 1


def test_a_waiter_for_a_warm_worker_leaves_the_free_slot_to_others() -> None:
    clock = FakeClock()
    pool, _busy = warm_busy_pool(clock)
    clock.advance(1.5)
    waiter = submit(pool, "a")
    other = submit(pool, "b")
    assert waiter.worker is None
    assert other.worker is pool.workers[1], "no GPU idles while someone could use it"


def test_affinity_bound_when_waiting_for_a_warm_worker() -> None:
    """The warm worker overruns: the waiter takes the cold one exactly its bound
    (here affinity_wait_max_s) after it first chose to wait, never later."""
    clock = FakeClock()
    pool, _busy = warm_busy_pool(clock, affinity_wait_max_s=1.0)
    clock.advance(1.5)
    started = clock.now
    waiter = submit(pool, "a")
    assert waiter.worker is None
    assert pool.next_wakeup() == started + 1.0
    clock.advance(0.999)
    pool.dispatch()
    assert waiter.worker is None
    clock.advance(0.001)
    pool.dispatch()  # what the waiter's own timer (or the simulation) does at next_wakeup
    assert waiter.worker is pool.workers[1]
    assert waiter.granted_at - started == pytest.approx(1.0)


def test_affinity_bound_when_passed_over_for_warm_requests() -> None:
    """A cold request at the head steps aside for warm ones behind it only within
    its bound (here affinity_wait_max_s) of the first time; the next slot after that is
    its, though a warm request waits behind it."""
    clock = FakeClock()
    specs: Sequence[str | dict[str, Any]] = [{"url": urls(1)[0], "adapters": ["a"]}]
    pool = make_pool(specs, clock, adapter_load_s=1.0, affinity_wait_max_s=1.0)
    running = submit(pool, "a")
    head = submit(pool, "x")
    warm_behind = [submit(pool, "a")]
    turn = clock.now
    for step in (0.0, 0.5, 0.4):  # slots free at +0.0, +0.5, +0.9: warm ones take them
        clock.advance(step)
        pool.release(running, "ok")
        running = warm_behind[-1]
        assert running.worker is not None
        assert head.worker is None
        warm_behind.append(submit(pool, "a"))
    clock.advance(0.2)  # +1.1: past the bound, the next free slot is the head's
    pool.release(running, "ok")
    assert head.worker is pool.workers[0]
    assert warm_behind[-1].worker is None
    assert head.passed_at == turn
    assert head.granted_at - turn <= 1.0 + 0.2  # the bound, plus the wait for a slot


def test_base_model_requests_never_make_others_step_aside() -> None:
    clock = FakeClock()
    pool = make_pool([urls(1)[0]], clock)
    running = submit(pool, "x")
    head, behind = submit(pool, "y"), submit(pool, None)
    pool.release(running, "ok")
    assert head.worker is not None
    assert behind.worker is None


# -- retries and outcomes -------------------------------------------------------------


# Under the default pool settings, is a try that ended so retried on another worker,
# and does the retry count against the budget? Written out, not derived from Cause.
RETRIED = {
    Cause.DNS: (True, False),
    Cause.TLS: (True, False),
    Cause.CONNECT: (True, False),
    Cause.CONNECT_TIMEOUT: (True, False),
    Cause.RESET: (True, True),
    Cause.HTTP_429: (True, True),
    Cause.HTTP_503_BUSY: (True, True),
    Cause.HTTP_503: (True, True),
    Cause.TRUNCATED: (True, True),
    Cause.TIMEOUT: (True, True),
    Cause.HTTP_5XX: (True, True),
    Cause.BAD_ANSWER: (True, True),
    Cause.TOO_LARGE: (True, True),
    Cause.BUSY: (True, True),
    Cause.WORKFLOW_REJECTED: (True, True),
    Cause.JOB_FAILED: (True, True),
    Cause.REJECTED: (False, False),
    Cause.NO_WORKER: (False, False),
    Cause.DEADLINE: (False, False),
}


def test_every_cause_has_a_written_retry_decision() -> None:
    assert set(RETRIED) == set(Cause)


@pytest.mark.parametrize("cause", list(Cause), ids=lambda c: c.label)
async def test_the_retry_decision_follows_the_cause(cause: Cause) -> None:
    retried, budgeted = RETRIED[cause]
    pool = Balancer(make_registry({"p": urls(2)})).pool("p")
    with pool.attempt(adapter=None) as attempt:
        async with attempt.slot():
            pass
        failure = UpstreamError(cause, "worker p-0")
        if retried:
            attempt.retry_or_raise(failure)
        else:
            with pytest.raises(UpstreamError):
                attempt.retry_or_raise(failure)
        assert attempt.retries == int(retried)
        assert pool.active_retries == int(budgeted)


@pytest.mark.parametrize("cause", [Cause.TIMEOUT, Cause.HTTP_5XX, Cause.BAD_ANSWER])
async def test_a_job_the_worker_may_have_run_is_retried_only_as_retry_on_says(
    cause: Cause,
) -> None:
    pool = Balancer(make_registry({"p": urls(2)}, retry_on=["truncated"])).pool("p")
    with pool.attempt(adapter=None) as attempt:
        async with attempt.slot():
            pass
        with pytest.raises(UpstreamError):
            attempt.retry_or_raise(UpstreamError(cause, "worker p-0"))


def test_outcomes_for_health() -> None:
    assert outcome_of(None) == "ok"
    assert outcome_of(UpstreamRejected(400, "bad prompt")) == "answered"
    assert outcome_of(UpstreamError(Cause.HTTP_429, "w")) == "busy"
    assert outcome_of(UpstreamError(Cause.HTTP_5XX, "w")) == "failed"
    assert outcome_of(UpstreamError(Cause.HTTP_503_BUSY, "w")) == "busy"
    assert outcome_of(UpstreamError(Cause.HTTP_503, "w")) == "failed"  # no Retry-After
    assert outcome_of(UpstreamError(Cause.BAD_ANSWER, "w")) == "failed"
    assert outcome_of(UpstreamError(Cause.NO_WORKER, "pool 'p'")) == "cancelled"
    assert outcome_of(asyncio.CancelledError()) == "cancelled"


def test_retry_budget_is_a_share_of_active_requests_with_a_floor() -> None:
    pool = make_pool([urls(1)[0]], FakeClock())
    pool.active = 40
    pool.active_retries = 7
    assert pool.retry_allowed()  # 20% of 40 = 8
    pool.active_retries = 8
    assert not pool.retry_allowed()
    pool.active, pool.active_retries = 2, 2
    assert pool.retry_allowed(), "at least 3 retries, however few requests"


# -- the async layer (real time, short) ---------------------------------------------


async def test_queue_timeout_is_overloaded_and_leaves_no_trace() -> None:
    pool = Balancer(make_registry({"p": urls(1)}, queue_timeout_s=0.05)).pool("p")
    with pool.attempt(adapter=None) as holder:
        async with holder.slot():
            with pool.attempt(adapter=None) as waiter, pytest.raises(Overloaded) as caught:
                async with waiter.slot():
                    pytest.fail("no slot was free")
    assert "no free worker within 0.05s" in str(caught.value.detail)
    assert pool.stats.rejected_timeout == 1
    assert not pool.queue
    assert pool.workers[0].in_flight == 0
    assert pool.active == 0


async def test_deadline_while_queued_is_a_timeout() -> None:
    registry = make_registry({"p": urls(1)}, timeout_s=0.05, queue_timeout_s=10)
    pool = Balancer(registry).pool("p")
    with pool.attempt(adapter=None) as holder:
        async with holder.slot():
            with pool.attempt(adapter=None) as waiter, pytest.raises(UpstreamError) as caught:
                async with waiter.slot():
                    pytest.fail("no slot was free")
    assert (caught.value.cause, caught.value.status_code) == (Cause.DEADLINE, 504)


async def test_cancelled_while_queued_leaves_the_queue() -> None:
    pool = Balancer(make_registry({"p": urls(1)})).pool("p")

    async def wait_for_slot() -> None:
        with pool.attempt(adapter=None) as attempt:
            async with attempt.slot():
                pytest.fail("never granted: cancelled first")

    with pool.attempt(adapter=None) as holder:
        async with holder.slot():
            task = asyncio.create_task(wait_for_slot())
            await asyncio.sleep(0.01)
            assert len(pool.queue) == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not pool.queue
    assert pool.workers[0].in_flight == 0


@pytest.mark.parametrize(
    "raised",
    [
        None,
        UpstreamError(Cause.HTTP_5XX, "w", "HTTP 500"),
        UpstreamError(Cause.TIMEOUT, "w"),
        KeyError("bug"),
    ],
)
async def test_a_slot_is_released_however_the_try_ends(raised: BaseException | None) -> None:
    pool = Balancer(make_registry({"p": urls(1)})).pool("p")
    with pool.attempt(adapter=None) as attempt:
        try:
            async with attempt.slot() as worker:
                assert worker.in_flight == 1
                if raised is not None:
                    raise raised
        except (UpstreamError, KeyError):
            pass
    assert pool.workers[0].in_flight == 0


async def test_a_slot_is_released_when_the_try_is_cancelled() -> None:
    pool = Balancer(make_registry({"p": urls(1)})).pool("p")
    entered = asyncio.Event()

    async def try_forever() -> None:
        with pool.attempt(adapter=None) as attempt:
            async with attempt.slot():
                entered.set()
                await asyncio.Event().wait()

    task = asyncio.create_task(try_forever())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.workers[0].in_flight == 0
    assert pool.workers[0].health.failures == 0, "a cancelled try says nothing of the worker"


# -- living configuration -------------------------------------------------------------


def test_update_keeps_the_state_of_workers_that_stay() -> None:
    clock = FakeClock()
    a, b, c = urls(3)
    balancer = Balancer(make_registry({"p": [a, b], "gone": [c]}), clock=clock)
    pool = balancer.pool("p")
    kept, dropped = pool.workers
    held = Ticket("lora", exclude=(dropped,))
    pool.submit(held)
    kept.health.state = State.HEALTHY
    orphan = Ticket(None)
    balancer.pool("gone").submit(Ticket(None))
    balancer.pool("gone").submit(orphan)

    specs: Sequence[str | dict[str, Any]] = [{"url": a, "max_concurrency": 3}, c]
    balancer.update(make_registry({"p": specs}, queue_timeout_s=5))

    assert balancer.pool("p") is pool
    assert pool.spec.queue_timeout_s == 5
    assert pool.workers[0] is kept
    assert kept.spec.max_concurrency == 3
    assert kept.in_flight == 1
    assert "lora" in kept.warm
    assert kept.health.state is State.HEALTHY
    assert pool.workers[1].url == c
    assert pool.workers[1].name == "p-2", "names are never reused"
    assert isinstance(orphan.error, Overloaded), "a removed pool's waiters get 503"
    assert "gone" not in balancer.pools
    pool.release(held, "ok")
    assert kept.in_flight == 0


def test_a_removed_worker_finishes_its_tries() -> None:
    a, b = urls(2)
    pool = make_pool([a, b], FakeClock())
    ticket = Ticket(None, exclude=(pool.workers[0],))
    pool.submit(ticket)
    leaving = ticket.worker
    assert leaving is not None
    assert leaving.url == b
    pool.set_workers([pool.spec.workers[0]])
    assert names(pool.workers) == ["p-0"]
    assert leaving.in_flight == 1
    pool.release(ticket, "ok")
    assert leaving.in_flight == 0


# -- placement, look-ahead, the bound (issue 13) ------------------------------------------


def serve(pool: Pool, clock: FakeClock, adapters: Sequence[str], each_s: float = 1.0) -> None:
    """One request at a time, each done in `each_s`."""
    for adapter in adapters:
        ticket = submit(pool, adapter)
        assert ticket.worker is not None
        clock.advance(each_s)
        pool.release(ticket, "ok")


def test_placement_follows_a_popularity_shift() -> None:
    clock = FakeClock()
    # Two places in the plan: warm_adapters 2 each, one left spare.
    pool = make_pool(urls(2), clock, warm_adapters=2, placement_half_life_s=10)
    serve(pool, clock, ["a", "a", "a", "b"] * 10)
    assert set(pool.placed) == {"a", "b"}
    assert pool.placed["a"] != pool.placed["b"], "one each: the traffic splits"
    serve(pool, clock, ["c", "c", "c", "d"] * 10)  # 40 s: four half-lives
    assert set(pool.placed) == {"c", "d"}, "the view follows the new ranking"


def test_a_cold_adapter_is_loaded_where_it_is_placed() -> None:
    clock = FakeClock()
    pool = make_pool(urls(2), clock, warm_adapters=2)
    serve(pool, clock, ["a", "b"] * 10)
    (home,) = pool.placed["a"]
    for _ in range(20):
        for worker in pool.workers:
            worker.warm.clear()  # as if both had restarted
        ticket = submit(pool, "a")
        assert ticket.worker is home, "not the other, equally free and cold, worker"
        pool.release(ticket, "ok")


def test_placement_off_plans_nothing() -> None:
    clock = FakeClock()
    pool = make_pool(urls(2), clock, warm_adapters=2, placement=False)
    serve(pool, clock, ["a", "b"] * 10)
    assert pool.placed == {}


@pytest.mark.parametrize(("lookahead", "steps_aside"), [(2, False), (3, True)])
def test_a_free_slot_looks_at_most_affinity_lookahead_waiters_past_the_head(
    lookahead: int, steps_aside: bool
) -> None:
    clock = FakeClock()
    specs: Sequence[str | dict[str, Any]] = [{"url": urls(1)[0], "adapters": ["a"]}]
    pool = make_pool(specs, clock, affinity_lookahead=lookahead)
    running = submit(pool, "a")
    head, *others = (submit(pool, adapter) for adapter in ["x", "y", "z", "a"])
    pool.release(running, "ok")
    warm_one = others[-1]
    assert (head.worker is None) is steps_aside
    assert (warm_one.worker is not None) is steps_aside


def test_the_bound_grows_with_the_queue_up_to_affinity_wait_max_s() -> None:
    """Held back first with 3 waiting on 1 slot: adapter_load_s x 3/1 = 3 s, at most
    affinity_wait_max_s; after that the head takes the next slot."""
    for most, bound in ((10.0, 3.0), (2.5, 2.5)):
        clock = FakeClock()
        specs: Sequence[str | dict[str, Any]] = [{"url": urls(1)[0], "adapters": ["a"]}]
        pool = make_pool(specs, clock, adapter_load_s=1.0, affinity_wait_max_s=most)
        running = submit(pool, "a")
        head, behind = submit(pool, "x"), [submit(pool, "a"), submit(pool, "a")]
        pool.release(running, "ok")
        assert head.worker is None
        assert head.passed_at == clock.now
        assert head.wake_at == clock.now + bound
        running = behind[0]
        clock.advance(bound)
        pool.release(running, "ok")
        assert head.worker is not None, "its bound is over: the next slot is its"
        assert behind[1].worker is None


def test_a_waiter_is_overtaken_at_most_affinity_overtakes_times() -> None:
    """Warm requests behind a cold head take the first three slots (its time
    allowance is far off); the fourth is the head's, though warm ones still wait."""
    clock = FakeClock()
    specs: Sequence[str | dict[str, Any]] = [{"url": urls(1)[0], "adapters": ["a"]}]
    pool = make_pool(specs, clock, affinity_overtakes=3, affinity_wait_max_s=100)
    running = submit(pool, "a")
    head = submit(pool, "x")
    behind = [submit(pool, "a") for _ in range(5)]
    for overtaken in range(1, 4):
        clock.advance(0.01)
        pool.release(running, "ok")
        running = behind[overtaken - 1]
        assert running.worker is not None
        assert head.worker is None
        assert head.overtaken == overtaken
    clock.advance(0.01)
    pool.release(running, "ok")
    assert head.worker is pool.workers[0], "overtaken three times: the next slot is its"
    assert behind[3].worker is None
    assert pool.stats.adapter_loads == 1


def test_the_time_allowance_starts_at_the_head_further_back_overtakes_count() -> None:
    """Saturated (three waiting, one slot), two cold waiters step aside for a warm one:
    the head's allowance starts, the second's does not (its turn has not come), but
    both were overtaken once. Once the
    head is served, the second's clock starts the first time it is held back there."""
    clock = FakeClock()
    specs: Sequence[str | dict[str, Any]] = [{"url": urls(1)[0], "adapters": ["a"]}]
    pool = make_pool(specs, clock, adapter_load_s=1.0, affinity_wait_max_s=1.0)
    running = submit(pool, "a")
    head, second, warm = submit(pool, "x"), submit(pool, "y"), submit(pool, "a")
    pool.release(running, "ok")
    assert warm.worker is not None
    assert (head.passed_at, head.overtaken) == (clock.now, 1)
    assert (second.passed_at, second.overtaken) == (None, 1)
    clock.advance(1.0)  # the head's allowance is over: the next slot is its
    pool.release(warm, "ok")
    assert head.worker is not None
    more = submit(pool, "a")
    clock.advance(0.5)
    pool.release(head, "ok")
    assert more.worker is not None, "the second, now the head, steps aside"
    assert second.passed_at == clock.now
    assert second.overtaken == 2


def test_not_saturated_every_waiter_held_back_starts_its_time_allowance() -> None:
    """Three waiting for four slots: each would be served within a round, so the
    second's clock starts too when it steps aside (saturated, only the head's does)."""
    clock = FakeClock()
    specs: Sequence[str | dict[str, Any]] = [
        {"url": urls(1)[0], "adapters": ["a"], "max_concurrency": 4}
    ]
    pool = make_pool(specs, clock, adapter_load_s=1.0, affinity_wait_max_s=1.0)
    running = [submit(pool, "a") for _ in range(4)]
    head, second, warm = submit(pool, "x"), submit(pool, "y"), submit(pool, "a")
    pool.release(running[0], "ok")
    assert warm.worker is not None
    assert head.passed_at == second.passed_at == clock.now


def one_worker_holding_a_needed_adapter(clock: FakeClock, slots: int) -> Pool:
    """p-0 holds "a" (placed there: the only adapter asked often) as its oldest of two,
    and "z"; the pool has timed its releases (one a second)."""
    specs: Sequence[str | dict[str, Any]] = [{"url": urls(1)[0], "max_concurrency": slots}]
    pool = make_pool(specs, clock, warm_adapters=2)
    serve(pool, clock, ["a"] * 20 + ["z"])
    assert pool.placed["a"] == frozenset(pool.workers)
    assert list(pool.workers[0].warm) == ["a", "z"]
    return pool


def held_off_a_needed_adapter(clock: FakeClock) -> tuple[Pool, Ticket]:
    """Saturated (one waiting, one slot): the free slot would evict "a", warm nowhere
    else, so the cold request leaves it free for the pool's time between releases."""
    pool = one_worker_holding_a_needed_adapter(clock, slots=1)
    running = submit(pool, "z")
    cold = submit(pool, "c")
    clock.advance(1.0)
    pool.release(running, "ok")
    assert cold.worker is None
    assert cold.recheck_at == pytest.approx(clock.now + 1.0), "released once a second"
    assert pool.next_wakeup() == cold.recheck_at
    return pool, cold


def test_saturated_a_load_leaves_a_slot_free_for_the_needed_adapter() -> None:
    clock = FakeClock()
    pool, cold = held_off_a_needed_adapter(clock)
    warm = submit(pool, "a")
    assert warm.worker is pool.workers[0], "the slot kept for it: no load"
    clock.advance(0.5)
    pool.release(warm, "ok")
    assert cold.worker is pool.workers[0], "now z is the oldest there: load, evict z"
    assert "a" in pool.workers[0].warm


def test_saturated_a_slot_idles_at_most_the_time_between_releases() -> None:
    clock = FakeClock()
    pool, cold = held_off_a_needed_adapter(clock)
    assert cold.recheck_at is not None
    clock.advance(0.999)
    pool.dispatch()
    assert cold.worker is None
    clock.now = cold.recheck_at
    pool.dispatch()  # the waiter's own timer does this at recheck_at
    assert cold.worker is pool.workers[0]
    assert "a" not in pool.workers[0].warm


def test_saturated_a_load_may_evict_an_adapter_warm_elsewhere_too() -> None:
    """The oldest adapter of the free worker is placed there but also warm on the
    other: evicting it costs no load, so the cold request takes the slot at once."""
    clock = FakeClock()
    pool = make_pool(urls(2), clock, warm_adapters=2)
    for i in range(20):
        ticket = submit(pool, "a", exclude=(pool.workers[i % 2],))
        clock.advance(1.0)
        pool.release(ticket, "ok")
    home, other = pool.workers
    assert home in pool.placed["a"]
    running = submit(pool, "z", exclude=(other,))
    busy = submit(pool, "a", exclude=(home,))
    cold, more = submit(pool, "c"), submit(pool, "d")
    assert list(home.warm) == ["a", "z"]
    assert "a" in other.warm
    clock.advance(1.0)
    pool.release(running, "ok")
    assert cold.worker is home
    assert more.worker is None
    pool.release(busy, "ok")


def test_not_saturated_a_load_evicts_at_once() -> None:
    """With a slot to spare nobody waits for a better one: nothing idles."""
    clock = FakeClock()
    pool = one_worker_holding_a_needed_adapter(clock, slots=2)
    running = submit(pool, "z")
    cold = submit(pool, "c")
    assert cold.worker is pool.workers[0]
    assert "a" not in pool.workers[0].warm
    pool.release(running, "ok")


def test_reload_changes_the_placement_knobs() -> None:
    clock = FakeClock()
    balancer = Balancer(make_registry({"p": urls(2)}, warm_adapters=2), clock=clock)
    pool = balancer.pool("p")
    serve(pool, clock, ["a", "b"] * 3)
    assert pool.placed
    balancer.update(make_registry({"p": urls(2)}, warm_adapters=2, placement=False))
    serve(pool, clock, ["a"])
    assert pool.placed == {}, "off at once, not at the next planning"
    options: dict[str, Any] = {
        "placement_half_life_s": 30,
        "affinity_lookahead": 1,
        "affinity_wait_max_s": 2,
        "affinity_overtakes": 5,
    }
    balancer.update(make_registry({"p": urls(2)}, warm_adapters=2, **options))
    assert pool.popularity.half_life_s == 30
    assert (pool.spec.affinity_lookahead, pool.spec.affinity_wait_max_s) == (1, 2)
    assert pool.spec.affinity_overtakes == 5
    serve(pool, clock, ["a"])
    assert pool.placed, "planned again at once"


def test_no_slot_leaks_and_the_bound_holds_in_a_random_run() -> None:
    """A seeded random run on the fake clock: requests for skewed adapters whose
    popularity shifts half-way, some withdrawn, some failing. At the end every slot is
    free and the queue empty; once a request's time allowance was over, no request
    behind it was served before it; and none was overtaken more than
    affinity_overtakes times (3 here, so that the count binds)."""
    rng = random.Random(5)
    clock = FakeClock()
    specs: Sequence[str | dict[str, Any]] = [
        {"url": u, "max_concurrency": n, "weight": n}
        for u, n in zip(urls(3), (1, 2, 4), strict=True)
    ]
    pool = make_pool(
        specs, clock, warm_adapters=3, adapter_load_s=0.5, max_queue=10_000, affinity_overtakes=3
    )
    submitted: list[Ticket] = []
    grant_order: dict[int, int] = {}  # id(ticket) -> its place among all grants

    def on_grant(ticket: Ticket) -> None:
        grant_order[id(ticket)] = len(grant_order)
        running.append(ticket)

    running: list[Ticket] = []
    allowance_end: dict[int, float] = {}  # id(ticket) -> when affinity stops holding it
    withdrawn = 0

    def step_done() -> None:
        for worker in pool.workers:
            assert worker.in_flight == len(worker.running) <= worker.spec.max_concurrency
        for ticket in pool.queue:
            if ticket.wake_at is not None:
                allowance_end[id(ticket)] = ticket.wake_at

    names = [f"lora-{k}" for k in range(12)]
    weights = [1 / (k + 1) for k in range(12)]
    for step in range(3000):
        ranked = names if step < 1500 else names[::-1]
        clock.advance(rng.expovariate(8.0))
        if rng.random() < 0.5:
            ticket = Ticket(rng.choices(ranked, weights)[0], on_grant)
            submitted.append(ticket)
            pool.submit(ticket)
        elif running:
            outcome: Outcome = rng.choice(["ok", "ok", "failed"])
            pool.release(running.pop(rng.randrange(len(running))), outcome)
        if rng.random() < 0.01 and pool.queue:
            pool.withdraw(rng.choice(list(pool.queue)))
            withdrawn += 1
        wake = pool.next_wakeup()
        if wake is not None and wake <= clock.now:
            pool.dispatch()
        step_done()
    while pool.queue or running:
        if running:
            pool.release(running.pop(0), "ok")
        else:
            wake = pool.next_wakeup()
            assert wake is not None, "waiters, free slots, and nothing to wake them"
            clock.now = wake
            pool.dispatch()
        step_done()
    assert not pool.queue
    assert all(w.in_flight == 0 and not w.running for w in pool.workers)
    granted = [t for t in submitted if t.worker is not None]
    assert pool.stats.admitted == len(granted) == len(submitted) - withdrawn
    assert pool.stats.adapter_loads > 0
    assert pool.placed
    assert allowance_end, "affinity held some back"
    for i, ticket in enumerate(submitted):
        end = allowance_end.get(id(ticket))
        if end is None or ticket.worker is None:
            continue
        overtook = [
            t
            for t in submitted[i + 1 :]
            if t.worker is not None and end < t.granted_at < ticket.granted_at
        ]
        assert not overtook, f"{len(overtook)} served after {end} before one held since"
    overtaken = [
        sum(
            grant_order[id(t)] < grant_order[id(ticket)]
            for t in submitted[i + 1 :]
            if t.worker is not None
        )
        for i, ticket in enumerate(submitted)
        if ticket.worker is not None
    ]
    assert max(overtaken) == 3, "overtaken at most 3 times, and the bound was reached"


@pytest.mark.parametrize("adapter_load_s", [0.0, 1.0])
def test_a_load_goes_where_it_costs_least_slot_time_if_it_costs_at_all(
    adapter_load_s: float,
) -> None:
    """p-1 takes 3 s a try, p-0 1 s: a load's 1 s is a third of a try on p-1, all of
    one on p-0. A free load (adapter_load_s 0, no affinity) goes by load alone."""
    clock = FakeClock()
    pool = make_pool(urls(2), clock, adapter_load_s=adapter_load_s, warm_adapters=0)
    for worker, took in zip(pool.workers, (1.0, 3.0), strict=True):
        others = tuple(w for w in pool.workers if w is not worker)
        ticket = Ticket(None, exclude=others)
        pool.submit(ticket)
        clock.advance(took)
        pool.release(ticket, "ok")
    chosen: Counter[str] = Counter()
    for k in range(400):
        ticket = submit(pool, f"lora-{k}")
        assert ticket.worker is not None
        chosen[ticket.worker.name] += 1
        pool.release(ticket, "cancelled")
    if adapter_load_s:
        assert chosen == {"p-1": 400}
    else:
        assert min(chosen["p-0"], chosen["p-1"]) > 120, chosen
