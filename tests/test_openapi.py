"""The OpenAPI document: generated from the pydantic models, served at /openapi.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.openapi import openapi_document
from gateway.schema import ImageGenerationBody
from gateway.testing import gateway_client, registry_yaml
from tests.support import api_key, dead_url, gateway_from_file, make_registry

WORKERS = {"p": [dead_url()]}


def test_document_describes_the_api_from_the_models() -> None:
    doc = openapi_document(make_registry(WORKERS, sections={"limits": {"max_prompt_chars": 99}}))
    assert doc["openapi"] == "3.1.0"
    assert set(doc["paths"]) == {
        "/v1/images/generations",
        "/v1/models",
        "/healthz",
        "/readyz",
        "/status",
    }
    readyz = doc["paths"]["/readyz"]["get"]
    assert [p["name"] for p in readyz["parameters"]] == ["pool", "verbose"]
    assert {"200", "404", "503"} == set(readyz["responses"])
    assert {"Status", "PoolStatus", "WorkerStatus"} <= set(doc["components"]["schemas"])
    schemas = doc["components"]["schemas"]
    assert {"ImageGenerationBody", "ImageResponse", "ErrorBody", "ValidationErrorBody"} <= set(
        schemas
    )
    body = schemas["ImageGenerationBody"]
    assert body["required"] == ["prompt", "num_inference_steps", "guidance_scale"]
    assert body["properties"]["prompt"]["maxLength"] == 99
    model_fields = ImageGenerationBody.model_json_schema()["properties"]
    assert set(body["properties"]) == set(model_fields)
    generate = doc["paths"]["/v1/images/generations"]["post"]
    assert {"200", "401", "403", "404", "413", "415", "422", "429", "502", "504"} <= set(
        generate["responses"]
    )
    assert generate["security"] == []  # an open gateway


def test_document_asks_for_a_bearer_key_when_auth_is_on() -> None:
    auth = {"keys": [api_key("team-a", "k")]}
    doc = openapi_document(make_registry(WORKERS, sections={"auth": auth}))
    assert doc["paths"]["/v1/images/generations"]["post"]["security"] == [{"bearer": []}]
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    assert doc["paths"]["/status"]["get"]["security"] == [], "open, as /metrics, without its key"
    guarded = {"keys": [api_key("team-a", "k")], "metrics_key_sha256": "0" * 64}
    doc = openapi_document(make_registry(WORKERS, sections={"auth": guarded}))
    assert doc["paths"]["/status"]["get"]["security"] == [{"bearer": []}]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


async def test_served_at_openapi_json_without_a_key() -> None:
    registry = make_registry(WORKERS, sections={"auth": {"keys": [api_key("team-a", "k")]}})
    async with gateway_client(registry) as client:
        resp = await client.get("/openapi.json")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == openapi_document(registry)


async def test_the_document_follows_a_reload(tmp_path: Path) -> None:
    text = registry_yaml({"p": [dead_url()]}, sections={"limits": {"max_prompt_chars": 100}})
    path = tmp_path / "adapters.yaml"
    async with gateway_from_file(path, text) as gw:
        before = (await gw.client.get("/openapi.json")).json()
        path.write_text(text.replace("max_prompt_chars: 100", "max_prompt_chars: 200"))
        assert (await gw.client.post("/admin/reload")).json()["status"] == "ok"
        after = (await gw.client.get("/openapi.json")).json()
    prompt = "components", "schemas", "ImageGenerationBody", "properties", "prompt"

    def max_length(document: dict[str, Any]) -> Any:
        for part in prompt:
            document = document[part]
        return document["maxLength"]

    assert (max_length(before), max_length(after)) == (100, 200)
