"""Graceful drain of a served gateway on SIGTERM, with slow requests in flight."""

from __future__ import annotations

import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx

from gateway.testing import registry_yaml
from tests.support import body, gateway_child, sim_workers

SLOW = ["--step-ms", "100", "--concurrency", "8", "--size", "32"]


def post(url: str, steps: int) -> int:
    reply = httpx.post(
        url + "/v1/images/generations", json=body(num_inference_steps=steps), timeout=30
    )
    return reply.status_code


def test_sigterm_drains_then_exits(tmp_path: Path) -> None:
    with sim_workers(SLOW) as (sim,), ThreadPoolExecutor(4) as pool:
        config = tmp_path / "adapters.yaml"
        config.write_text(registry_yaml({"p": [{"url": sim.url, "max_concurrency": 8}]}))
        grace = ["--drain-grace-s", "1", "--drain-timeout-s", "20"]
        with gateway_child(str(config), *grace) as (url, proc):
            in_flight: list[Future[int]] = [pool.submit(post, url, 20) for _ in range(3)]
            time.sleep(0.5)  # the three are at the worker now (each takes 2 s)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.1)
            ready = httpx.get(url + "/readyz")
            during_grace = post(url, 1)  # a new connection, still served
            assert [f.result() for f in in_flight] == [200, 200, 200]
            code = proc.wait(15)
    assert ready.status_code == 503
    assert ready.json() == {"status": "draining"}
    assert during_grace == 200
    assert code in (0, -signal.SIGTERM)  # uvicorn ends by re-raising the signal


def test_the_hard_cap_ends_a_stuck_drain(tmp_path: Path) -> None:
    with sim_workers(SLOW) as (sim,), ThreadPoolExecutor(1) as pool:
        config = tmp_path / "adapters.yaml"
        config.write_text(registry_yaml({"p": [sim.url]}, timeout_s=60))
        grace = ["--drain-grace-s", "0.2", "--drain-timeout-s", "1"]
        with gateway_child(str(config), *grace) as (url, proc):
            stuck = pool.submit(post, url, 50)  # 5 s: longer than grace + cap
            time.sleep(0.5)
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
            took = time.monotonic() - started
            try:
                outcome: object = stuck.result()
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
    assert took < 4.0, f"drain took {took:.1f}s despite a 1.2s cap"
    assert outcome != 200
