"""Readiness is per process, pool health per pool: one pool with every worker dead
leaves /readyz 200 and the other pools serving; /readyz?pool= and /status tell which
pool is out. Starting and draining are still 503."""

from __future__ import annotations

import base64
import io
import json
from typing import Any, get_args

import httpx
from PIL import Image

from gateway.app import create_app
from gateway.auth import hash_key
from gateway.drain import Drain
from gateway.health import State
from gateway.registry import Registry
from gateway.schema import WorkerState
from gateway.state import served_of
from gateway.testing import fake_worker, gateway, gateway_server, image_ok
from tests.support import bearer, body, dead_url, eventually, make_registry

ADAPTERS: list[dict[str, Any]] = [
    {"name": "live-art", "pool": "live", "default": True},
    {"name": "dead-art", "pool": "dead"},
]
FAST_PROBES = {"probe_interval_s": 0.02, "healthy_threshold": 1}
METRICS, ADMIN, TEAM = "gw_metrics-secret", "gw_admin-secret", "gw_team-secret"


def jpeg_answer() -> bytes:
    """A worker's success with a real JPEG: passes any check of the answer's shape."""
    out = io.BytesIO()
    Image.new("RGB", (2, 2)).save(out, "JPEG")
    return json.dumps({"image": base64.b64encode(out.getvalue()).decode()}).encode()


def two_pools(live_url: str) -> Registry:
    pools = {"live": [live_url], "dead": [dead_url(), dead_url()]}
    return make_registry(pools, ADAPTERS, health=FAST_PROBES)


def states(report: dict[str, Any], pool: str) -> list[str]:
    return [worker["state"] for worker in report["pools"][pool]["workers"]]


async def test_a_dead_pool_leaves_the_process_ready_and_the_other_pool_serving() -> None:
    async with (
        fake_worker(image_ok(jpeg_answer())) as live,
        gateway_server(two_pools(live.url)) as (url, app),
        httpx.AsyncClient(base_url=url) as client,
    ):
        pools = served_of(app).pipeline.balancer.pools
        # The prober takes the dead pool's workers DOWN and the live one HEALTHY.
        await eventually(lambda: all(w.health.state is State.DOWN for w in pools["dead"].workers))
        await eventually(lambda: pools["live"].workers[0].health.state is State.HEALTHY)

        ready = await client.get("/readyz")
        dead = await client.get("/readyz", params={"pool": "dead"})
        alive = await client.get("/readyz", params={"pool": "live"})
        unknown = await client.get("/readyz", params={"pool": "nope"})
        served = await client.post("/v1/images/generations", json=body(model="live-art"))
        refused = await client.post("/v1/images/generations", json=body(model="dead-art"))
        report = await client.get("/status")
        verbose = await client.get("/readyz?verbose")

    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert (dead.status_code, dead.json()) == (
        503,
        {"status": "unready", "pool": "dead", "healthy": 0},
    )
    assert (alive.status_code, alive.json()) == (
        200,
        {"status": "ready", "pool": "live", "healthy": 1},
    )
    assert unknown.status_code == 404
    assert unknown.json() == {"detail": "unknown pool 'nope'; known pools: dead, live"}
    assert served.status_code == 200
    assert served.content == jpeg_answer()
    assert refused.status_code == 502  # that pool's own requests fail, and say so
    assert len(live.received) == 1

    assert report.status_code == 200
    status = report.json()
    assert status["status"] == "ready"
    assert states(status, "dead") == ["down", "down"]
    assert states(status, "live") == ["healthy"]
    assert status["pools"]["dead"] == {
        "protocol": "friendli-container",
        "healthy": 0,
        "queue_depth": 0,
        "ejections": 0,
        "adapters": ["dead-art"],
        "workers": [
            {
                "name": "dead-0",
                "state": "down",
                "in_flight": 0,
                "max_concurrency": 1,
                "ejections": 0,
            },
            {
                "name": "dead-1",
                "state": "down",
                "in_flight": 0,
                "max_concurrency": 1,
                "ejections": 0,
            },
        ],
    }
    assert "127.0.0.1" not in report.text, "worker addresses only for the admin key"
    assert (verbose.status_code, verbose.json()) == (200, status)


async def test_draining_is_503_on_every_form_of_readyz_while_status_still_reports() -> None:
    drain = Drain(grace_s=0.0)
    async with gateway(make_registry({"p": [dead_url()]}), drain=drain) as gw:
        assert (await gw.client.get("/readyz")).status_code == 200
        drain.draining = True
        plain = await gw.client.get("/readyz")
        pool = await gw.client.get("/readyz?pool=p")
        verbose = await gw.client.get("/readyz?verbose")
        report = await gw.client.get("/status")
    assert (plain.status_code, plain.json()) == (503, {"status": "draining"})
    assert (pool.status_code, pool.json()) == (503, {"status": "draining"})
    assert verbose.status_code == 503
    assert (report.status_code, report.json()) == (200, verbose.json())
    assert report.json()["status"] == "draining"
    assert list(report.json()["pools"]) == ["p"]


async def test_starting_is_503() -> None:
    """Before the lifespan has loaded the registry (no pipeline yet)."""
    app = create_app(make_registry({"p": [dead_url()]}))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        answers = [await client.get(path) for path in ("/readyz", "/readyz?pool=p", "/status")]
    assert [(r.status_code, r.json()) for r in answers] == [(503, {"status": "starting"})] * 3


DEAD = dead_url()  # the worker's address, which only the admin key sees


def guarded_registry(**keys: str) -> Registry:
    auth = {"keys": [{"name": "team", "sha256": hash_key(TEAM)}], **keys}
    url = DEAD.replace("http://", "http://ops:s3cret@") + "/v2"
    worker = {"url": url, "max_concurrency": 2}
    return make_registry({"p": [worker]}, sections={"auth": auth})


async def test_status_takes_the_metrics_key_and_shows_addresses_only_to_the_admin_key() -> None:
    registry = guarded_registry(
        metrics_key_sha256=hash_key(METRICS), admin_key_sha256=hash_key(ADMIN)
    )
    async with gateway(registry) as gw:
        anonymous = [await gw.client.get(p) for p in ("/status", "/readyz?verbose")]
        team = await gw.client.get("/status", headers=bearer(TEAM))
        probe = await gw.client.get("/readyz")
        metrics = await gw.client.get("/status", headers=bearer(METRICS))
        admin = await gw.client.get("/status", headers=bearer(ADMIN))
    assert [r.status_code for r in anonymous] == [401, 401]
    assert team.status_code == 401, "an API key never opens an operator route"
    assert probe.status_code == 200, "probes send no key"
    assert metrics.status_code == 200
    assert "address" not in metrics.json()["pools"]["p"]["workers"][0]
    assert "127.0.0.1" not in metrics.text
    (worker,) = admin.json()["pools"]["p"]["workers"]
    assert worker["address"] == DEAD
    assert "s3cret" not in admin.text
    assert "ops:" not in admin.text


async def test_status_is_open_like_metrics_without_a_metrics_key() -> None:
    async with gateway(guarded_registry()) as gw:
        report = await gw.client.get("/status")
        admin_less = await gw.client.get("/status", headers=bearer(ADMIN))
    assert report.status_code == 200
    assert "address" not in report.json()["pools"]["p"]["workers"][0]
    assert admin_less.status_code == 200  # no admin key configured: nobody sees addresses
    assert "address" not in admin_less.json()["pools"]["p"]["workers"][0]


def test_the_schema_names_every_health_state() -> None:
    assert set(get_args(WorkerState)) == {state.value for state in State}
