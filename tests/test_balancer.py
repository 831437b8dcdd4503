from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from gateway.balancer import Balancer, Pool, Ticket, Worker, outcome_of
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
    chosen = choices_when_idle(make_pool(urls(3), FakeClock()), 3000)
    assert min(chosen.values()) > 800, chosen


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
