"""A real Prometheus scrapes a running gateway: the request counter and a latency
quantile computed from the histogram move as traffic goes through.

Everything on 127.0.0.1: two sim workers, the gateway under uvicorn, Prometheus
(Debian package `prometheus`; missing, the test fails with the install command).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.testing import ServedSim, registry_yaml
from tests.support import body, gateway_process, prometheus_server

COUNTER = "sum(gateway_requests_total)"
MEDIAN = "histogram_quantile(0.5, sum by (le) (rate(gateway_request_duration_seconds_bucket[30s])))"
DEADLINE_S = 30.0


def scrape_config(gateway_url: str) -> str:
    target = gateway_url.removeprefix("http://")
    job = {
        "job_name": "gateway",
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "metrics_path": "/metrics",
        "static_configs": [{"targets": [target]}],
    }
    return yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": [job]})


def query(prometheus_url: str, promql: str) -> list[dict[str, Any]]:
    resp = httpx.get(prometheus_url + "/api/v1/query", params={"query": promql}, timeout=5)
    resp.raise_for_status()
    payload: dict[str, Any] = resp.json()
    assert payload["status"] == "success", payload
    result: list[dict[str, Any]] = payload["data"]["result"]
    return result


def scalar(prometheus_url: str, promql: str) -> float | None:
    """The value of a one-series instant query; None while it has no series or is NaN."""
    result = query(prometheus_url, promql)
    if len(result) != 1:
        return None
    value = float(result[0]["value"][1])
    return value if math.isfinite(value) else None


def target_health(prometheus_url: str) -> str:
    """What Prometheus says of its scrape target: for a failure message."""
    resp = httpx.get(prometheus_url + "/api/v1/targets", timeout=5).json()
    targets = resp["data"]["activeTargets"]
    return "; ".join(f"{t['scrapeUrl']}: {t['health']} {t['lastError']!r}" for t in targets)


def test_prometheus_sees_the_counter_and_a_quantile_move(
    tmp_path: Path, fast_sims: list[ServedSim]
) -> None:
    config = tmp_path / "adapters.yaml"
    config.write_text(registry_yaml({"sdxl": [s.url for s in fast_sims]}))
    with (
        gateway_process(str(config)) as gateway,
        prometheus_server(scrape_config(gateway), tmp_path) as prometheus,
        httpx.Client(base_url=gateway, timeout=10) as client,
    ):
        first = median = None
        moved = False
        seed = 0
        deadline = time.monotonic() + DEADLINE_S
        # Traffic between polls: each scrape (1 s) sees a higher count, and rate() over
        # the histogram buckets has two samples to work with after about two scrapes.
        while time.monotonic() < deadline and not (moved and median is not None):
            for _ in range(3):
                seed += 1
                resp = client.post("/v1/images/generations", json=body(seed=seed))
                assert resp.status_code == 200, resp.text
            count = scalar(prometheus, COUNTER)
            if count is not None:
                first = count if first is None else first
                moved = moved or count > first
            median = scalar(prometheus, MEDIAN)
            time.sleep(0.5)
        if not (moved and median is not None):
            pytest.fail(
                f"after {DEADLINE_S:.0f}s and {seed} requests: {COUNTER} first={first} "
                f"moved={moved}, median={median}; target: {target_health(prometheus)}"
            )
        by_label = query(prometheus, "sum by (adapter, status) (gateway_requests_total)")
    assert median is not None
    # sim workers at 1 ms a step: a 4-step request is milliseconds, far below a second.
    assert 0 < median < 1
    assert {(r["metric"]["adapter"], r["metric"]["status"]) for r in by_label} == {("sdxl", "200")}
