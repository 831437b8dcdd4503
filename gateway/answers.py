"""Is a worker's 200 an image? The check of a friendli-container success body.

The body goes to the client, and into the cache, byte for byte: a broken one would be
served, and served again from every replica's cache for a day. `problem()` says what
is wrong with one (None: nothing) without a full JSON parse or base64 decode:

1. Shape, by a scan of both ends: `{"image":"` at the start and `"}` at the end, JSON
   whitespace allowed between the tokens. Anything else (an escaped `\\/`, a second
   key, another key order) falls back to `json.loads`: correct, slower, and rare.
2. Alphabet: `bytes.translate(None, ALPHABET)` deletes every base64 byte of the image
   string in one C loop; what is left is what is wrong. A string of base64 bytes holds
   no quote, backslash or control byte, so 1 and 2 together prove that the body is
   exactly the JSON object `{"image": <that string>}`, without parsing it.
3. Form: a length that is a multiple of 4, `=` only as the last one or two characters.
4. The image's two ends, by decoding only the first 12 and last 24 base64 characters:
   JPEG (`jpeg`) starts FF D8 FF and ends with its end-of-image marker FF D9; PNG
   (`raw`) starts with its 8-byte signature and ends with the IEND chunk. The start
   catches text, HTML or the other format in base64; the end catches an image cut
   short, which still has its start.

Why that is enough: it proves what a client needs from a 200: JSON it can parse, an
`image` it can decode, and a whole file of the format it asked for. It does not prove
the pixels in between; that takes an image decoder (milliseconds an image, more than
the whole gateway costs a request), and the ways an answer goes wrong between a worker
and the gateway (an error page, a missing field, text or the other format, a body cut
short, garbage) do not leave both ends of the right image format intact.

The alphabet pass is the one cost worth paying beyond the ends: a worker that writes
base64url (`-`, `_`) or wraps its lines, or a proxy that mangles the middle, can leave
both ends decodable (a PNG's base64 starts `iVBORw0KGgo` either way), and the image
would then fail in the client's decoder.

Cost: one pass of `translate` over the image string (about 0.5 ns a byte) and a few
small slices: about 80 us on a 150 KB answer, against about 680 us for `json.loads` +
`b64decode` of the same body (`python -m bench.overhead --check-only`, bench/README.md).
"""

from __future__ import annotations

import binascii
import json
import re
from dataclasses import dataclass

from gateway.schema import ResponseFormat

_JSON_SPACE = rb"[ \t\r\n]*"
_HEAD = re.compile(
    _JSON_SPACE + rb"\{" + _JSON_SPACE + rb'"image"' + _JSON_SPACE + rb":" + _JSON_SPACE + rb'"'
)
_TAIL = re.compile(rb'"' + _JSON_SPACE + rb"\}" + _JSON_SPACE)
ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_START_CHARS = 12  # 9 bytes: the PNG signature (8), JPEG's start (3)
_END_CHARS = 24  # at least 16 bytes after padding: the IEND chunk (12), JPEG's end (2)
_MAX_KEYS_SHOWN = 3


@dataclass(frozen=True, slots=True)
class ImageFormat:
    name: str
    start: bytes
    end: bytes
    end_name: str


JPEG = ImageFormat("JPEG", b"\xff\xd8\xff", b"\xff\xd9", "end-of-image marker")
PNG = ImageFormat("PNG", b"\x89PNG\r\n\x1a\n", b"\x00\x00\x00\x00IEND\xaeB`\x82", "IEND chunk")
FORMATS: dict[ResponseFormat, ImageFormat] = {"jpeg": JPEG, "raw": PNG}


class _Wrong(Exception):
    """What is wrong, as words that follow "worker w answered 200 "."""


def problem(body: bytes, response_format: ResponseFormat) -> str | None:
    """None when `body` is a success answer with an image in `response_format`; else
    what is wrong with it, e.g. "without an image", to follow "answered 200 "."""
    try:
        encoded = _image_text(body)
        _check_base64(encoded)
        _check_ends(encoded, response_format)
    except _Wrong as wrong:
        return str(wrong)
    return None


def _image_text(body: bytes) -> bytes:
    """The base64 text of `image`: sliced out when the body is exactly
    `{"image":"<base64 alphabet>"}`, else found by json.loads."""
    head = _HEAD.match(body)
    end = body.rfind(b'"')
    if head is not None and head.end() <= end and _TAIL.fullmatch(body, end):
        encoded = body[head.end() : end]
        if not encoded.translate(None, ALPHABET):
            return encoded
    return _parsed_image_text(body)


def _parsed_image_text(body: bytes) -> bytes:
    if not body.strip(b" \t\r\n"):
        raise _Wrong("with an empty body")
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        if body.lstrip().startswith(b"<"):
            raise _Wrong("with HTML, not JSON") from None
        raise _Wrong(f"with a body that is not JSON ({exc.msg}, char {exc.pos})") from None
    except UnicodeDecodeError:
        raise _Wrong("with a body that is not JSON (not UTF-8)") from None
    except RecursionError:  # "[[[[...": bounded by max_response_bytes, not by depth
        raise _Wrong("with a body that is not JSON (nested too deep)") from None
    if not isinstance(data, dict):
        raise _Wrong("with JSON that is not an object")
    if "image" not in data:
        keys = ", ".join(repr(str(k)[:32]) for k in list(data)[:_MAX_KEYS_SHOWN])
        raise _Wrong(f"without an image (keys: {keys or 'none'})")
    image = data["image"]
    if not isinstance(image, str):
        raise _Wrong("with an image that is not a string")
    try:
        encoded = image.encode("ascii")
    except UnicodeEncodeError:
        raise _Wrong("with an image that is not base64 (non-ASCII text)") from None
    stray = encoded.translate(None, ALPHABET)
    if stray:
        raise _Wrong(f"with an image that is not base64 (it holds {chr(stray[0])!r})")
    return encoded


def _check_base64(encoded: bytes) -> None:
    """Only base64 bytes are left here: check the length and where `=` stands."""
    if not encoded:
        raise _Wrong("with an empty image")
    if len(encoded) % 4:
        raise _Wrong(f"with an image that is not base64 (length {len(encoded)}, not 4n)")
    pad = encoded.find(b"=")
    if 0 <= pad < len(encoded) - 2:
        raise _Wrong("with an image that is not base64 ('=' before its end)")


def _check_ends(encoded: bytes, response_format: ResponseFormat) -> None:
    wanted = FORMATS[response_format]
    if len(encoded) <= _START_CHARS + _END_CHARS:
        start = end = _decode(encoded)
    else:
        start, end = _decode(encoded[:_START_CHARS]), _decode(encoded[-_END_CHARS:])
    if not start.startswith(wanted.start):
        other = next((f for f in FORMATS.values() if start.startswith(f.start)), None)
        if other is not None:
            raise _Wrong(
                f"with a {other.name} image, not the {wanted.name} that "
                f"response_format {response_format!r} asks for"
            )
        raise _Wrong(f"with an image that is not a {wanted.name}")
    if not end.endswith(wanted.end):
        raise _Wrong(f"with a {wanted.name} cut short (no {wanted.end_name})")


def _decode(quanta: bytes) -> bytes:
    try:
        return binascii.a2b_base64(quanta, strict_mode=True)
    except binascii.Error as exc:
        raise _Wrong(f"with an image that is not base64 ({exc})") from None
