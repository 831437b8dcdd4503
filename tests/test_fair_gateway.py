"""Fair sharing through a real gateway: two API keys on a one-slot pool, the deadline
header, GPU time per team in /metrics, teams and weights in adapters.yaml."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from gateway.balancer import Pool
from gateway.errors import ConfigError
from gateway.state import served_of
from gateway.testing import (
    Answer,
    Handler,
    fake_worker,
    gateway_server,
    registry_yaml,
    released_at_exit,
)
from tests.support import api_key, bearer, body, eventually, gateway_from_file, make_registry

GEN = "/v1/images/generations"
HEAVY, LIGHT = "gw_heavy-test-key", "gw_light-test-key"


def fair_registry(
    worker_url: str, *, light: dict[str, Any] | None = None, **pool_options: Any
) -> str:
    """One pool of one slot; two keys: "batch-job" of team "research", and "web-app"
    (no team: a team of its own) with `light`'s settings."""
    auth = {
        "keys": [
            api_key("batch-job", HEAVY, team="research"),
            api_key("web-app", LIGHT, **(light or {})),
        ]
    }
    return registry_yaml(
        {"p": [{"url": worker_url, "max_concurrency": 1}]},
        sections={"auth": auth, "teams": {"research": {"weight": 1}}},
        **pool_options,
    )


def series(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {
        frozenset(s.labels.items()): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def gated(release: asyncio.Event, seconds: float) -> Handler:
    """A worker that holds every request until `release` is set, then takes `seconds`
    over each: the test decides when the first slot frees."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return await Answer(delay_s=seconds)(request)

    return handler


def pool_of(app: Starlette) -> Pool:
    return served_of(app).pipeline.balancer.pool("p")


def post(client: httpx.AsyncClient, key: str, **headers: str) -> Callable[..., Any]:
    async def send(**fields: Any) -> httpx.Response:
        return await client.post(GEN, json=body(**fields), headers={**bearer(key), **headers})

    return send


async def test_the_light_key_is_served_between_the_heavy_keys_requests() -> None:
    release = asyncio.Event()
    async with (
        fake_worker(gated(release, 0.3)) as worker,
        released_at_exit(release),
        gateway_server(fair_registry(worker.url)) as (url, app),
        httpx.AsyncClient(base_url=url, timeout=60) as client,
    ):
        heavy, light = post(client, HEAVY), post(client, LIGHT)
        burst = [asyncio.create_task(heavy(prompt=f"heavy {i}", seed=i)) for i in range(4)]
        await eventually(lambda: len(pool_of(app).queue) == 3)
        waiting = asyncio.create_task(light(prompt="light", seed=99))
        await eventually(lambda: len(pool_of(app).queue) == 4)
        release.set()  # the first heavy request ends: who gets the slot?
        alone = await waiting
        answers = await asyncio.gather(*burst)
        again = await light(prompt="light", seed=99)  # from the cache: no GPU time
        text = (await client.get("/metrics")).text
    assert alone.status_code == 200
    assert [a.status_code for a in answers] == [200] * 4
    assert again.headers["X-Cache"] == "hit"
    prompts = [received["prompt"] for received in worker.received]
    # One heavy request held the slot and three waited when the light one came; FIFO
    # would serve it fifth. It is second: at the first free slot.
    assert prompts[1] == "light", prompts
    assert prompts[0].startswith("heavy")

    gpu = series(text, "gateway_gpu_seconds_total")
    images = series(text, "gateway_images_total")
    research = frozenset({("team", "research"), ("adapter", "p")})
    web = frozenset({("team", "web-app"), ("adapter", "p")})
    assert images == {research: 4.0, web: 1.0}  # team names, never a key's value
    assert gpu[research] >= 4 * 0.3
    assert 0.3 <= gpu[web] < gpu[research]
    assert series(text, "gateway_cache_hit_images_total") == {web: 1.0}
    saved = series(text, "gateway_cache_saved_gpu_seconds_total")[web]
    assert saved > 0.1  # 4 steps at the pool's observed seconds per step (~0.3 s / 4)


async def test_a_deadline_the_queue_cannot_meet_is_refused_at_once() -> None:
    release = asyncio.Event()
    release.set()
    async with (
        fake_worker(gated(release, 0.3)) as worker,
        released_at_exit(release),
        gateway_server(fair_registry(worker.url)) as (url, app),
        httpx.AsyncClient(base_url=url, timeout=60) as client,
    ):
        heavy = post(client, HEAVY)
        assert (await heavy(seed=1)).status_code == 200  # the pool has timed a step now
        release.clear()  # from now on the slot stays taken until the test says
        burst = [asyncio.create_task(heavy(seed=10 + i)) for i in range(4)]
        await eventually(lambda: len(pool_of(app).queue) == 3)
        # Behind its own team's three (about 0.9 s of work, and 0.3 s running).
        late = await post(client, HEAVY, **{"X-Request-Deadline-Ms": "500"})(seed=20)
        bad = await post(client, HEAVY, **{"X-Request-Deadline-Ms": "soon"})(seed=21)
        release.set()
        await asyncio.gather(*burst)
        text = (await client.get("/metrics")).text
    assert late.status_code == 503
    # Refused at submit, by prediction (not left to expire in the queue: that 503
    # says "could not start"):
    assert "after the work queued ahead of it" in late.json()["detail"], late.json()
    assert int(late.headers["Retry-After"]) >= 1
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["header", "X-Request-Deadline-Ms"]
    rejected = series(text, "gateway_queue_rejections_total")
    assert rejected[frozenset({("pool", "p"), ("reason", "deadline")})] == 1
    assert {r["seed"] for r in worker.received} == {1, 10, 11, 12, 13}


async def test_a_keys_default_deadline_takes_it_out_of_the_queue(tmp_path: Path) -> None:
    release = asyncio.Event()
    async with fake_worker(gated(release, 0.0)) as worker, released_at_exit(release):
        text = fair_registry(worker.url, light={"deadline_ms": 300})
        async with gateway_from_file(tmp_path / "adapters.yaml", text) as gw:
            hold = asyncio.create_task(
                gw.client.post(GEN, json=body(seed=1), headers=bearer(HEAVY))
            )
            await eventually(lambda: worker.calls == 1)
            # Nothing timed yet, so no prediction: it waits, and leaves at 300 ms.
            late = await gw.client.post(GEN, json=body(seed=2), headers=bearer(LIGHT))
            release.set()
            assert (await hold).status_code == 200
    assert late.status_code == 503
    assert "could not start this request by its deadline" in late.json()["detail"]
    assert [r["seed"] for r in worker.received] == [1]


def test_teams_weights_and_key_settings_are_read_and_checked() -> None:
    auth = {
        "keys": [
            api_key("a", "gw_a-key", team="vision", priority="batch", deadline_ms=20000),
            api_key("b", "gw_b-key"),
            api_key("c", "gw_c-key", weight=3),
        ]
    }
    registry = make_registry(
        {"p": ["http://127.0.0.1:1"]},
        sections={"auth": auth, "teams": {"vision": {"weight": 2.5}}},
        batch_aging_s=30,
    )
    a, b, c = registry.auth.keys if registry.auth else ()
    assert (registry.team_of(a), registry.team_of(b), registry.team_of(None)) == (
        "vision",
        "b",
        "default",
    )
    assert (registry.team_weight("vision"), registry.team_weight("b")) == (2.5, 1.0)
    assert [registry.weight_of(k) for k in (a, b, c, None)] == [2.5, 1.0, 3.0, 1.0]
    assert (a.priority, a.deadline_ms, b.priority) == ("batch", 20000, "interactive")
    assert registry.team_names == {"vision", "b", "c", "default"}
    assert registry.team_label("someone") == "other"
    assert registry.pools["p"].batch_aging_s == 30
    auth["keys"][2]["team"] = "vision"  # a team's key takes the team's weight
    with pytest.raises(ConfigError, match=r"auth\.keys\.2\.weight: a key of team 'vision'"):
        make_registry(
            {"p": ["http://127.0.0.1:1"]},
            sections={"auth": auth, "teams": {"vision": {"weight": 2.5}}},
        )
    del auth["keys"][2]
    auth["keys"][1]["team"] = "visoin"
    with pytest.raises(ConfigError, match=r"auth\.keys\.1\.team: unknown team 'visoin'"):
        make_registry(
            {"p": ["http://127.0.0.1:1"]},
            sections={"auth": auth, "teams": {"vision": {"weight": 2.5}}},
        )
    with pytest.raises(ConfigError, match="priority"):
        make_registry(
            {"p": ["http://127.0.0.1:1"]},
            sections={"auth": {"keys": [api_key("c", "gw_c-key", priority="urgent")]}},
        )


async def test_a_reload_changes_weights_and_aging_without_a_restart(tmp_path: Path) -> None:
    async with fake_worker() as worker:
        path = tmp_path / "adapters.yaml"
        async with gateway_from_file(path, fair_registry(worker.url)) as gw:
            pool = gw.pipeline.balancer.pool("p")
            assert gw.pipeline.registry.team_weight("research") == 1
            assert pool.queue.batch_aging_s() == 60
            changed = fair_registry(worker.url, batch_aging_s=5, share_credit_s=0)
            path.write_text(changed.replace("weight: 1", "weight: 3"))
            reloader = served_of(gw.app).reloader
            assert reloader is not None
            assert reloader.reload() == "ok"
            # Each request reads its team's weight from the registry it is admitted
            # under; the pool reads its settings at each use.
            assert gw.pipeline.registry.team_weight("research") == 3
            assert pool.queue.batch_aging_s() == 5
            assert pool.queue.credit_s() == 0
            answer = await gw.client.post(GEN, json=body(), headers=bearer(HEAVY))
            assert answer.status_code == 200


async def test_a_keys_weight_orders_the_queue_of_a_real_gateway() -> None:
    """web-app (a key of weight 2, no team) and batch-job (team research, weight 1)
    each queue four requests while a fifth holds the slot: the pool's order gives
    web-app two for each one of research's."""
    release = asyncio.Event()
    release.set()
    text = fair_registry("http://127.0.0.1:1", light={"weight": 2}, share_credit_s=0)
    async with fake_worker(gated(release, 0.0)) as worker, released_at_exit(release):
        text = text.replace("http://127.0.0.1:1", worker.url)
        async with (
            gateway_server(text) as (url, app),
            httpx.AsyncClient(base_url=url, timeout=60) as client,
        ):
            heavy, light = post(client, HEAVY), post(client, LIGHT)
            assert (await heavy(seed=1)).status_code == 200  # a step is timed
            release.clear()
            tasks = [asyncio.create_task(heavy(seed=2))]
            await eventually(lambda: worker.calls == 2)
            tasks += [asyncio.create_task(heavy(seed=10 + i)) for i in range(4)]
            await eventually(lambda: len(pool_of(app).queue) == 4)
            tasks += [asyncio.create_task(light(seed=20 + i)) for i in range(4)]
            await eventually(lambda: len(pool_of(app).queue) == 8)
            order = [ticket.team for ticket in pool_of(app).queue]
            release.set()
            assert [t.status_code for t in await asyncio.gather(*tasks)] == [200] * 9
    w, r = "web-app", "research"
    assert order == [w, w, r, w, w, r, r, r], order
