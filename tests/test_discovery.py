from __future__ import annotations

from gateway.balancer import Balancer, Ticket
from gateway.cli import routing_table
from gateway.discovery import Discovery, FakeResolver, resolve_dns
from gateway.registry import Registry, parse_registry
from gateway.testing import fake_worker, gateway, image_ok
from tests.support import FakeClock, body


def dns_registry(name: str = "workers.test", port: int = 8000) -> Registry:
    return parse_registry(
        f"""
pools:
  p:
    discover: {{dns: {name}, port: {port}, every_s: 10, max_concurrency: 2, adapters: [a]}}
adapters:
  - {{name: base, pool: p, default: true}}
"""
    )


async def test_records_become_workers_and_follow_the_changes() -> None:
    clock = FakeClock()
    resolver = FakeResolver({"workers.test": ["10.0.0.1", "10.0.0.2"]})
    balancer = Balancer(dns_registry(), clock=clock)
    discovery = Discovery(balancer=balancer, resolver=resolver, clock=clock)
    pool = balancer.pool("p")
    assert pool.workers == []

    await discovery.refresh_due()
    first, leaving = pool.workers
    assert [w.url for w in pool.workers] == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    assert first.spec.max_concurrency == 2
    assert "a" in first.warm
    held = Ticket(None, exclude=(first,))
    pool.submit(held)
    assert held.worker is leaving

    resolver.records["workers.test"] = ["10.0.0.1", "10.0.0.3"]
    clock.advance(9)
    await discovery.refresh_due()
    assert resolver.lookups == 1, "not asked again before every_s"
    clock.advance(1)
    await discovery.refresh_due()
    assert pool.workers[0] is first, "a worker that stays keeps its state"
    assert [w.name for w in pool.workers] == ["p-0", "p-2"]
    assert leaving.in_flight == 1, "a removed worker's try runs on"
    pool.release(held, "ok")
    assert leaving.in_flight == 0


async def test_a_failed_lookup_keeps_the_workers() -> None:
    clock = FakeClock()
    resolver = FakeResolver({"workers.test": ["10.0.0.1"]})
    balancer = Balancer(dns_registry(), clock=clock)
    discovery = Discovery(balancer=balancer, resolver=resolver, clock=clock)
    await discovery.refresh_due()
    del resolver.records["workers.test"]
    clock.advance(10)
    await discovery.refresh_due()
    assert resolver.lookups == 2
    assert [w.url for w in balancer.pool("p").workers] == ["http://10.0.0.1:8000"]


async def test_ipv6_records_are_bracketed() -> None:
    balancer = Balancer(dns_registry())
    discovery = Discovery(balancer=balancer, resolver=FakeResolver({"workers.test": ["fd00::7"]}))
    await discovery.refresh_due()
    assert balancer.pool("p").workers[0].url == "http://[fd00::7]:8000"


async def test_the_real_resolver_answers_a_numeric_host_without_dns() -> None:
    assert await resolve_dns("127.0.0.1", 8000) == ["127.0.0.1"]


async def test_the_app_serves_through_discovered_workers() -> None:
    async with fake_worker(image_ok()) as worker:
        port = int(worker.url.rsplit(":", 1)[1])
        registry = dns_registry("workers.test", port)
        resolver = FakeResolver({"workers.test": ["127.0.0.1"]})
        async with gateway(registry, resolver=resolver) as gw:
            assert (await gw.client.get("/readyz")).status_code == 200
            resp = await gw.client.post("/v1/images/generations", json=body())
            assert resp.status_code == 200
    assert len(worker.received) == 1


async def test_a_pool_with_no_records_yet_is_not_ready() -> None:
    async with gateway(dns_registry(), resolver=FakeResolver()) as gw:
        process = await gw.client.get("/readyz")
        pool = await gw.client.get("/readyz?pool=p")
    assert process.status_code == 200  # readiness is the process's; the pool is out
    assert (pool.status_code, pool.json()["healthy"]) == (503, 0)


def test_check_shows_where_a_pools_workers_come_from() -> None:
    table = routing_table(dns_registry())
    assert "every A/AAAA record of http://workers.test:8000, every 10s" in table
