from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from gateway.balancer import Worker
from gateway.health import State, WorkerHealth, ejection_allowed
from gateway.registry import HealthSpec
from gateway.simworker import SimConfig
from gateway.testing import fake_worker, gateway, image_ok, sim_worker
from tests.support import (
    FakeClock,
    body,
    dead_url,
    eventually,
    generate,
    local_pipeline,
    make_registry,
    request,
    the_pool,
)


def test_consecutive_failures_eject_for_a_growing_capped_time() -> None:
    clock = FakeClock()
    spec = HealthSpec(consecutive_failures=3, base_ejection_s=30, max_ejection_s=75)
    health, peers = WorkerHealth(spec), [WorkerHealth(spec) for _ in range(3)]
    lengths = []
    for _ in range(3):
        assert not health.failed(clock(), peers=[health, *peers])
        assert not health.failed(clock(), peers=[health, *peers])
        assert health.in_service
        assert health.failed(clock(), peers=[health, *peers]), "the third in a row ejects"
        assert health_state(health) is State.EJECTED
        lengths.append(health.ejected_until - clock())
        clock.advance(health.ejected_until - clock())
        health.probed(True, clock())
        health.probed(True, clock())
        assert health_state(health) is State.HEALTHY
    assert lengths == [30, 60, 75], "base x ejections, capped at max_ejection_s"


def test_a_success_resets_the_count() -> None:
    spec = HealthSpec(consecutive_failures=2)
    health, peer = WorkerHealth(spec), WorkerHealth(spec)
    for _ in range(5):
        assert not health.failed(0, peers=[health, peer])
        health.succeeded(0)
    assert health_state(health) is State.HEALTHY


def test_probes_during_an_ejection_do_not_cut_it_short() -> None:
    spec = HealthSpec(consecutive_failures=1, base_ejection_s=10, healthy_threshold=2)
    health, peer = WorkerHealth(spec), WorkerHealth(spec)
    assert health.failed(0, peers=[health, peer])
    for now in (0, 5, 9.9):
        health.probed(True, now)
        assert health_state(health) is State.EJECTED
    health.probed(False, 10)
    health.probed(True, 11)
    assert health_state(health) is State.EJECTED, "good probes must be in a row"
    health.probed(True, 12)
    assert health_state(health) is State.HEALTHY


@pytest.mark.parametrize(
    ("workers", "out", "percent", "allowed"),
    [
        (1, 0, 100, False),  # the only worker always stays in
        (2, 0, 50, True),
        (2, 1, 100, False),  # ...and the last one in service
        (4, 1, 50, True),
        (4, 2, 50, False),
        (10, 0, 0, True),  # at least one, as Envoy
        (10, 1, 10, False),
    ],
)
def test_ejection_cap(workers: int, out: int, percent: int, allowed: bool) -> None:
    spec = HealthSpec(max_ejection_percent=percent)
    peers = [WorkerHealth(spec) for _ in range(workers)]
    for peer in peers[:out]:
        peer.state = State.EJECTED
    assert ejection_allowed(peers, spec) is allowed


async def test_ejection_and_readmission_at_the_configured_counts() -> None:
    """A real sim worker failing every request is ejected after exactly
    consecutive_failures tries, and back after its ejection time and
    healthy_threshold good probes (the fake clock stands in for the waits)."""
    base = SimConfig(step_ms=1, size=64)
    async with (
        sim_worker(dataclasses.replace(base, fail_rate=1)) as bad,
        sim_worker(base) as good,
    ):
        clock = FakeClock()
        health = {"consecutive_failures": 3, "base_ejection_s": 10, "probe_interval_s": 4}
        # All but certain to try the bad worker first while it is in (weight breaks ties).
        specs = [{"url": bad.url, "weight": 1000}, {"url": good.url, "weight": 0.001}]
        registry = make_registry({"p": specs}, health=health)
        async with local_pipeline(registry, clock=clock) as (pipeline, prober):
            pool = the_pool(pipeline)
            results = [await generate(pipeline, seed=i) for i in range(6)]
            flaky = pool.workers[0]
            assert results == ["p-1"] * 6, "each failure was retried on the good worker"
            assert bad.stats()["failures"] == 3
            assert state(flaky) is State.EJECTED
            assert pool.stats.ejections == 1

            for step in (0, 4, 4):  # probes at +0, +4, +8: good, but the 10 s are not over
                clock.advance(step)
                await prober.probe_due()
                assert state(flaky) is State.EJECTED
            clock.advance(4)  # +12: over, and its probes were good
            await prober.probe_due()
            assert state(flaky) is State.HEALTHY
            assert await generate(pipeline, seed=99) == "p-1"
            assert bad.stats()["failures"] == 4, "readmitted: tried again"


async def test_the_cap_keeps_one_worker_in_until_its_probe_says_it_is_down() -> None:
    clock = FakeClock()
    registry = make_registry({"p": [dead_url(), dead_url()]}, health={"consecutive_failures": 2})
    async with local_pipeline(registry, clock=clock) as (pipeline, prober):
        pool = the_pool(pipeline)
        for _ in range(3):
            assert await generate(pipeline) == "UpstreamError:connect"
        states = sorted(w.health.state.value for w in pool.workers)
        assert states == ["ejected", "unknown"], "half of two may go; the other stays in"
        assert pool.healthy_count() == 1
        await prober.probe_due()
        assert [w.health.state for w in pool.workers].count(State.DOWN) == 1
        assert pool.healthy_count() == 0
        with pytest.raises(Exception, match="no healthy worker"):
            await pipeline.generate(request(), request_id="t")


async def test_a_pool_without_a_healthy_worker_is_unready_alone() -> None:
    async with (
        fake_worker(image_ok()) as up,
        fake_worker(image_ok()) as flaky,
    ):
        flaky.healthy = False
        adapters: list[dict[str, Any]] = [
            {"name": "a", "pool": "up", "default": True},
            {"name": "b", "pool": "flaky"},
        ]
        health = {"probe_interval_s": 0.02, "healthy_threshold": 2}
        registry = make_registry({"up": [up.url], "flaky": [flaky.url]}, adapters, health=health)
        async with gateway(registry) as gw:
            await eventually(lambda: flaky.probes >= 1)
            await eventually(lambda: gw.pipeline.balancer.pool("flaky").healthy_count() == 0)
            assert (await gw.client.get("/readyz")).status_code == 200  # the process serves
            resp = await gw.client.get("/readyz?pool=flaky")
            assert (resp.status_code, resp.json()["healthy"]) == (503, 0)
            flaky.healthy = True
            await eventually(lambda: gw.pipeline.balancer.pool("flaky").healthy_count() == 1)
            assert (await gw.client.get("/readyz?pool=flaky")).status_code == 200
            resp = await gw.client.post("/v1/images/generations", json=body(model="b"))
            assert resp.status_code == 200


def state(worker: Worker) -> State:
    return health_state(worker.health)


def health_state(health: WorkerHealth) -> State:
    return health.state  # read afresh: mypy would narrow an attribute across calls
