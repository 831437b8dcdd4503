"""API keys against the real gateway on loopback: 401, 403, open routes, the operator
route hook, the start-up warning and `gateway hash-key`."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from starlette.requests import Request

from gateway.auth import authenticate, hash_key
from gateway.cli import main
from gateway.registry import Registry
from gateway.testing import FakeWorker, fake_worker, gateway, image_ok, served_gateway
from tests.support import api_key, bearer, body, dead_url, gateway_from_file, make_registry

TEAM_A = "gw_team-a-secret"
TEAM_B = "gw_team-b-secret"
METRICS = "gw_metrics-secret"
ADMIN = "gw_admin-secret"
ADAPTERS: list[dict[str, Any]] = [
    {"name": "base", "pool": "p", "default": True},
    {"name": "pixel-art", "pool": "p", "upstream_model": "pixel", "aliases": ["px"]},
]
GEN = "/v1/images/generations"


def auth_registry(worker_url: str, **auth: Any) -> Registry:
    keys = [api_key("team-a", TEAM_A, adapters=["base"]), api_key("team-b", TEAM_B)]
    return make_registry({"p": [worker_url]}, ADAPTERS, sections={"auth": {"keys": keys, **auth}})


@asynccontextmanager
async def guarded(**auth: Any) -> AsyncIterator[tuple[FakeWorker, httpx.AsyncClient]]:
    """A scripted worker behind the real gateway, served on loopback, keys required."""
    async with (
        fake_worker(image_ok()) as worker,
        served_gateway(auth_registry(worker.url, **auth)) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        yield worker, client


def shape(resp: httpx.Response) -> tuple[int, bytes, tuple[tuple[str, str], ...]]:
    """What a 401 may show: status, body, headers (less the per-request ones)."""
    varying = {"date", "x-request-id"}
    headers = tuple(sorted((k, v) for k, v in resp.headers.items() if k not in varying))
    return resp.status_code, resp.content, headers


async def test_missing_malformed_and_unknown_keys_get_one_identical_401() -> None:
    attempts: list[dict[str, str]] = [
        {},
        bearer("gw_wrong"),
        {"Authorization": "Bearer"},
        {"Authorization": "Basic dGVhbS1hOnNlY3JldA=="},
        {"Authorization": TEAM_A},  # the right key without the scheme
        bearer(METRICS),  # an operator key never opens the API
        bearer(TEAM_A + "x"),
    ]
    async with guarded(metrics_key_sha256=hash_key(METRICS)) as (worker, client):
        answers = [await client.post(GEN, json=body(), headers=h) for h in attempts]
    assert answers[0].status_code == 401
    assert answers[0].headers["www-authenticate"] == 'Bearer realm="image-gateway"'
    assert "detail" in answers[0].json()
    assert {shape(a) for a in answers} == {shape(answers[0])}
    assert worker.received == []


async def test_a_known_key_is_served_and_its_scheme_is_case_insensitive() -> None:
    async with guarded() as (worker, client):
        ok = await client.post(GEN, json=body(), headers=bearer(TEAM_A))
        lower = await client.post(GEN, json=body(), headers={"authorization": f"bearer {TEAM_B}"})
    assert ok.status_code == 200, ok.text
    assert lower.status_code == 200, lower.text
    assert len(worker.received) == 2


async def test_a_key_not_allowed_for_the_adapter_is_403_naming_both() -> None:
    async with guarded() as (worker, client):
        by_name = await client.post(GEN, json=body(model="pixel-art"), headers=bearer(TEAM_A))
        by_alias = await client.post(GEN, json=body(model="px"), headers=bearer(TEAM_A))
        other = await client.post(GEN, json=body(model="px"), headers=bearer(TEAM_B))
    assert by_name.status_code == 403
    assert by_name.json() == {"detail": "key 'team-a' may not use adapter 'pixel-art'"}
    assert by_alias.status_code == 403
    assert other.status_code == 200
    assert len(worker.received) == 1


async def test_models_need_a_key_and_list_only_its_adapters() -> None:
    async with guarded() as (_, client):
        anonymous = await client.get("/v1/models")
        team_a = await client.get("/v1/models", headers=bearer(TEAM_A))
        team_b = await client.get("/v1/models", headers=bearer(TEAM_B))
    assert anonymous.status_code == 401
    assert [m["id"] for m in team_a.json()["data"]] == ["base"]
    assert [m["id"] for m in team_b.json()["data"]] == ["base", "pixel-art"]


async def test_health_readiness_and_openapi_stay_open() -> None:
    async with guarded() as (_, client):
        for path in ("/healthz", "/readyz", "/openapi.json"):
            assert (await client.get(path)).status_code == 200, path


def test_authenticate_puts_the_key_name_and_nothing_else_in_request_state() -> None:
    registry = auth_registry(dead_url())
    scope: dict[str, Any] = {
        "type": "http",
        "headers": [(b"authorization", f"Bearer {TEAM_B}".encode())],
        "state": {},
    }
    key = authenticate(Request(scope), registry.auth)
    assert key is not None
    assert key.name == "team-b"
    assert scope["state"] == {"key_name": "team-b"}


async def test_an_open_gateway_warns_once_at_start(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.auth")
    async with gateway(make_registry({"p": [dead_url()]})) as gw:
        await gw.client.get("/healthz")
        await gw.client.get("/v1/models")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "no auth section in the registry: the gateway is open to every caller"
    ]


# The hook for operator routes, on tiny routes of the test's own.


@asynccontextmanager
async def operator_client(registry: Registry, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The real /metrics and /admin/reload, the registry served from a file (so that a
    reload that gets past the key check answers 200 "unchanged")."""
    text = yaml.safe_dump(registry.model_dump(mode="json", exclude={"digest"}))
    async with gateway_from_file(tmp_path / "adapters.yaml", text) as gw:
        yield gw.client


async def test_operator_routes_take_only_their_own_key(tmp_path: Path) -> None:
    registry = auth_registry(
        dead_url(),
        metrics_key_sha256=hash_key(METRICS),
        admin_key_sha256=hash_key(ADMIN),
    )
    async with operator_client(registry, tmp_path) as client:
        metrics = await client.get("/metrics", headers=bearer(METRICS))
        admin = await client.post("/admin/reload", headers=bearer(ADMIN))
        refused = [
            await client.get("/metrics", headers=bearer(TEAM_A)),
            await client.get("/metrics", headers=bearer(ADMIN)),
            await client.post("/admin/reload", headers=bearer(METRICS)),
            await client.post("/admin/reload"),
        ]
    assert metrics.status_code == 200
    assert "gateway_requests_total" in metrics.text
    assert (admin.status_code, admin.json()["status"]) == (200, "unchanged")
    assert [r.status_code for r in refused] == [401] * 4
    assert all(r.headers["www-authenticate"].startswith("Bearer") for r in refused)


async def test_operator_routes_without_their_own_key(tmp_path: Path) -> None:
    async with operator_client(auth_registry(dead_url()), tmp_path) as client:
        metrics = await client.get("/metrics")
        admin = await client.post("/admin/reload", headers=bearer(TEAM_A))
    assert metrics.status_code == 200  # counts and names only: open unless given a key
    assert admin.status_code == 403  # state-changing: closed unless given a key
    assert "admin_key_sha256" in admin.json()["detail"]
    open_registry = make_registry({"p": [dead_url()]})
    async with operator_client(open_registry, tmp_path) as client:
        assert (await client.post("/admin/reload")).status_code == 200  # an open gateway


def test_hash_key_makes_a_key_and_its_hash(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hash-key", "--name", "team-c"]) == 0
    out = capsys.readouterr().out
    fields = dict(line.split(":", 1) for line in out.splitlines()[:3] if ":" in line)
    key, digest = fields["key"].strip(), fields["sha256"].strip()
    assert key.startswith("gw_")
    assert len(key) > 40
    assert digest == hash_key(key)
    assert f"- {{name: team-c, sha256: {digest}}}" in out
    main(["hash-key"])
    assert key not in capsys.readouterr().out  # a new key every time


def test_hash_key_hashes_a_key_from_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("my-key\n"))
    assert main(["hash-key", "--stdin"]) == 0
    assert capsys.readouterr().out.strip() == hash_key("my-key")
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["hash-key", "--stdin"]) == 1
    assert "no key" in capsys.readouterr().err
