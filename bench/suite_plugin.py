"""A pytest plugin for bench/suite.py: counts the tests that start a subprocess.

Loaded with `-p suite_plugin` (bench/ on PYTHONPATH); writes its counts as JSON to the
file named by SUITE_REPORT at the end of the session. A subprocess started by a fixture
counts for the test whose setup started it.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Generator
from typing import Any

import pytest

_current: list[str] = [""]
_by_test: dict[str, int] = {}
_outcomes = {"tests": 0, "failed": 0}
_original_init = subprocess.Popen.__init__


def _counting_init(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
    _by_test[_current[0]] = _by_test.get(_current[0], 0) + 1
    _original_init(self, *args, **kwargs)


def pytest_configure(config: pytest.Config) -> None:
    subprocess.Popen.__init__ = _counting_init  # type: ignore[method-assign]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None]:
    _current[0] = item.nodeid
    try:
        return (yield)
    finally:
        _current[0] = ""


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _outcomes["tests"] += 1
    if report.failed:
        _outcomes["failed"] += 1


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("SUITE_REPORT")
    if not path:
        return
    tests = {name: n for name, n in _by_test.items() if name}
    counts = {
        **_outcomes,
        "subprocess_tests": len(tests),
        "subprocesses": sum(_by_test.values()),
    }
    with open(path, "w") as f:
        json.dump(counts, f)
