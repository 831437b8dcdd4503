from __future__ import annotations

import json
import re
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.schema import (
    MAX_SEED,
    VISIBLE_CHAR,
    ImageGenerationBody,
    WorkerRequest,
    error_list,
)
from tests.support import body


def invalid_field(payload: dict[str, Any]) -> list[Any]:
    with pytest.raises(ValidationError) as info:
        ImageGenerationBody.model_validate_json(json.dumps(payload))
    return [err["loc"] for err in error_list(info.value)]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_inference_steps": 20.5}, "num_inference_steps"),
        ({"num_inference_steps": "20"}, "num_inference_steps"),
        ({"num_inference_steps": 20.0}, "num_inference_steps"),
        ({"num_inference_steps": True}, "num_inference_steps"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 51}, "num_inference_steps"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"guidance_scale": "7.5"}, "guidance_scale"),
        ({"guidance_scale": True}, "guidance_scale"),
        ({"guidance_scale": 1e999}, "guidance_scale"),
        ({"response_format": "png"}, "response_format"),
        ({"seed": -1}, "seed"),
        ({"seed": MAX_SEED + 1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"model": 3}, "model"),
    ],
)
def test_each_rule_is_a_422_naming_the_field(overrides: dict[str, Any], field: str) -> None:
    assert ["body", field] in invalid_field(body(**overrides))


@pytest.mark.parametrize("missing", ["prompt", "num_inference_steps", "guidance_scale"])
def test_required_fields(missing: str) -> None:
    payload = body()
    del payload[missing]
    assert ["body", missing] in invalid_field(payload)


def test_not_json_is_a_body_level_error() -> None:
    with pytest.raises(ValidationError) as info:
        ImageGenerationBody.model_validate_json(b"prompt=fox")
    (err,) = error_list(info.value)
    assert err["loc"] == ["body"]
    assert err["type"] == "json_invalid"


def test_valid_body_keeps_values_and_drops_unknown_fields() -> None:
    parsed = ImageGenerationBody.model_validate_json(
        '{"prompt":"fox","num_inference_steps":50,"guidance_scale":7,'
        '"seed":4294967295,"response_format":"raw","model":null,"size":"1024x1024"}'
    )
    assert parsed.guidance_scale == 7.0
    assert isinstance(parsed.guidance_scale, float)
    assert parsed.seed == MAX_SEED
    assert "size" not in parsed.model_dump()


def test_worker_request_decides_every_optional_field() -> None:
    parsed = ImageGenerationBody.model_validate(body())
    job = WorkerRequest.from_body(parsed, upstream_model="pixel-art")
    assert job.model == "pixel-art"
    assert job.response_format == "jpeg"
    assert 0 <= job.seed <= MAX_SEED
    seeded = WorkerRequest.from_body(parsed.model_copy(update={"seed": 7}), upstream_model=None)
    assert seeded.seed == 7
    assert seeded.model is None


def test_blank_means_what_python_calls_whitespace_in_parser_and_document() -> None:
    whitespace = [chr(c) for c in range(0x110000) if chr(c).isspace()]
    visible = re.compile(VISIBLE_CHAR)
    assert not any(visible.match(ch) for ch in whitespace)
    assert all(visible.match(ch) for ch in "a\u00e9\u4e2d\ufeff\x00\x7f")
    for blank in ("\x1c", " \u3000\t", "\u2028"):
        assert invalid_field(body(prompt=blank)) == [["body", "prompt"]]
