from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import SimWorker, sim_workers


@pytest.fixture(scope="session")
def fast_sims() -> Iterator[list[SimWorker]]:
    """Two real sim workers, 1 ms a step, shared by the tests that only need images."""
    options = ["--step-ms", "1", "--concurrency", "4", "--adapter-load-ms", "0", "--size", "128"]
    with sim_workers(options, options) as workers:
        yield workers
