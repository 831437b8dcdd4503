"""The result cache through the whole gateway: real sim workers, a real redis-server."""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from gateway.metrics import Metrics
from gateway.state import state_of
from gateway.testing import (
    ServedSim,
    fake_worker,
    gateway,
    gateway_client,
    held,
    image_answer,
    image_ok,
    registry_yaml,
    released_at_exit,
)
from tests.support import (
    blackhole,
    body,
    eventually,
    gateway_process,
    generations,
    make_registry,
    redis_cache,
    redis_server,
)

PATH = "/v1/images/generations"


async def post(
    client: httpx.AsyncClient, *, headers: dict[str, str] | None = None, **fields: Any
) -> httpx.Response:
    resp = await client.post(PATH, json=body(**fields), headers=headers)
    assert resp.status_code == 200, resp.text
    return resp


def metric(app: Starlette, name: str, **labels: str) -> float:
    """A series from the app's /metrics registry, summed over the labels not given."""
    metrics: Metrics = state_of(app).metrics
    return sum(
        float(sample.value)
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def pools(workers: list[ServedSim]) -> dict[str, Sequence[str | dict[str, Any]]]:
    return {"sdxl": [worker.url for worker in workers]}


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_miss_then_hit_returns_the_workers_bytes_untouched(
    backend: str, fast_sims: list[ServedSim], request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_url") if backend == "redis" else None
    cache = redis_cache(url) if url else None
    registry = make_registry(pools(fast_sims), cache=cache)
    async with httpx.AsyncClient() as worker:  # what the gateway forwards, sent directly
        as_forwarded = body(seed=11, model=None, response_format="jpeg")
        direct = await worker.post(fast_sims[0].url + PATH, json=as_forwarded)
    before = generations(fast_sims)
    async with gateway_client(registry) as client:
        miss = await post(client, seed=11)
        hit = await post(client, seed=11)
    assert (miss.headers["x-cache"], hit.headers["x-cache"]) == ("miss", "hit")
    assert hit.headers["x-seed"] == "11"
    assert hit.content == miss.content == direct.content, "bytes in, bytes out"
    assert generations(fast_sims) - before == 1


async def test_a_seedless_request_is_cached_under_the_seed_it_was_given(
    fast_sims: list[ServedSim],
) -> None:
    async with gateway_client(make_registry(pools(fast_sims))) as client:
        first = await post(client, prompt="a seedless fox")
        seed = int(first.headers["x-seed"])
        again = await post(client, prompt="a seedless fox", seed=seed)
        other = await post(client, prompt="a seedless fox")
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    assert again.content == first.content
    assert other.headers["x-cache"] == "miss", "no seed: a new random one, a new image"


async def test_no_cache_regenerates_and_stores_no_store_does_neither(
    fast_sims: list[ServedSim], redis_url: str
) -> None:
    registry = make_registry(pools(fast_sims), cache=redis_cache(redis_url))
    before = generations(fast_sims)
    async with gateway_client(registry) as client:
        assert (await post(client, seed=1)).headers["x-cache"] == "miss"
        fresh = await post(client, seed=1, headers={"Cache-Control": "no-cache"})
        assert fresh.headers["x-cache"] == "bypass"
        assert (await post(client, seed=1)).headers["x-cache"] == "hit"
        assert generations(fast_sims) - before == 2

        nostore = await post(client, seed=2, headers={"Cache-Control": "no-store"})
        assert nostore.headers["x-cache"] == "bypass"
        assert (await post(client, seed=2)).headers["x-cache"] == "miss", "nothing stored"
        cached = await post(client, seed=2, headers={"cache-control": "no-store"})
        assert cached.headers["x-cache"] == "bypass", "nothing read either"
        assert generations(fast_sims) - before == 5


async def test_entries_expire_after_their_ttl(fast_sims: list[ServedSim], redis_url: str) -> None:
    # No race with the TTL: the entry is stored, Redis drops it on its own (watched,
    # not slept on), and the next request misses. Hits while fresh: the tests above.
    namespace = f"ttl-{secrets.token_hex(4)}"
    cache = redis_cache(redis_url, ttl_s=0.3, namespace=namespace)
    entries = redis.Redis.from_url(redis_url)
    try:
        async with gateway(make_registry(pools(fast_sims), cache=cache)) as gw:
            assert (await post(gw.client, seed=3)).headers["x-cache"] == "miss"
            assert metric(gw.app, "gateway_cache_stores_total", result="stored") == 1
            await eventually(lambda: not entries.keys(f"{namespace}:*"))
            assert (await post(gw.client, seed=3)).headers["x-cache"] == "miss"
    finally:
        entries.close()


async def test_a_revision_bump_never_serves_old_entries(
    fast_sims: list[ServedSim], redis_url: str
) -> None:
    def registry(revision: str) -> Any:
        adapter = {"name": "sdxl", "pool": "sdxl", "default": True, "revision": revision}
        return make_registry(pools(fast_sims), [adapter], cache=redis_cache(redis_url))

    async with gateway_client(registry("1")) as client:
        assert (await post(client, seed=4)).headers["x-cache"] == "miss"
        assert (await post(client, seed=4)).headers["x-cache"] == "hit"
    async with gateway_client(registry("2")) as client:
        assert (await post(client, seed=4)).headers["x-cache"] == "miss"
        assert (await post(client, seed=4)).headers["x-cache"] == "hit"


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_entries_over_max_entry_bytes_are_not_stored(
    backend: str, fast_sims: list[ServedSim], request: pytest.FixtureRequest
) -> None:
    cache: dict[str, Any] = {"max_entry_bytes": 100}
    if backend == "redis":
        cache = redis_cache(request.getfixturevalue("redis_url"), **cache)
    async with gateway(make_registry(pools(fast_sims), cache=cache)) as gw:
        assert (await post(gw.client, seed=5)).headers["x-cache"] == "miss"
        assert (await post(gw.client, seed=5)).headers["x-cache"] == "miss"
        assert metric(gw.app, "gateway_cache_stores_total", result="too_big") == 2
        assert metric(gw.app, "gateway_cache_stores_total", result="stored") == 0


async def test_a_disabled_cache_says_bypass_and_stores_nothing(
    fast_sims: list[ServedSim],
) -> None:
    registry = make_registry(pools(fast_sims), cache={"enabled": False})
    async with gateway_client(registry) as client:
        for _ in range(2):
            assert (await post(client, seed=6)).headers["x-cache"] == "bypass"


BIG = image_answer("jpeg", side=500)  # about 300 KB, like a 1024px JPEG in base64


async def test_a_tiny_redis_with_allkeys_lru_evicts_and_keeps_serving() -> None:
    lru = ["--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru"]
    with redis_server(*lru) as server:
        async with fake_worker(image_ok(BIG)) as worker:
            registry = make_registry({"sdxl": [worker.url]}, cache=redis_cache(server.url))
            async with gateway(registry) as gw:
                for seed in range(30):
                    assert (await post(gw.client, seed=seed)).content == BIG
                assert (await post(gw.client, seed=29)).headers["x-cache"] == "hit"
                assert (await post(gw.client, seed=0)).headers["x-cache"] == "miss", "evicted"
                assert metric(gw.app, "gateway_cache_errors_total") == 0
                assert metric(gw.app, "gateway_cache_stores_total", result="stored") == 31
        assert server.info("stats")["evicted_keys"] > 0
        assert server.info("memory")["used_memory"] <= 4 * 2**20 + 300_000


async def test_a_full_redis_that_refuses_writes_never_fails_a_request() -> None:
    with redis_server("--maxmemory", "2mb", "--maxmemory-policy", "noeviction") as server:
        async with fake_worker(image_ok(BIG)) as worker:
            registry = make_registry({"sdxl": [worker.url]}, cache=redis_cache(server.url))
            async with gateway(registry) as gw:
                for seed in range(15):
                    assert (await post(gw.client, seed=seed)).content == BIG
                refused = metric(gw.app, "gateway_cache_errors_total", op="set")
                assert refused >= 1, "OOM refusals were counted"


async def test_redis_killed_mid_run_then_back(fast_sims: list[ServedSim]) -> None:
    cooldown = 0.3
    with redis_server() as server:
        # Refused connections fail at once; the timeouts only need to outlast a busy CI
        # machine once Redis is back.
        timeouts = {"timeout_ms": 250, "connect_timeout_ms": 250}
        cache = {"url": server.url, "cooldown_s": cooldown, "failure_threshold": 3, **timeouts}
        async with gateway(make_registry(pools(fast_sims), cache=cache)) as gw:
            await post(gw.client, seed=1)
            assert (await post(gw.client, seed=1)).headers["x-cache"] == "hit"

            server.kill()
            started = time.monotonic()
            for seed in range(20):
                resp = await post(gw.client, seed=seed)
                assert resp.headers["x-cache"] in ("miss", "bypass")
            elapsed = time.monotonic() - started
            errors = metric(gw.app, "gateway_cache_errors_total")
            # Three failures open the breaker; after that, one probe per cool-down.
            assert 3 <= errors <= 3 + math.ceil(elapsed / cooldown)

            server.start()
            # Back after a cool-down and a probe that reaches it; a probe that a busy
            # machine makes time out only starts another cool-down, so ask until a hit.
            async with asyncio.timeout(20):
                while (await post(gw.client, seed=100)).headers["x-cache"] != "hit":  # noqa: ASYNC110
                    await asyncio.sleep(cooldown / 3)  # a request each time, not a flag


async def test_a_redis_that_never_answers_costs_at_most_its_timeouts(
    fast_sims: list[ServedSim],
) -> None:
    with blackhole() as url:
        cache = {"url": url, "timeout_ms": 50, "connect_timeout_ms": 50, "cooldown_s": 60}
        async with gateway(make_registry(pools(fast_sims), cache=cache)) as gw:

            async def timed(seed: int) -> None:
                await post(gw.client, seed=seed)

            # Concurrent first calls each wait out their own timeout, once (a hang
            # would be the failure: the bound is generous, not a speed figure).
            async with asyncio.timeout(10):
                await asyncio.gather(*(timed(seed) for seed in range(20)))
            errors = metric(gw.app, "gateway_cache_errors_total")
            assert errors >= 3, "the breaker opened on timeouts"
            for seed in range(20, 30):
                await post(gw.client, seed=seed)
            # The breaker is open: no cache call at all (a count, not a clock).
            assert metric(gw.app, "gateway_cache_errors_total") == errors
            assert metric(gw.app, "gateway_cache_requests_total", result="bypass") == 10


async def test_fifty_identical_requests_make_one_generation(
    fast_sims: list[ServedSim], redis_url: str
) -> None:
    registry = make_registry(pools(fast_sims), cache=redis_cache(redis_url))
    before = generations(fast_sims)
    async with gateway(registry) as gw:
        same = body(seed=8, num_inference_steps=50)  # 50 ms at 1 ms a step
        responses = await asyncio.gather(*(gw.client.post(PATH, json=same) for _ in range(50)))
    assert {r.status_code for r in responses} == {200}, {r.text for r in responses}
    assert len({r.content for r in responses}) == 1
    assert generations(fast_sims) - before == 1
    local = metric(gw.app, "gateway_coalesced_requests_total", scope="local")
    assert local + metric(gw.app, "gateway_cache_requests_total", result="hit") == 49
    assert local > 0, "they were in flight together"


async def test_a_failed_generation_fails_its_coalesced_requests_cleanly() -> None:
    release = asyncio.Event()

    async def fails_when_released(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=500, text="boom")

    async with fake_worker(fails_when_released) as worker, released_at_exit(release):
        registry = make_registry({"sdxl": [worker.url]})
        async with gateway(registry) as gw, asyncio.timeout(10):
            sent = [asyncio.create_task(gw.client.post(PATH, json=body(seed=9))) for _ in range(5)]
            # The worker holds the one generation until all five are in flight together.
            coalesced = "gateway_coalesced_requests_total"
            await eventually(lambda: worker.calls == 1 and metric(gw.app, coalesced) == 4)
            release.set()
            responses = await asyncio.gather(*sent)
    assert len(worker.received) == 1
    assert {r.status_code for r in responses} == {502}
    assert {r.json()["detail"] for r in responses} == {"adapter 'sdxl': worker sdxl-0: HTTP 500"}


async def test_two_gateway_processes_sharing_redis_make_one_generation(
    redis_url: str, tmp_path: Path
) -> None:
    """50 identical requests over two processes: one generation, and the process that
    did not lead waited on the other through Redis (its `remote` count), which a late
    cache hit alone would not show. The worker holds its answer until all 50 have
    joined a flight (each process's counters say so), never for a guessed time."""
    release = asyncio.Event()
    async with fake_worker(held(release)) as worker, released_at_exit(release):
        config = tmp_path / "adapters.yaml"
        config.write_text(registry_yaml({"sdxl": [worker.url]}, cache=redis_cache(redis_url)))
        no_drain = ("--drain-grace-s", "0")  # nothing to drain at the end: stop at once
        with (
            gateway_process(str(config), *no_drain) as first,
            gateway_process(str(config), *no_drain) as second,
        ):
            urls = (first, second)
            # Each process takes the worker in service after its first good probe.
            await until(lambda: all(in_service(u, "sdxl") for u in urls))
            same = body(seed=10, num_inference_steps=50)
            async with httpx.AsyncClient(timeout=30) as client:
                sends = [asyncio.create_task(client.post(u + PATH, json=same)) for u in urls * 25]

                def joined() -> float:
                    texts = [httpx.get(u + "/metrics", timeout=5).text for u in urls]
                    return sum(scraped(t, "gateway_coalesced_requests_total") for t in texts)

                await until(lambda: worker.calls == 1 and joined() == 48)
                release.set()
                responses = await asyncio.gather(*sends)
                scrapes = [(await client.get(url + "/metrics")).text for url in urls]
    assert {r.status_code for r in responses} == {200}, {r.text for r in responses}
    assert len({r.content for r in responses}) == 1
    assert len(worker.received) == 1
    remote = [scraped(text, "gateway_coalesced_requests_total", scope="remote") for text in scrapes]
    local = [scraped(text, "gateway_coalesced_requests_total", scope="local") for text in scrapes]
    assert sorted(remote) == [0, 1], remote  # the follower's lead waited on the leader
    assert sum(local) == 48, local  # every other request joined its own process's flight


async def until(condition: Callable[[], bool], within_s: float = 30) -> None:
    """`eventually`, with `condition` (blocking HTTP calls) in a thread: this loop
    serves the fake worker, whose health probes must not wait on the test."""
    async with asyncio.timeout(within_s):
        while not await asyncio.to_thread(condition):  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def in_service(url: str, pool: str) -> bool:
    return httpx.get(f"{url}/readyz?pool={pool}", timeout=5).status_code == 200


def scraped(text: str, name: str, **labels: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def test_a_reload_that_changes_the_cache_section_says_it_needs_a_restart(
    fast_sims: list[ServedSim], caplog: pytest.LogCaptureFixture
) -> None:
    registry = make_registry(pools(fast_sims))
    async with gateway(registry) as gw:
        same_cache = make_registry(pools(fast_sims), timeout_s=60)
        gw.pipeline.use_registry(same_cache)
        assert "cache section changed" not in caplog.text
        gw.pipeline.use_registry(make_registry(pools(fast_sims), cache={"ttl_s": 60}))
        assert "cache section changed: it applies at the next restart" in caplog.text
        assert (await post(gw.client, seed=12)).headers["x-cache"] == "miss"  # still serving
