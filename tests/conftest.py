from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import RedisServer, SimWorker, redis_server, sim_workers


@pytest.fixture(scope="session")
def fast_sims() -> Iterator[list[SimWorker]]:
    """Two real sim workers, 1 ms a step, shared by the tests that only need images."""
    options = ["--step-ms", "1", "--concurrency", "4", "--adapter-load-ms", "0", "--size", "128"]
    with sim_workers(options, options) as workers:
        yield workers


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[RedisServer]:
    """One real redis-server for the tests that need a healthy one (see `redis_url`)."""
    with redis_server() as server:
        yield server


@pytest.fixture
def redis_url(shared_redis: RedisServer) -> str:
    """The shared redis-server, emptied for this test."""
    with shared_redis.client() as client:
        client.flushall()
    return shared_redis.url
