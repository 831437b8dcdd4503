"""The forward step against real workers on loopback: retries, deadlines, budget,
slots, the queue's 503, and a client leaving while queued."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import httpx
import pytest
from aiohttp import web

from gateway.balancer import Pool
from gateway.errors import UpstreamError
from gateway.pipeline import Pipeline
from gateway.state import served_of
from gateway.testing import (
    JPEG_ANSWER,
    answers,
    delayed,
    fake_worker,
    fake_workers,
    gateway,
    gateway_server,
    held,
    image_ok,
    released_at_exit,
    sleeps,
    trickles,
)
from tests.support import (
    assert_idle,
    body,
    dead_url,
    eventually,
    generate,
    local_pipeline,
    make_registry,
    request,
    the_pool,
)

# -- what is retried -----------------------------------------------------------------


async def test_connection_refused_is_retried_on_another_worker() -> None:
    async with fake_worker(image_ok()) as good:
        registry = make_registry({"p": [dead_url(), good.url]})
        async with local_pipeline(registry) as (pipeline, _):
            results = [await generate(pipeline) for _ in range(10)]
            pool = the_pool(pipeline)
    assert results == ["p-1"] * 10
    assert pool.workers[0].stats.failures >= 1, "the dead worker was tried"
    assert pool.stats.retries_peak == 0, "a refused connection spends no retry budget"


@pytest.mark.parametrize("status", [429, 503])
async def test_turned_away_before_acceptance_is_retried_elsewhere(status: int) -> None:
    async with (
        fake_worker(answers(status, '{"detail":"busy"}')) as busy,
        fake_worker(image_ok()) as good,
    ):
        registry = make_registry({"p": [busy.url, good.url]})
        async with local_pipeline(registry) as (pipeline, _):
            results = [await generate(pipeline) for _ in range(8)]
            assert_idle(the_pool(pipeline))
    assert results == ["p-1"] * 8
    assert len(good.received) == 8
    assert busy.received, "the busy worker was tried"


async def test_a_500_is_retried_once_by_default() -> None:
    handlers = [answers(500, "boom")] * 3
    async with fake_workers(*handlers) as workers:
        registry = make_registry({"p": [w.url for w in workers]})
        async with local_pipeline(registry) as (pipeline, _):
            assert await generate(pipeline) == "UpstreamError:http_5xx"
    assert sum(len(w.received) for w in workers) == 2


async def test_a_500_is_not_retried_where_retry_on_leaves_it_out() -> None:
    async with fake_workers(answers(500, "boom"), answers(500, "boom")) as workers:
        registry = make_registry({"p": [w.url for w in workers]}, retry_on=["timeout"])
        async with local_pipeline(registry) as (pipeline, _):
            assert await generate(pipeline) == "UpstreamError:http_5xx"
    assert sum(len(w.received) for w in workers) == 1


async def test_a_4xx_is_the_clients_and_never_retried_nor_held_against_the_worker() -> None:
    async with fake_workers(*[answers(400, '{"detail":"bad lora"}')] * 2) as workers:
        registry = make_registry({"p": [w.url for w in workers]})
        async with local_pipeline(registry) as (pipeline, _):
            for _ in range(12):
                with pytest.raises(Exception, match="bad lora"):
                    await pipeline.generate(request(), request_id="t")
            pool = the_pool(pipeline)
            assert pool.healthy_count() == 2
            assert [w.stats.failures for w in pool.workers] == [0, 0]
    assert sum(len(w.received) for w in workers) == 12


# -- timeouts --------------------------------------------------------------------------


async def test_a_worker_that_trickles_bytes_ends_at_the_deadline_with_504() -> None:
    async with fake_worker(trickles(0.02)) as slow:
        registry = make_registry({"p": [slow.url]}, timeout_s=0.3)
        async with gateway(registry) as gw:
            resp = await gw.client.post("/v1/images/generations", json=body())
            assert_idle(the_pool(gw.pipeline))
    assert resp.status_code == 504
    assert "worker p-0" in resp.json()["detail"]


async def test_a_try_that_times_out_is_retried_once_on_another_worker() -> None:
    async with fake_workers(sleeps(0.6), image_ok()) as workers:
        specs = [{"url": w.url, "weight": 1000 if i == 0 else 0.001} for i, w in enumerate(workers)]
        registry = make_registry({"p": specs}, per_try_timeout_s=0.1, timeout_s=3)
        async with local_pipeline(registry) as (pipeline, _):
            assert await generate(pipeline) == "p-1"
            pool = the_pool(pipeline)
            assert pool.stats.retries == 1
            assert pool.workers[0].stats.failures == 1


# -- the retry budget ------------------------------------------------------------------


async def test_the_retry_budget_holds_under_an_all_500_pool() -> None:
    slow_500 = delayed(answers(500, "boom"), 0.05)
    async with fake_workers(*[slow_500] * 4) as workers:
        registry = make_registry(
            {"p": [{"url": w.url, "max_concurrency": 50} for w in workers]},
            max_retries=3,
            retry_on=["5xx"],
            max_accepted_retries=3,
            health={"consecutive_failures": 1000},
        )
        async with local_pipeline(registry) as (pipeline, _):
            results = await asyncio.gather(*(generate(pipeline) for _ in range(60)))
            pool = the_pool(pipeline)
            assert_idle(pool)
    assert Counter(results) == {"UpstreamError:http_5xx": 60}
    # At most 20% of the 60 active requests (12) retrying at any moment...
    assert 3 <= pool.stats.retries_peak <= 12
    assert pool.stats.retries_denied > 0
    # ...so the workers saw far fewer than the 60 x 4 tries an unbudgeted pool would.
    tries = sum(len(w.received) for w in workers)
    assert tries == 60 + pool.stats.retries
    assert tries < 60 * 2


# -- under load, with a worker that dies -----------------------------------------------


async def test_a_worker_killed_under_load_costs_no_client_errors() -> None:
    # Each takes 20 ms a generation; kill() cuts its connections and closes its port
    # as a SIGKILL to a worker process would.
    async with fake_workers(sleeps(0.02), sleeps(0.02), sleeps(0.02)) as sims:
        registry = make_registry({"p": [{"url": s.url, "max_concurrency": 2} for s in sims]})
        async with local_pipeline(registry) as (pipeline, _):
            done: list[str] = []

            async def client(n: int) -> None:
                for i in range(n):
                    done.append(await generate(pipeline, seed=i))

            clients = [asyncio.create_task(client(25)) for _ in range(6)]
            await eventually(lambda: len(done) >= 30)
            await sims[0].kill()
            await asyncio.gather(*clients)
            pool = the_pool(pipeline)
            assert_idle(pool)
    assert len(done) == 150
    assert all(name.startswith("p-") for name in done), Counter(done)
    assert "p-0" in done, "the killed worker served before it died"
    assert pool.workers[0].stats.failures >= 1


async def test_no_slot_leaks_after_1000_mixed_successes_failures_and_cancellations() -> None:
    rng = random.Random(3)

    async def mixed(request: web.Request) -> web.StreamResponse:
        roll = rng.random()
        if roll < 0.15:
            return web.Response(status=500, text="boom")
        if roll < 0.25:
            return web.Response(status=503, text="busy")
        await asyncio.sleep(rng.choice([0, 0.001, 0.005]))
        return web.Response(body=JPEG_ANSWER, content_type="application/json")

    async with fake_workers(mixed, mixed) as workers:
        specs = [{"url": w.url, "max_concurrency": 3} for w in workers] + [dead_url()]
        registry = make_registry({"p": specs}, max_queue=1000)
        async with local_pipeline(registry) as (pipeline, _):
            outcomes = await _mixed_load(pipeline, rng, total=1000, concurrent=40)
            pool = the_pool(pipeline)
            assert_idle(pool)
    assert sum(outcomes.values()) == 1000
    assert outcomes["ok"] > 500
    assert outcomes["cancelled"] > 50
    assert outcomes["http_5xx"] > 0


async def _mixed_load(
    pipeline: Pipeline, rng: random.Random, *, total: int, concurrent: int
) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    gate = asyncio.Semaphore(concurrent)

    async def one() -> None:
        async with gate:
            task = asyncio.create_task(pipeline.generate(request(), request_id="t"))
            if rng.random() < 0.1:  # a client that gives up at a random moment
                await asyncio.sleep(rng.choice([0, 0.001, 0.003]))
                task.cancel()
            try:
                await task
                outcomes["ok"] += 1
            except asyncio.CancelledError:
                outcomes["cancelled"] += 1
            except UpstreamError as exc:
                outcomes[exc.reason] += 1

    await asyncio.gather(*(one() for _ in range(total)))
    return outcomes


# -- the queue, seen by a client -------------------------------------------------------


async def test_a_full_queue_and_a_long_wait_are_503_with_retry_after() -> None:
    release = asyncio.Event()
    async with fake_worker(held(release)) as worker:
        registry = make_registry({"p": [worker.url]}, max_queue=1, queue_timeout_s=0.2)
        async with gateway(registry) as gw, released_at_exit(release):
            post = gw.client.post
            first = asyncio.create_task(post("/v1/images/generations", json=body()))
            await eventually(lambda: len(worker.received) == 1)
            queued = asyncio.create_task(post("/v1/images/generations", json=body()))
            await eventually(lambda: len(the_pool(gw.pipeline).queue) == 1)
            refused = await post("/v1/images/generations", json=body())
            timed_out = await queued
            release.set()
            assert (await first).status_code == 200
            assert_idle(the_pool(gw.pipeline))
    for resp, why in ((refused, "requests waiting"), (timed_out, "no free worker within")):
        assert resp.status_code == 503
        assert int(resp.headers["retry-after"]) >= 1
        assert why in resp.json()["detail"]


async def test_a_client_that_disconnects_while_queued_takes_no_slot() -> None:
    release = asyncio.Event()
    async with fake_worker(held(release)) as worker:
        registry = make_registry({"p": [worker.url]})
        async with (
            gateway_server(registry) as (url, app),
            httpx.AsyncClient(base_url=url) as client,
            released_at_exit(release),
        ):
            pool: Pool = served_of(app).pipeline.balancer.pool("p")
            post = client.post
            first = asyncio.create_task(post("/v1/images/generations", json=body(prompt="A")))
            await eventually(lambda: len(worker.received) == 1)
            with pytest.raises(httpx.ReadTimeout):  # B gives up and hangs up while queued
                await post("/v1/images/generations", json=body(prompt="B"), timeout=0.3)
            await eventually(lambda: not pool.queue)
            release.set()
            assert (await first).status_code == 200
            third = await post("/v1/images/generations", json=body(prompt="C"))
            assert third.status_code == 200
            assert_idle(pool)
    assert [r["prompt"] for r in worker.received] == ["A", "C"]
