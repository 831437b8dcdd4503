"""Header hygiene and secrets, against the real gateway on loopback: what crosses
between client and worker, what an error shows, and what the logs never hold."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.auth import hash_key
from gateway.cli import main
from gateway.errors import ConfigError
from gateway.registry import parse_registry
from gateway.testing import JPEG_ANSWER, Handler, fake_worker, registry_yaml, served_gateway
from tests.support import (
    api_key,
    bearer,
    body,
    dead_redis_url,
    dead_url,
    gateway_process,
    make_registry,
)

GEN = "/v1/images/generations"
CLIENT_KEY = "gw_client-key-7f3a"
WORKER_TOKEN = "worker-token-c41d"
HOP_BY_HOP = [
    "connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
]
# What aiohttp sends on its own, plus the gateway's two and the pool's credentials.
WORKER_MAY_SEE = {
    "host",
    "accept",
    "accept-encoding",
    "content-length",
    "content-type",
    "x-request-id",
    "authorization",
}


def guarded_registry(worker_url: str) -> Any:
    pool = {"url": worker_url}
    return make_registry(
        {"p": [pool]},
        sections={"auth": {"keys": [api_key("team-a", CLIENT_KEY)]}},
        headers={"Authorization": "Bearer ${WORKER_TOKEN}"},
        env={"WORKER_TOKEN": WORKER_TOKEN},
    )


async def test_only_the_pools_credentials_and_the_request_id_reach_a_worker() -> None:
    client_headers = {
        **bearer(CLIENT_KEY),
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "named by Connection",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
        "TE": "trailers",
        "Trailer": "X-Checksum",
        "X-Custom": "a client header",
        "Cookie": "session=abc",
        "X-Request-ID": "hyg-1",
    }

    async def chunked() -> AsyncIterator[bytes]:
        yield b'{"prompt": "a fox", "num_inference_steps": 4, "guidance_scale": 7.5}'

    async with (
        fake_worker(_image_with_headers()) as worker,
        served_gateway(guarded_registry(worker.url)) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        resp = await client.post(GEN, content=chunked(), headers=client_headers)
    assert resp.status_code == 200, resp.text
    seen = {k.lower(): v for k, v in worker.headers[0].items()}
    assert set(seen) <= WORKER_MAY_SEE, seen
    assert seen["authorization"] == f"Bearer {WORKER_TOKEN}"  # the pool's, not the client's
    assert seen["x-request-id"] == "hyg-1"
    assert CLIENT_KEY not in str(worker.headers)


def _image_with_headers() -> Handler:
    """A worker answering 200 with every header a client must never see."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.Response(body=JPEG_ANSWER, content_type="application/json")
        resp.headers.update(
            {
                "Connection": "X-Internal",
                "X-Internal": "10.0.0.5",
                "Keep-Alive": "timeout=99",
                "Proxy-Authenticate": "Basic",
                "Trailer": "X-Checksum",
                "Upgrade": "h2c",
                "Server": "worker/1.0 (CUDA 12.4; node gpu-17)",
                "X-Worker-Addr": "10.1.2.3:8000",
                "Set-Cookie": "worker=1",
            }
        )
        return resp

    return handler


async def test_no_worker_header_reaches_the_client() -> None:
    async with fake_worker(_image_with_headers()) as worker:
        registry = make_registry({"p": [worker.url]})
        async with served_gateway(registry) as url, httpx.AsyncClient(base_url=url) as client:
            resp = await client.post(GEN, json=body())
    assert resp.status_code == 200
    assert set(resp.headers) == {
        "date",
        "content-length",
        "content-type",
        "x-seed",
        "x-cache",
        "x-adapter",
        "x-request-id",
    }


def _fails_with_a_traceback(status: int) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        text = (
            '{"detail": "bad lora Traceback (most recent call last):\\n'
            '  File \\"/srv/worker/pipeline.py\\", line 88, in load\\n'
            '    torch.load(\\"10.0.0.5:/models/x\\")\\nRuntimeError: CUDA OOM"}'
        )
        return web.Response(
            status=status, text=text, content_type="application/json", headers={"Server": "w/1"}
        )

    return handler


async def test_a_failing_worker_shows_the_client_one_line_and_no_internals() -> None:
    for status, expected in (
        (500, (502, "adapter 'p': worker p-0: HTTP 500")),
        (400, (400, "adapter 'p': worker rejected the request: bad lora")),
    ):
        async with fake_worker(_fails_with_a_traceback(status)) as worker:
            registry = make_registry({"p": [worker.url]})
            async with served_gateway(registry) as url, httpx.AsyncClient(base_url=url) as c:
                resp = await c.post(GEN, json=body())
        assert (resp.status_code, resp.json()["detail"]) == expected
        for leak in ("Traceback", "/srv/", "10.0.0.5", "127.0.0.1", "CUDA", "w/1"):
            assert leak not in resp.text + str(resp.headers)


def test_worker_credentials_come_from_the_environment_at_load() -> None:
    registry = make_registry(
        {"p": [dead_url()]},
        headers={"Authorization": "Bearer ${T}", "X-Org": "${ORG}-gpu"},
        env={"T": "tok", "ORG": "acme"},
    )
    assert dict(registry.pools["p"].headers) == {"Authorization": "Bearer tok", "X-Org": "acme-gpu"}
    assert "tok" not in repr(registry)


async def test_logs_of_a_full_run_hold_no_key_hash_or_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics_key, admin_key, redis_password = "gw_metrics-9e1", "gw_admin-5b2", "redis-pw-77aa"
    secrets = [CLIENT_KEY, WORKER_TOKEN, metrics_key, admin_key, redis_password]
    secrets += [hash_key(s) for s in (CLIENT_KEY, metrics_key, admin_key)]
    auth = {
        "keys": [api_key("team-a", CLIENT_KEY, adapters=["p"], rate={"per_s": 0.01, "burst": 4})],
        "metrics_key_sha256": hash_key(metrics_key),
        "admin_key_sha256": hash_key(admin_key),
        "redis_url": dead_redis_url(redis_password),  # down
    }
    adapters: list[dict[str, Any]] = [
        {"name": "p", "pool": "p", "default": True},
        {"name": "q", "pool": "p"},
    ]
    log = tmp_path / "gateway.log"
    async with fake_worker(_fails_with_a_traceback(500)) as worker:
        text = registry_yaml(
            {"p": [worker.url]},
            adapters,
            sections={"auth": auth},
            headers={"Authorization": "Bearer ${WORKER_TOKEN}"},
        )
        config = tmp_path / "adapters.yaml"
        config.write_text(text)
        env = {**os.environ, "WORKER_TOKEN": WORKER_TOKEN}
        with (
            log.open("wb") as sink,
            gateway_process(
                str(config), log_level="debug", env=env, stdout=sink, stderr=subprocess.STDOUT
            ) as url,
        ):
            async with httpx.AsyncClient(base_url=url) as client:
                statuses = [
                    (await client.post(GEN, json=body(), headers=h)).status_code
                    for h in (
                        {},
                        bearer("gw_wrong"),
                        bearer(metrics_key),
                        {"Proxy-Authorization": f"Bearer {CLIENT_KEY}"},
                    )
                ]
                statuses.append(
                    (
                        await client.post(GEN, json=body(model="q"), headers=bearer(CLIENT_KEY))
                    ).status_code
                )
                for _ in range(4):  # a worker failure each, then over the rate
                    r = await client.post(GEN, json=body(), headers=bearer(CLIENT_KEY))
                    statuses.append(r.status_code)
                # Live reloads: a good one, then a refused one (a hash cut short), whose
                # error is logged by the gateway itself.
                admin = bearer(admin_key)
                reloads = [(await client.post("/admin/reload", headers=admin)).status_code]
                config.write_text(text.replace(hash_key(CLIENT_KEY), hash_key(CLIENT_KEY)[:-1]))
                reloads.append((await client.post("/admin/reload", headers=admin)).status_code)
                scraped = (await client.get("/metrics", headers=bearer(metrics_key))).text
    assert statuses == [401, 401, 401, 401, 403, 502, 502, 502, 429]
    config.write_text(text)  # the good file again, for `gateway check` below
    assert reloads == [200, 422]
    assert 'gateway_registry_reloads_total{result="error"}' in scraped
    # What a reload would log: the registry's refusals, and `gateway check`'s table.
    refusals = [
        _refusal(text.replace(hash_key(CLIENT_KEY), hash_key(CLIENT_KEY)[:-1] + "Z")),
        _refusal(text.replace("${WORKER_TOKEN}", "${NOT_SET}")),
    ]
    monkeypatch.setenv("WORKER_TOKEN", WORKER_TOKEN)
    capsys.readouterr()
    assert main(["check", "--config", str(config)]) == 0
    logged = log.read_text() + capsys.readouterr().out
    assert "registry reload refused" in logged
    assert "team-a" in logged  # the 403 line: keys appear by name
    assert "Redis unreachable" in logged
    for secret in secrets:
        assert secret not in logged
        assert secret not in scraped  # nor in the metrics
        assert not any(secret in r for r in refusals)


def _refusal(text: str) -> str:
    try:
        parse_registry(text, source="adapters.yaml", env={"WORKER_TOKEN": WORKER_TOKEN})
    except ConfigError as exc:
        return str(exc)
    raise AssertionError("the registry was not refused")
