"""Request metrics and /metrics, in memory and from several server processes."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics, Trace
from gateway.testing import ServedSim, answers, fake_worker, gateway, registry_yaml
from tests.support import body, dead_url, gateway_process, make_registry


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


async def test_requests_are_counted_by_adapter_and_status(fast_sims: list[ServedSim]) -> None:
    registry = make_registry({"p": [s.url for s in fast_sims], "dead": [dead_url()]})
    async with gateway(registry) as gw:
        client = gw.client
        for model in ("p", "p", "dead", "no-such-model"):
            await client.post("/v1/images/generations", json=body(model=model))
        await client.post("/v1/images/generations", json=body(num_inference_steps=0))
        text = (await client.get("/metrics")).text
    assert value(text, "gateway_requests_total", adapter="p", status="200") == 2
    assert value(text, "gateway_requests_total", adapter="dead", status="502") == 1
    # Raw `model` input never becomes a label value: unknown models share one.
    assert value(text, "gateway_requests_total", adapter="unknown", status="404") == 1
    assert value(text, "gateway_requests_total", adapter="unknown", status="422") == 1
    assert value(text, "gateway_request_duration_seconds_count", adapter="p") == 2
    assert value(text, "gateway_overhead_seconds_count") == 5
    assert value(text, "gateway_registry_info", revision=registry.digest) == 1
    assert "no-such-model" not in text


def test_overhead_excludes_worker_and_queue_time() -> None:
    metrics = Metrics()
    trace = Trace(adapter="a", upstream_s=2.0, queue_s=0.5)
    metrics.observe_request(trace, 200, elapsed_s=2.5004)
    text = metrics.exposition().decode()
    assert value(text, "gateway_overhead_seconds_bucket", le="0.0005") == 1
    assert value(text, "gateway_request_duration_seconds_bucket", adapter="a", le="5.0") == 1


def test_registry_info_moves_to_the_new_revision() -> None:
    metrics = Metrics()
    metrics.set_registry("aaa")
    metrics.set_registry("bbb")
    text = metrics.exposition().decode()
    assert value(text, "gateway_registry_info", revision="aaa") == 0
    assert value(text, "gateway_registry_info", revision="bbb") == 1


def per_process_requests(metrics_dir: Path, tmp: Path) -> dict[str, float]:
    """pid -> generation requests that process counted, read from its own files alone."""
    totals: dict[str, float] = {}
    for pid in {p.stem.rsplit("_", 1)[-1] for p in metrics_dir.glob("*.db")}:
        alone = tmp / f"alone-{pid}"
        alone.mkdir(exist_ok=True)
        for file in metrics_dir.glob(f"*_{pid}.db"):
            shutil.copy(file, alone / file.name)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(alone))  # type: ignore[no-untyped-call]
        text = generate_latest(registry).decode()
        totals[pid] = value(text, "gateway_requests_total", adapter="p", status="200")
    return totals


def test_several_processes_serve_and_the_scrape_sums_them(
    tmp_path: Path, fast_sims: list[ServedSim]
) -> None:
    """Both processes of `serve --processes 2` answer requests (sent until each has,
    with a bound), and every scrape, whichever process answers it, is their sum."""
    config = tmp_path / "adapters.yaml"
    config.write_text(registry_yaml({"p": [s.url for s in fast_sims]}))
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"stale")  # an earlier run's file
    served = gateway_process(str(config), "--processes", "2", "--metrics-dir", str(metrics_dir))
    close = {"connection": "close"}  # a new connection each time: either process may answer
    with served as url, httpx.Client(base_url=url, headers=close) as client:
        sent = 0
        by_process: dict[str, float] = {}
        while sent < 400 and not (len(by_process) == 2 and all(by_process.values())):
            for _ in range(10):
                assert client.post("/v1/images/generations", json=body()).status_code == 200
            sent += 10
            by_process = _settled(lambda: per_process_requests(metrics_dir, tmp_path), sent)
        scrapes = {
            value(client.get("/metrics").text, "gateway_requests_total", adapter="p", status="200")
            for _ in range(6)
        }
    assert "999999" not in by_process  # the stale file was cleaned at start
    assert len(by_process) == 2, by_process  # two processes kept files...
    assert all(by_process.values()), by_process  # ...and both served
    assert sum(by_process.values()) == sent
    assert scrapes == {sent}  # each scrape is the sum, whichever process answered it


def _settled(read: Callable[[], dict[str, float]], sent: int) -> dict[str, float]:
    """`read()` once the processes have counted every answer sent (each counts just
    after its answer went out): waited for, with a generous bound."""
    deadline = time.monotonic() + 10
    while True:
        counts = read()
        if sum(counts.values()) == sent or time.monotonic() > deadline:
            return counts
        time.sleep(0.02)


async def test_worker_try_retry_and_queue_metrics(fast_sims: list[ServedSim]) -> None:
    async with fake_worker(answers(503, '{"detail": "busy"}')) as busy:
        registry = make_registry({"p": [busy.url, fast_sims[0].url]})
        async with gateway(registry) as gw:
            codes: list[int] = []
            while len(codes) < 6 or not busy.received:  # ties are random: go till p-0 is tried
                reply = await gw.client.post("/v1/images/generations", json=body())
                codes.append(reply.status_code)
                assert len(codes) < 100
            text = (await gw.client.get("/metrics")).text
    assert set(codes) == {200}
    refused = value(
        text, "gateway_upstream_errors_total", pool="p", worker="p-0", reason="http_503"
    )
    assert refused == len(busy.received) >= 1
    assert value(text, "gateway_retries_total", pool="p", reason="http_503") == refused
    served = value(text, "gateway_upstream_duration_seconds_count", pool="p", worker="p-1")
    assert served == len(codes)
    assert value(text, "gateway_queue_wait_seconds_count", pool="p") == len(codes) + refused
    assert value(text, "gateway_worker_in_flight", pool="p", worker="p-1") == 0
    assert value(text, "gateway_worker_healthy", pool="p", worker="p-1") == 1
    assert value(text, "gateway_queue_depth", pool="p") == 0


async def test_a_full_queue_is_counted(fast_sims: list[ServedSim]) -> None:
    worker = {"url": fast_sims[0].url, "max_concurrency": 1}
    registry = make_registry({"p": [worker]}, max_queue=0)
    async with gateway(registry) as gw:
        slow = body(num_inference_steps=50)  # 50 ms at 1 ms a step
        replies = await asyncio.gather(
            *(gw.client.post("/v1/images/generations", json=slow) for _ in range(3))
        )
        text = (await gw.client.get("/metrics")).text
    assert sorted(r.status_code for r in replies) == [200, 503, 503]
    assert value(text, "gateway_queue_rejections_total", pool="p", reason="full") == 2
    assert value(text, "gateway_requests_total", adapter="p", status="503") == 2
