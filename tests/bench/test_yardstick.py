"""bench/yardstick.py: the issue's ratios come out of one round's rows the right way up."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.overhead import Result
from bench.yardstick import nginx_conf, ratios


def _row(rps: float, p50_ms: float, cpu_us: float) -> Result:
    return Result(rps=rps, p50_ms=p50_ms, p99_ms=p50_ms * 2, requests=1000, cpu_us=cpu_us)


def test_ratios_are_the_gateway_over_nginx_in_req_s_and_nginx_over_the_gateway_in_cpu() -> None:
    rows = {
        "direct": (10_000, 0.10, 50),
        "nginx proxy": (8_000, 0.20, 100),
        "nginx cache": (20_000, 0.10, 40),
        "bare uvicorn": (10_000, 0.15, 80),
        "gateway miss": (2_000, 0.60, 400),
        "gateway memory": (7_000, 0.30, 100),
        "gateway redis": (4_000, 0.40, 200),
    }
    results = {(name, conc): _row(*row) for name, row in rows.items() for conc in (1, 16)}
    got = ratios(results)
    assert got["miss / nginx proxy"] == pytest.approx(0.25)
    assert got["memory hit / nginx cache"] == pytest.approx(0.35)
    assert got["redis hit / nginx cache"] == pytest.approx(0.20)
    assert got["added p50 c=1 (ms)"] == pytest.approx(0.50)
    assert got["cpu: miss / nginx proxy"] == pytest.approx(0.25)
    assert got["cpu: memory hit / nginx cache"] == pytest.approx(0.40)
    assert got["cpu: redis hit / nginx cache"] == pytest.approx(0.20)
    assert got["cpu: added at c=1 (ms)"] == pytest.approx(0.35)
    assert not any(name.startswith(("cpu: new / old", "N processes")) for name in got)


def test_nginx_listens_on_loopback_only_and_caches_posts_by_body() -> None:
    ports = {"upstream": 1001, "proxy": 1002, "cache": 1003}
    conf = nginx_conf(Path("/p"), ports, Path("/p/www"), workers=1)
    listens = [line.split()[1] for line in conf.splitlines() if line.strip().startswith("listen")]
    assert listens == ["127.0.0.1:1001;", "127.0.0.1:1002;", "127.0.0.1:1003;"]
    assert "proxy_cache_methods POST;" in conf
    assert 'proxy_cache_key "$request_uri|$request_body";' in conf
