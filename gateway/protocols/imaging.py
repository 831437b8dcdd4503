"""A worker's image as the client's answer: `{"image": "<base64>"}` in the format asked.

The client asks for JPEG (`jpeg`) or PNG (`raw`); servers answer in the format they
were set up for (AUTOMATIC1111: its `samples_format`, PNG by default; vLLM-Omni: PNG;
SGLang: what `output_format` asked; Cog: its `output_format` input). So:

- the image's first bytes say its format (`sniff`); when it is the one asked, its
  bytes (or its base64 text, for servers that answer base64) pass through untouched:
  no decode, no re-encode;
- otherwise it is decoded and re-encoded with Pillow: JPEG at the pool's
  `jpeg_quality`, PNG at compression level 1 (a 1024x1024 PNG at level 6, Pillow's
  default, takes ~4x as long to write for ~3% fewer bytes). Re-encoding drops the
  image's metadata (AUTOMATIC1111 writes its prompt, model and version into it);
- either way the result goes through `gateway.answers.problem` before it is returned,
  so what a protocol hands back has passed the same check as a friendli-container
  worker's body.

Decoding and re-encoding cost tens of milliseconds of CPU for a 1024x1024 image, so
`to_answer` runs them in a thread, never on the event loop; the pass-through is quick
enough to stay on it. A worker's image that does not decode, or whose header claims
more than MAX_PIXELS, is Cause.BAD_ANSWER with a phrase saying why.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
import warnings
import zlib
from typing import Any

from PIL import Image

from gateway.answers import FORMATS, problem
from gateway.causes import Cause
from gateway.errors import UpstreamError
from gateway.schema import ResponseFormat

PNG_COMPRESS_LEVEL = 1
# 8192 x 8192: far beyond what any diffusion server draws, and a bound on the memory a
# lying header can make the decoder take (~200 MB for RGB).
MAX_PIXELS = 8192 * 8192
_SNIFF_CHARS = 16  # base64 characters enough for the longest signature (PNG's 8 bytes)
_SIGNATURES = {
    "PNG": b"\x89PNG\r\n\x1a\n",
    "JPEG": b"\xff\xd8\xff",
    "GIF": b"GIF8",
    "BMP": b"BM",
}
_PIL_FORMAT: dict[ResponseFormat, str] = {"jpeg": "JPEG", "raw": "PNG"}


class BadImage(Exception):
    """What is wrong with a worker's image, as words that follow "answered 200 "."""


def string_at(body: bytes, lead: re.Pattern[bytes]) -> bytes | None:
    """The JSON string `lead` leads to (`lead` ends at its opening quote), sliced out of
    `body` without parsing it: a base64 string holds no escape, so it ends at the next
    quote. None when `lead` is not found or the string holds a backslash (then parse).

    Why: `json.loads` of a 2 MB answer builds a 2 MB str (~3.5 ms); this is ~0.2 ms.
    A lead cannot match inside another JSON string, where its quotes would be escaped."""
    found = lead.search(body)
    if found is None:
        return None
    end = body.find(b'"', found.end())
    if end < 0:
        return None
    text = body[found.end() : end]
    return None if b"\\" in text else text


_PNG_TEXT = (b"tEXt", b"iTXt", b"zTXt", b"eXIf")
# What a blanked text chunk becomes: ancillary (b), private (l), reserved bit clear (N),
# safe to copy (k). Decoders skip chunk types they do not know when ancillary (the PNG
# spec, 5.4), so its zeroed data is never read as text.
PNG_BLANK = b"blNk"
_JPEG_DROPPED = {0xE1, 0xFE}  # APP1 (Exif, XMP) and COM; APP0 (JFIF), APP2 (ICC) stay


def strip_jpeg_metadata(jpeg: bytes) -> bytes:
    """`jpeg` without its Exif/XMP and comment segments, its pixels untouched: servers
    write generation parameters there (AUTOMATIC1111: the prompt, the model's name and
    hash, its own version). A structure that does not parse is returned as it is (the
    answer check still reads the image's ends). A PNG's: `blank_png_text`."""
    try:
        return _strip_jpeg(jpeg)
    except (IndexError, ValueError):
        return jpeg


def blank_png_text(encoded: bytes) -> bytes:
    """The base64 text of a PNG with its text and Exif chunks blanked where they
    stand: each becomes a PNG_BLANK chunk of the same length, zeros for data, its CRC
    valid; every other chunk stays byte for byte. BadImage when its chunks do not run
    from the signature to an IEND chunk that ends the file.

    Why in place, in base64: only the chunks' 8-byte heads and the blanked chunks are
    decoded and re-encoded (a few base64 quanta each), and the rest is copied once, so
    the cost is the number of chunks and one copy, not a decode and an encode of every
    byte; removing a chunk would shift every byte after it, and then its base64 all
    had to be written anew (~7x a passthrough for a 766 KB PNG, bench/README.md). The
    blank keeps its length: the length of the text it replaced is all that is left."""
    if len(encoded) % 4:
        raise BadImage(f"with an image that is not base64 (length {len(encoded)}, not 4n)")
    size = len(encoded) // 4 * 3 - encoded[-2:].count(b"=")
    blanks: list[tuple[int, bytes]] = []  # (where in the image, the bytes that go there)
    at = len(_SIGNATURES["PNG"])
    while True:
        if at + 12 > size:
            raise BadImage("with a PNG cut short (no IEND chunk)")
        # Blanking a chunk changes only its own type, data and CRC: the next chunk's
        # head reads the same from the original text.
        head = _b64_read(encoded, at, 8)
        length, kind = int.from_bytes(head[:4], "big"), head[4:]
        end = at + 12 + length  # length, type, data, CRC
        if end > size:
            raise BadImage("with a PNG whose chunks run past its end")
        if kind == b"IEND":
            if end != size:
                raise BadImage("with bytes after the PNG's IEND chunk")
            return _patched(encoded, blanks) if blanks else encoded
        if kind in _PNG_TEXT:
            blank = PNG_BLANK + bytes(length)
            blanks.append((at + 4, blank + zlib.crc32(blank).to_bytes(4, "big")))
        at = end


def _quanta(start: int, count: int) -> tuple[int, int]:
    """The base64 characters [from, to) that hold image bytes [start, start + count)."""
    return start // 3 * 4, -(-(start + count) // 3) * 4


def _b64_read(encoded: bytes, start: int, count: int) -> bytes:
    first, last = _quanta(start, count)
    try:
        raw = binascii.a2b_base64(encoded[first:last], strict_mode=True)
    except binascii.Error as exc:
        raise BadImage(f"with an image that is not base64 ({exc})") from None
    at = start - first // 4 * 3
    return raw[at : at + count]


def _patched(encoded: bytes, blanks: list[tuple[int, bytes]]) -> bytes:
    """`encoded` with image bytes [start, start + len(data)) replaced by `data` for
    each blank, in order: the same number of bytes, so the same number of base64
    characters. Two blanks never share a quantum: the next chunk's 4 length bytes,
    untouched, lie between them. The text between blanks is copied once, into the
    result."""
    view, pieces, done = memoryview(encoded), list[bytes | memoryview](), 0
    for start, data in blanks:
        first, last = _quanta(start, len(data))
        try:
            raw = bytearray(binascii.a2b_base64(view[first:last], strict_mode=True))
        except binascii.Error as exc:
            raise BadImage(f"with an image that is not base64 ({exc})") from None
        at = start - first // 4 * 3
        raw[at : at + len(data)] = data
        pieces += [view[done:first], binascii.b2a_base64(raw, newline=False)]
        done = last
    pieces.append(view[done:])
    return b"".join(pieces)


def _strip_jpeg(jpeg: bytes) -> bytes:
    kept, at = [jpeg[:2]], 2
    while True:  # segments up to the start of scan; what follows is image data
        if jpeg[at] != 0xFF:
            raise ValueError("not a marker")
        marker = jpeg[at + 1]
        if marker == 0xDA:
            kept.append(jpeg[at:])
            return b"".join(kept)
        end = at + 2 + int.from_bytes(jpeg[at + 2 : at + 4], "big")
        if marker not in _JPEG_DROPPED:
            kept.append(jpeg[at:end])
        at = end


def parse_json(body: bytes, worker: str) -> Any:
    """`body` parsed, or Cause.BAD_ANSWER saying why it is not JSON."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        head = (
            "with HTML, not JSON"
            if body.lstrip().startswith(b"<")
            else "with a body that is not JSON"
        )
        raise bad_answer(worker, head) from None


def sniff(image: bytes) -> str | None:
    """The image format `image` starts with (PNG, JPEG, WEBP, GIF, BMP), if known."""
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return "WEBP"
    return next((name for name, magic in _SIGNATURES.items() if image.startswith(magic)), None)


def sniff_b64(encoded: bytes) -> str | None:
    """`sniff` of base64 text, decoding only its first characters."""
    try:
        return sniff(binascii.a2b_base64(encoded[:_SNIFF_CHARS]))
    except binascii.Error:
        return None


def image_response(
    image: bytes, response_format: ResponseFormat, *, jpeg_quality: int, worker: str
) -> bytes:
    """The client's body for `image` (bytes of any format Pillow reads): JPEG for
    `jpeg`, PNG for `raw`; re-encoded only when `image` is in the other format."""
    if sniff(image) != FORMATS[response_format].name:
        image = _reencode(image, response_format, jpeg_quality=jpeg_quality, worker=worker)
    return _checked(_body(base64.b64encode(image)), response_format, worker)


def b64_image_response(
    encoded: bytes, response_format: ResponseFormat, *, jpeg_quality: int, worker: str
) -> bytes:
    """As `image_response`, from the image's base64 text: passed through as it is
    when it already holds the format asked (the answer check still reads it whole)."""
    if sniff_b64(encoded) == FORMATS[response_format].name:
        return _checked(_body(encoded), response_format, worker)
    try:
        image = base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise bad_answer(worker, f"with an image that is not base64 ({exc})") from None
    return image_response(image, response_format, jpeg_quality=jpeg_quality, worker=worker)


async def to_answer(
    encoded: bytes, response_format: ResponseFormat, *, jpeg_quality: int, worker: str
) -> bytes:
    """`b64_image_response`, with the decode and re-encode (if any) in a thread."""
    if sniff_b64(encoded) == FORMATS[response_format].name:
        return _checked(_body(encoded), response_format, worker)
    return await asyncio.to_thread(
        b64_image_response, encoded, response_format, jpeg_quality=jpeg_quality, worker=worker
    )


async def bytes_to_answer(
    image: bytes, response_format: ResponseFormat, *, jpeg_quality: int, worker: str
) -> bytes:
    """`image_response`, with the re-encode (if any) in a thread (the base64 of a
    matching image stays on the loop: about 1 ms a megabyte)."""
    if sniff(image) == FORMATS[response_format].name:
        return image_response(image, response_format, jpeg_quality=jpeg_quality, worker=worker)
    return await asyncio.to_thread(
        image_response, image, response_format, jpeg_quality=jpeg_quality, worker=worker
    )


def _reencode(
    image: bytes, response_format: ResponseFormat, *, jpeg_quality: int, worker: str
) -> bytes:
    try:
        picture = _decode(image)
    except BadImage as exc:
        raise bad_answer(worker, str(exc)) from None
    out = io.BytesIO()
    if response_format == "jpeg":
        if picture.mode not in ("RGB", "L"):
            picture = picture.convert("RGB")  # JPEG has no alpha or palette
        picture.save(out, format="JPEG", quality=jpeg_quality)
    else:
        picture.save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()


def _decode(image: bytes) -> Image.Image:
    if not image:
        raise BadImage("with an empty image")
    with warnings.catch_warnings():
        # Pillow warns (DecompressionBombWarning) past its own limit; ours is checked below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            picture = Image.open(io.BytesIO(image))
            width, height = picture.size
            if width * height > MAX_PIXELS:
                raise BadImage(f"with an image of {width}x{height}, over {MAX_PIXELS} pixels")
            picture.load()
        # Pillow's decoders report bad input with any of these, depending on the format.
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
            kind = sniff(image)
            what = f"a {kind} that does not decode" if kind else "an image of no known format"
            raise BadImage(f"with {what}") from None
    return picture


def _body(encoded: bytes) -> bytes:
    # One join, one copy of a megabyte: `a + b + c` would make two.
    return b"".join((b'{"image":"', encoded, b'"}'))


def _checked(body: bytes, response_format: ResponseFormat, worker: str) -> bytes:
    if (wrong := problem(body, response_format)) is not None:
        raise bad_answer(worker, wrong)
    return body


def bad_answer(worker: str, wrong: str) -> UpstreamError:
    """Cause.BAD_ANSWER: worker `worker` "answered 200 " + `wrong`."""
    return UpstreamError(Cause.BAD_ANSWER, f"worker {worker}", f"answered 200 {wrong}")
