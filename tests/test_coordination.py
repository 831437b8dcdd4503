"""gateway.coordination's protocol, sans-IO: several processes' Pools and Members on
one MemoryHub and a fake clock. The Redis driver and real processes are in
tests/test_coordination_redis.py."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import pytest

from gateway.balancer import Balancer, Pool, Ticket
from gateway.causes import Cause
from gateway.coordination import (
    Member,
    MemoryHub,
    set_shares,
    share,
    ticket_from_wire,
    wire_fields,
)
from gateway.errors import Overloaded, UpstreamError
from tests.support import FakeClock, make_registry

URLS = ("http://gpu-0:1", "http://gpu-1:1", "http://gpu-2:1")


def pool_of(clock: FakeClock, slots: tuple[int, ...] = (1,), **options: Any) -> Pool:
    workers = [{"url": URLS[i], "max_concurrency": n} for i, n in enumerate(slots)]
    registry = make_registry({"gpu": workers}, **options)
    return Balancer(registry, clock=clock, rng=random.Random(1)).pool("gpu")


def cluster(
    n: int,
    clock: FakeClock,
    slots: tuple[int, ...] = (1,),
    hub: MemoryHub | None = None,
    **o: Any,
) -> tuple[MemoryHub, list[Member]]:
    """`n` processes sharing one pool; the first leads."""
    hub = hub or MemoryHub()
    members = [hub.join(pool_of(clock, slots, **o), f"p{i}") for i in range(n)]
    hub.elect("p0")
    return hub, members


class Log:
    """Tickets that record the order in which they were granted (or failed)."""

    def __init__(self) -> None:
        self.order: list[str] = []

    def ticket(self, name: str, adapter: str | None = None, **fields: object) -> Ticket:
        def notify(ticket: Ticket) -> None:
            self.order.append(name if ticket.error is None else f"{name}:{ticket.error}")

        return Ticket(adapter, notify, **fields)  # type: ignore[arg-type]


def busy(member: Member) -> list[int]:
    return [w.in_flight for w in member.pool.workers]


def test_one_queue_across_processes_served_in_arrival_order() -> None:
    clock, log = FakeClock(), Log()
    _, (p0, p1, p2) = cluster(3, clock)
    first = log.ticket("first")
    p1.pool.submit(first)
    waiters = [(p2, "a"), (p0, "b"), (p1, "c"), (p2, "d")]
    tickets = {}
    for member, name in waiters:
        clock.advance(0.1)
        tickets[name] = ticket = log.ticket(name)
        member.pool.submit(ticket)
    assert log.order == ["first"]
    # Each release hands the one slot to the oldest waiter, whichever process has it.
    p1.pool.release(first, "ok")
    for (member, name), (_, after) in zip(waiters, [*waiters[1:], (None, "")], strict=True):
        member.pool.release(tickets[name], "ok")
        if after:
            assert log.order[-1] == after
    assert log.order == ["first", "a", "b", "c", "d"]


def test_the_slots_are_the_pools_not_each_processes() -> None:
    clock, log = FakeClock(), Log()
    _, members = cluster(4, clock, slots=(1, 2, 2))
    tickets = [log.ticket(f"t{i}") for i in range(12)]
    for i, ticket in enumerate(tickets):
        members[i % 4].pool.submit(ticket)
    assert len(log.order) == 5  # 1 + 2 + 2 slots, not 4 x 5
    leader = members[0]
    assert busy(leader) == [1, 2, 2]
    assert len(leader.pool.queue) == 7
    for follower in members[1:]:  # their gauges read 0: the leader reports the pool
        assert busy(follower) == [0, 0, 0]
        assert not follower.pool.queue


def test_warm_workers_and_retries_apply_across_processes() -> None:
    clock, log = FakeClock(), Log()
    _, (p0, p1) = cluster(2, clock, slots=(1, 1), warm_adapters=2)
    p0.pool.workers[1].touch("pixel")  # the leader's view: gpu-1 is warm for pixel
    t = log.ticket("pixel", "pixel")
    p1.pool.submit(t)
    assert t.worker is not None
    assert t.worker.url == URLS[1]
    # A retry that already tried gpu-1 goes to the front, and never to gpu-1.
    hog = log.ticket("hog")
    p0.pool.submit(hog)
    late = log.ticket("late")
    p0.pool.submit(late)
    retry = log.ticket("retry", retry=True, exclude=(p1.pool.workers[1],))
    p1.pool.submit(retry)
    assert next(iter(p0.pool.queue)) is not retry  # the leader queues its own copy
    p0.pool.release(hog, "ok")  # frees gpu-0: the retry's only worker, ahead of `late`
    assert log.order[-1] == "retry"
    assert retry.worker is not None
    assert retry.worker.url == URLS[0]


def test_refusals_cross_the_wire_as_the_same_errors() -> None:
    clock, log = FakeClock(), Log()
    _, (p0, p1) = cluster(2, clock, max_queue=1)
    p0.pool.submit(log.ticket("runs"))
    p0.pool.submit(log.ticket("waits"))
    full = log.ticket("full")
    p1.pool.submit(full)
    assert isinstance(full.error, Overloaded)
    assert "overloaded" in str(full.error.detail)
    for worker in p0.pool.workers:  # the dispatcher's view: no worker in service
        p0.pool.probed(worker, False)
    nothing = log.ticket("nothing")
    p1.pool.submit(nothing)
    assert isinstance(nothing.error, UpstreamError)
    assert nothing.error.cause is Cause.NO_WORKER


def test_a_grant_that_crosses_a_withdrawal_comes_back() -> None:
    clock, log = FakeClock(), Log()
    later: list[Callable[[], None]] = []
    hub = MemoryHub(deliver=later.append)  # every Redis hop waits until the test says
    _, (p0, p1) = cluster(2, clock, hub=hub)

    def hop() -> None:
        while later:
            later.pop(0)()

    held = log.ticket("held")
    p0.pool.submit(held)
    gone = log.ticket("gone")
    p1.pool.submit(gone)
    hop()
    p0.pool.release(held, "ok")  # the leader grants `gone`; the grant is on its way
    p1.pool.withdraw(gone)  # ...while its client leaves
    hop()
    hop()
    assert gone.worker is None
    assert busy(p0) == [0]  # the slot came back
    assert not p0.dispatcher.tickets


def test_an_answer_of_another_epoch_is_void() -> None:
    clock, log = FakeClock(), Log()
    later: list[Callable[[], None]] = []
    hub = MemoryHub(deliver=later.append)
    _, (p0, p1) = cluster(2, clock, hub=hub)
    while later:  # the followers' first sync
        later.pop(0)()
    t = log.ticket("t")
    p1.pool.submit(t)
    later.pop(0)()  # the dispatcher grants; the grant is on its way...
    stale = later.pop(0)
    hub.elect("p0")  # ...when a new epoch starts (a takeover): p1 resends its state
    stale()  # the old grant arrives: void, the sync decides
    assert t.worker is None
    while later:
        later.pop(0)()
    assert t.worker is not None  # granted again in the new epoch, once
    assert busy(p0) == [1]


def test_a_dead_process_returns_its_slots_and_its_waiters_leave() -> None:
    clock, log = FakeClock(), Log()
    hub, (p0, p1, p2) = cluster(3, clock, slots=(2,))
    p1.pool.submit(log.ticket("p1-runs"))
    p1.pool.submit(log.ticket("p1-runs-too"))
    p1.pool.submit(log.ticket("p1-waits"))
    survivor = log.ticket("p2-waits")
    p2.pool.submit(survivor)
    assert busy(p0) == [2]
    hub.kill("p1")
    hub.heartbeat()  # p1 is no longer a member: its slots are freed
    assert log.order == ["p1-runs", "p1-runs-too", "p2-waits"]
    assert survivor.worker is not None
    assert busy(p0) == [1]
    assert "p1" not in hub.records or not hub.records["p1"]


def test_a_takeover_keeps_slots_and_queue_order() -> None:
    clock, log = FakeClock(), Log()
    hub, (p0, p1, p2) = cluster(3, clock, slots=(2,))
    runs = log.ticket("p1-runs")
    p1.pool.submit(runs)
    p0.pool.submit(log.ticket("p0-runs"))
    for member, name in [(p2, "a"), (p1, "b"), (p2, "c")]:
        clock.advance(1)
        member.pool.submit(log.ticket(name))
    hub.kill("p0")  # the dispatcher dies with its slot and its waiters
    hub.heartbeat()
    hub.elect("p2")  # the next heartbeat elects another; followers send their state
    hub.heartbeat()
    p2 = hub.members["p2"]
    assert busy(p2) == [2]  # p1's slot (from the records), then the oldest waiter
    assert log.order == ["p1-runs", "p0-runs", "a"]
    p1.pool.release(runs, "ok")
    assert log.order[-1] == "b"  # b came before c, though c's process now leads
    assert busy(p2) == [2]


def test_share_splits_every_worker_exactly_and_spreads_remainders() -> None:
    for replicas in range(1, 9):
        for slots in range(1, 9):
            parts = [share(slots, replicas, rank, index=3) for rank in range(replicas)]
            assert sum(parts) == slots
            assert max(parts) - min(parts) <= 1
    clock = FakeClock()
    pools = [pool_of(clock, (1, 2, 2)) for _ in range(4)]
    for i, pool in enumerate(pools):
        set_shares(pool, [f"p{k}" for k in range(4)], f"p{i}")
    totals = [sum(pool.workers[w].slots for pool in pools) for w in range(3)]
    assert totals == [1, 2, 2]
    # 5 slots over 8 processes: three have none of their own and keep one each.
    pools = [pool_of(clock, (1, 2, 2)) for _ in range(8)]
    for i, pool in enumerate(pools):
        set_shares(pool, [f"p{k}" for k in range(8)], f"p{i}")
    assert all(sum(w.slots for w in pool.workers) >= 1 for pool in pools)


def test_alone_each_process_keeps_to_its_share_then_rejoins_without_double_count() -> None:
    clock, log = FakeClock(), Log()
    hub, members = cluster(2, clock, slots=(2, 2))
    p0, p1 = members
    running = [log.ticket(f"r{i}") for i in range(3)]
    for i, ticket in enumerate(running):
        members[i % 2].pool.submit(ticket)
    for member in members:  # Redis is gone: each serves alone on its share
        member.become("alone")
    assert [w.slots for w in p0.pool.workers] == [1, 1] == [w.slots for w in p1.pool.workers]
    assert sum(busy(p0)) == 2
    assert sum(busy(p1)) == 1
    for i, ticket in enumerate(running):  # (what it held past its share, it finishes)
        members[i % 2].pool.release(ticket, "ok")
    extra = [log.ticket(f"x{i}") for i in range(6)]
    for i, ticket in enumerate(extra):
        members[i % 2].pool.submit(ticket)
    real = [a + b for a, b in zip(busy(p0), busy(p1), strict=True)]
    assert real == [2, 2]  # each its share of each worker: the 4 real slots, no more
    assert len(p0.pool.queue) == len(p1.pool.queue) == 1
    hub.elect("p1")  # Redis is back: p1 leads, p0 sends its running tries (same ids)
    assert [w.slots for w in p1.pool.workers] == [2, 2]
    assert busy(p1) == [2, 2]
    assert busy(p0) == [0, 0]
    assert len(p1.pool.queue) == 2  # the waiters of both, in one queue again
    for _ in range(6):
        for member in members:
            for ticket in [t for t in member.tries.values() if t.worker is not None]:
                member.pool.release(ticket, "ok")
    assert all(t.worker is not None for t in extra)
    assert busy(p1) == [0, 0]
    assert not p1.pool.queue
    assert not p1.dispatcher.tickets


def test_a_policys_ticket_fields_cross_the_wire() -> None:
    ticket = Ticket("pixel", retry=True, team="vision", steps=30)
    back = ticket_from_wire(wire_fields(ticket, 100.0), 100.0)
    assert (back.adapter, back.retry, back.team, back.steps) == ("pixel", True, "vision", 30)
    assert "notify" not in wire_fields(ticket, 100.0)
    assert "queued_at" not in wire_fields(ticket, 100.0)


def test_a_deadline_crosses_the_wire_as_time_left_not_a_clock_reading() -> None:
    """Monotonic clocks differ between hosts: 5 s left on the sender is 5 s left on
    the receiver, whatever either clock reads."""
    ticket = Ticket("pixel", deadline_at=1005.0)  # sender's clock reads 1000
    back = ticket_from_wire(wire_fields(ticket, 1000.0), 7.0)  # receiver's reads 7
    assert back.deadline_at == 12.0
    assert ticket_from_wire(wire_fields(Ticket("pixel"), 1000.0), 7.0).deadline_at is None


async def test_attempts_hold_slots_through_a_follower() -> None:
    loop = asyncio.get_running_loop()
    hub = MemoryHub(deliver=lambda act: loop.call_soon(act))  # each hop a loop turn
    pools = [pool_of(FakeClock(), (1,), queue_timeout_s=5)]
    pools += [pool_of(FakeClock(), (1,), queue_timeout_s=5)]
    for i, pool in enumerate(pools):
        pool.clock = loop.time
        hub.join(pool, f"p{i}")
    hub.elect("p0")
    inside = peak = 0

    async def one(pool: Pool) -> None:
        nonlocal inside, peak
        with pool.attempt(adapter=None) as attempt:
            async with attempt.slot():
                inside += 1
                peak = max(peak, inside)
                await asyncio.sleep(0.001)
                inside -= 1

    await asyncio.gather(*(one(pools[i % 2]) for i in range(20)))
    assert peak == 1
    assert [w.in_flight for w in pools[0].workers] == [0]


@pytest.mark.parametrize("replicas", [2, 3])
def test_a_leader_that_returns_from_alone_starts_a_new_epoch(replicas: int) -> None:
    clock = FakeClock()
    hub, members = cluster(replicas, clock)
    epoch = members[1].epoch
    hub.elect("p0")
    assert members[1].epoch != epoch
