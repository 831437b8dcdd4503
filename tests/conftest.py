from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from gateway.settings import ENV_VARIABLES
from tests.support import RedisServer, SimWorker, redis_server, sim_workers

# A developer's own settings never reach what the tests start: a GATEWAY_REDIS_URL
# would point every "memory cache" gateway process at their Redis. Tests that need a
# variable pass it to the process they start.
for _name in ENV_VARIABLES:
    os.environ.pop(_name, None)


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
