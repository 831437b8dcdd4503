"""The answer check: what it passes, what it refuses, and in what words."""

from __future__ import annotations

import base64
import json

import pytest

from gateway.answers import problem
from gateway.testing import JPEG_ANSWER, PNG_ANSWER, image_answer, image_bytes


def wrapped(data: bytes) -> bytes:
    return b'{"image":"' + base64.b64encode(data) + b'"}'


def test_a_real_jpeg_and_png_pass_for_their_format() -> None:
    assert problem(JPEG_ANSWER, "jpeg") is None
    assert problem(PNG_ANSWER, "raw") is None
    big = image_answer("jpeg", side=400)  # ~200 KB: the start and end are far apart
    assert problem(big, "jpeg") is None


@pytest.mark.parametrize(
    "shape",
    [
        b' {\n  "image" : "%s"\n}\n',  # JSON whitespace between every token
        b'{"image":"%s","seed":7}',  # an extra key
        b'{"seed":7,"image":"%s"}',  # another order
        b'{"image":"%s"}',  # plain; every escaping below goes through json.loads
    ],
)
def test_any_json_spelling_of_the_image_passes(shape: bytes) -> None:
    encoded = base64.b64encode(image_bytes("jpeg"))
    assert problem(shape % encoded, "jpeg") is None
    escaped = encoded.replace(b"/", b"\\/")  # JSON may escape "/"; JPEG's b64 has them
    assert b"\\/" in escaped
    assert problem(shape % escaped, "jpeg") is None


def test_the_usual_answer_is_checked_without_parsing_json(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_parse(body: bytes) -> object:
        raise AssertionError("json.loads on the fast path")

    monkeypatch.setattr(json, "loads", no_parse)  # the module gateway.answers uses
    assert problem(image_answer("jpeg", side=64), "jpeg") is None
    assert (
        problem(b' { "image" : "' + base64.b64encode(image_bytes("raw")) + b'" } ', "raw") is None
    )


JPEG = image_bytes("jpeg")
PNG = image_bytes("raw")


@pytest.mark.parametrize(
    ("body", "wanted", "expected"),
    [
        (b"", "jpeg", "with an empty body"),
        (b" \r\n", "jpeg", "with an empty body"),
        (b"<!doctype html><h1>502 Bad Gateway</h1>", "jpeg", "with HTML, not JSON"),
        (b"OK", "jpeg", "with a body that is not JSON (Expecting value, char 0)"),
        (b'{"image":"/9j/', "jpeg", "with a body that is not JSON (Unterminated string"),
        (JPEG_ANSWER + b"{}", "jpeg", "with a body that is not JSON (Extra data"),
        (b'{"image":"\xff\xfe"}', "jpeg", "with a body that is not JSON (not UTF-8)"),
        (b"[" * 100_000, "jpeg", "with a body that is not JSON (nested too deep)"),
        (b"[1, 2]", "jpeg", "with JSON that is not an object"),
        (b'{"result":"done"}', "jpeg", "without an image (keys: 'result')"),
        (b"{}", "jpeg", "without an image (keys: none)"),
        (b'{"image":null}', "jpeg", "with an image that is not a string"),
        (b'{"image":""}', "jpeg", "with an empty image"),
        (
            b'{"image":"!!!not base64!!!"}',
            "jpeg",
            "with an image that is not base64 (it holds '!')",
        ),
        (b'{"image":"/9j/4A AA"}', "jpeg", "with an image that is not base64 (it holds ' ')"),
        (
            b'{"image":"\\u00e9t\\u00e9"}',
            "jpeg",
            "with an image that is not base64 (non-ASCII text)",
        ),
        (
            json.dumps({"image": base64.encodebytes(JPEG).decode()}).encode(),  # MIME lines
            "jpeg",
            "with an image that is not base64 (it holds '\\n')",
        ),
        (b'{"image":"/9j/4AA"}', "jpeg", "with an image that is not base64 (length 7, not 4n)"),
        (b'{"image":"/9j=4AAA"}', "jpeg", "with an image that is not base64 ('=' before its end)"),
        (b'{"image":"/9j/4A=A"}', "jpeg", "with an image that is not base64 ("),
        (b'{"image":"aGVsbG8="}', "jpeg", "with an image that is not a JPEG"),
        (
            wrapped(PNG),
            "jpeg",
            "with a PNG image, not the JPEG that response_format 'jpeg' asks for",
        ),
        (
            wrapped(JPEG),
            "raw",
            "with a JPEG image, not the PNG that response_format 'raw' asks for",
        ),
        (wrapped(JPEG[:-1]), "jpeg", "with a JPEG cut short (no end-of-image marker)"),
        (wrapped(JPEG[: len(JPEG) // 2]), "jpeg", "with a JPEG cut short"),
        (wrapped(PNG[:-4]), "raw", "with a PNG cut short (no IEND chunk)"),
        (wrapped(JPEG[:30]), "jpeg", "with a JPEG cut short"),  # short: decoded whole
    ],
)
def test_what_is_wrong_is_said_exactly(body: bytes, wanted: str, expected: str) -> None:
    said = problem(body, wanted)  # type: ignore[arg-type]
    assert said is not None
    assert said.startswith(expected), said


def test_a_long_body_cut_short_fails_at_its_end() -> None:
    whole = image_answer("jpeg", side=200)
    assert problem(whole, "jpeg") is None
    encoded = base64.b64encode(image_bytes("jpeg", side=200))
    quanta = encoded[: len(encoded) // 8 * 4]  # half the image, still whole base64
    assert problem(b'{"image":"' + quanta + b'"}', "jpeg") == (
        "with a JPEG cut short (no end-of-image marker)"
    )
    assert problem(whole[:-2], "jpeg") is not None  # the JSON itself cut short


def test_base64url_is_refused_even_when_both_ends_decode() -> None:
    encoded = base64.urlsafe_b64encode(image_bytes("raw", side=16))
    ends = encoded[:12] + encoded[-24:]
    assert b"-" not in ends, "the case needs clean ends"
    assert b"_" not in ends, "the case needs clean ends"
    said = problem(b'{"image":"' + encoded + b'"}', "raw")
    assert said is not None
    assert said.startswith("with an image that is not base64 (it holds "), said
