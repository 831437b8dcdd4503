"""Hot reload: POST /admin/reload, the file watcher and SIGHUP; bad files refused."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest

from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.registry import Registry, load_registry
from gateway.reload import RegistryFile, Reloader
from gateway.state import served_of
from gateway.testing import ServedSim, registry_yaml
from tests.support import body, gateway_child, gateway_from_file


def two_versions(sims: list[ServedSim]) -> tuple[str, str]:
    urls = [s.url for s in sims]
    one = registry_yaml({"p": urls}, [{"name": "a", "pool": "p", "default": True}])
    two = registry_yaml(
        {"p": urls[::-1]},  # same workers, other order: their state must follow them
        [{"name": "a", "pool": "p", "default": True}, {"name": "b", "pool": "p"}],
    )
    return one, two


def test_reloader_applies_a_good_file_and_refuses_a_bad_one(tmp_path: Path) -> None:
    path = tmp_path / "adapters.yaml"
    path.write_text(registry_yaml({"p": ["http://127.0.0.1:1"]}))
    serving: list[Registry] = [load_registry(path)]
    metrics = Metrics()
    reloader = Reloader(
        RegistryFile(path), current=lambda: serving[-1], apply=serving.append, metrics=metrics
    )
    assert reloader.reload() == "unchanged"
    path.write_text(registry_yaml({"p": ["http://127.0.0.1:2"]}))
    assert reloader.reload() == "ok"
    path.write_text("pools: {p: {workers: []}}\nadapters: []\n")
    with pytest.raises(ConfigError, match="adapters: Tuple should have at least 1 item"):
        reloader.reload()
    assert [r.pools["p"].workers[0].url for r in serving] == [
        "http://127.0.0.1:1",
        "http://127.0.0.1:2",
    ]
    text = metrics.exposition().decode()
    for result in ("ok", "unchanged", "error"):
        assert f'gateway_registry_reloads_total{{result="{result}"}} 1.0' in text


async def test_admin_reload_under_load_drops_nothing(
    tmp_path: Path, fast_sims: list[ServedSim]
) -> None:
    one, two = two_versions(fast_sims)
    path = tmp_path / "adapters.yaml"
    async with gateway_from_file(path, one) as gw:
        app, client = gw.app, gw.client
        kept = list(served_of(app).pipeline.balancer.pool("p").workers)
        stop = asyncio.Event()

        async def traffic() -> list[int]:
            codes = []
            while not stop.is_set():
                reply = await client.post("/v1/images/generations", json=body(model="a"))
                codes.append(reply.status_code)
            return codes

        clients = [asyncio.create_task(traffic()) for _ in range(4)]
        results = []
        for i in range(20):
            path.write_text(two if i % 2 == 0 else one)
            results.append((await client.post("/admin/reload")).json()["status"])
            await asyncio.sleep(0.02)
        stop.set()
        codes = [c for task in clients for c in await task]
        workers = served_of(app).pipeline.balancer.pool("p").workers
    assert results == ["ok"] * 20
    assert len(codes) > 20
    assert set(codes) == {200}
    assert sorted(map(id, workers)) == sorted(map(id, kept))  # same workers, state kept
    assert all(w.in_flight == 0 for w in workers)


async def test_admin_reload_refuses_a_bad_file_and_keeps_serving(
    tmp_path: Path, fast_sims: list[ServedSim]
) -> None:
    one, _ = two_versions(fast_sims)
    path = tmp_path / "adapters.yaml"
    async with gateway_from_file(path, one) as gw:
        client = gw.client
        path.write_text(one.replace("pool: p", "pool: nowhere"))
        refused = await client.post("/admin/reload")
        still = await client.post("/v1/images/generations", json=body(model="a"))
    assert refused.status_code == 422
    assert "unknown pool 'nowhere'" in refused.json()["detail"]
    assert "old one keeps serving" in refused.json()["detail"]
    assert still.status_code == 200


async def test_file_watcher_picks_up_a_change(tmp_path: Path, fast_sims: list[ServedSim]) -> None:
    one, two = two_versions(fast_sims)
    path = tmp_path / "adapters.yaml"
    async with gateway_from_file(path, one, reload_every_s=0.05) as gw:
        client = gw.client
        path.write_text(two)
        for _ in range(100):
            ids = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
            if ids == ["a", "b"]:
                break
            await asyncio.sleep(0.05)
    assert ids == ["a", "b"]


def test_sighup_reloads_a_gateway_child(tmp_path: Path, fast_sims: list[ServedSim]) -> None:
    one, two = two_versions(fast_sims)
    path = tmp_path / "adapters.yaml"
    path.write_text(one)
    with gateway_child(str(path), "--reload-every-s", "3600") as (url, proc):
        path.write_text(two)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if len(httpx.get(url + "/v1/models").json()["data"]) == 2:
                break
            time.sleep(0.05)
        assert len(httpx.get(url + "/v1/models").json()["data"]) == 2
