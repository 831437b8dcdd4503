"""Request ids and the JSON access log (pure ASGI middleware)."""

from __future__ import annotations

import json
import logging

import pytest

from gateway.logs import ACCESS_LOGGER, JsonFormatter
from gateway.registry import parse_registry
from tests.support import SimWorker, body, gateway_client, registry_yaml


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    formatter = JsonFormatter()
    return [json.loads(formatter.format(r)) for r in caplog.records if r.name == ACCESS_LOGGER]


async def test_one_json_line_per_request_without_the_prompt(
    fast_sims: list[SimWorker], caplog: pytest.LogCaptureFixture
) -> None:
    registry = parse_registry(registry_yaml({"p": [s.url for s in fast_sims]}))
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    async with gateway_client(registry) as client:
        await client.post(
            "/v1/images/generations",
            json=body(prompt="a secret family photo", seed=11),
            headers={"x-request-id": "req-42"},
        )
        await client.get("/healthz")  # probes are not logged
    (line,) = access_lines(caplog)
    assert line["request_id"] == "req-42"
    assert line["status"] == 200
    assert (line["adapter"], line["pool"], line["seed"], line["cache"]) == ("p", "p", 11, "miss")
    assert str(line["worker"]).startswith("p-")
    assert float(str(line["duration_ms"])) >= float(str(line["upstream_ms"])) > 0
    assert "secret" not in json.dumps(line)


async def test_prompts_are_logged_only_when_the_registry_says_so(
    fast_sims: list[SimWorker], caplog: pytest.LogCaptureFixture
) -> None:
    text = registry_yaml({"p": [s.url for s in fast_sims]}) + "log_prompts: true\n"
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    async with gateway_client(parse_registry(text)) as client:
        await client.post("/v1/images/generations", json=body(prompt="a red fox"))
    (line,) = access_lines(caplog)
    assert line["prompt"] == "a red fox"


async def test_errors_are_logged_with_their_status(
    fast_sims: list[SimWorker], caplog: pytest.LogCaptureFixture
) -> None:
    registry = parse_registry(registry_yaml({"p": [s.url for s in fast_sims]}))
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    async with gateway_client(registry) as client:
        await client.post("/v1/images/generations", json=body(model="nope"))
    (line,) = access_lines(caplog)
    assert (line["status"], line["adapter"]) == (404, "unknown")
