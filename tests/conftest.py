from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from gateway.settings import ENV_VARIABLES
from gateway.simworker import create_sim_app
from gateway.testing import FAST_SIM, ServedSim, serve_in_thread
from tests.support import RedisServer, redis_server

# A developer's own settings never reach what the tests start: a GATEWAY_REDIS_URL
# would point every "memory cache" gateway process at their Redis. Tests that need a
# variable pass it to the process they start.
for _name in ENV_VARIABLES:
    os.environ.pop(_name, None)


@pytest.fixture(scope="session")
def fast_sims() -> Iterator[list[ServedSim]]:
    """Two sim workers (1 ms a step, 128 px) shared by the tests that only need real,
    deterministic images. Served in this process, each in a thread of its own, so that
    sync tests, and the gateway processes some tests start, reach them as well."""
    with contextlib.ExitStack() as stack:
        sims = []
        for _ in range(2):
            app = create_sim_app(FAST_SIM)
            sims.append(ServedSim(stack.enter_context(serve_in_thread(app)), app))
        yield sims


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
