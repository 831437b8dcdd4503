"""The HTTP exchange every protocol shares: one request, a bounded read, one vocabulary.

    post_json / get_json    one request to a worker; the whole answer as an `Answer`,
                            at most `max_bytes` (over: Cause.TOO_LARGE, refused as it
                            arrives); aiohttp's exceptions as `UpstreamError`s through
                            `gateway.protocols.client_errors` (a lost connection is
                            RESET before the answer began, TRUNCATED after)
    refusal                 a non-200 answer as the error the client gets: a 4xx that
                            means bad input stays that 4xx, with the worker's own words
                            on one line; 429 and 503-with-Retry-After are busy; the rest
                            is a Cause, and a 5xx body never reaches the client
    error_message           the message of the error bodies the servers write: OpenAI's
                            `{"error": {"message"}}`, FastAPI's `{"detail": str | [...]}`,
                            AUTOMATIC1111's `{"error": name, "detail": ...}`, `{"message"}`

Redirects are never followed and the session never decompresses (it asks for
`identity`), so what is read is what the worker sent.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.causes import Cause
from gateway.errors import UpstreamError, UpstreamRejected
from gateway.protocols.client_errors import upstream_error
from gateway.registry import PoolSpec

# identity: the session does not decompress (a friendli-container worker's bytes go to
# the client as they came), so a worker must not compress; aiohttp would offer gzip.
_JSON = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
_GET = {"Accept": "application/json", "Accept-Encoding": "identity"}
MAX_MESSAGE = 300


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: Mapping[str, str]  # case-insensitive (aiohttp's CIMultiDictProxy)
    body: bytes

    @property
    def retry_after(self) -> bool:
        return "Retry-After" in self.headers


Check = Callable[[Answer], None]
"""Run on a 200 before the connection goes back to the pool; an UpstreamError it raises
closes the connection first (what else such a worker sent is not a next answer)."""


async def post_json(
    session: aiohttp.ClientSession,
    url: str,
    payload: bytes | Mapping[str, Any],
    *,
    worker: str,
    timeout: aiohttp.ClientTimeout,
    headers: Mapping[str, str],
    max_bytes: int,
    check: Check | None = None,
) -> Answer:
    """POST `payload` (JSON bytes, or an object to write as JSON) to `url`."""
    data = payload if isinstance(payload, bytes) else _dumps(payload)
    return await _exchange(
        session.post(
            url, data=data, headers={**_JSON, **headers}, timeout=timeout, allow_redirects=False
        ),
        worker=worker,
        timeout=timeout,
        max_bytes=max_bytes,
        check=check,
    )


async def get_json(
    session: aiohttp.ClientSession,
    url: str,
    *,
    worker: str,
    timeout: aiohttp.ClientTimeout,
    headers: Mapping[str, str],
    max_bytes: int,
) -> Answer:
    """GET `url` (a health or status route)."""
    return await _exchange(
        session.get(url, headers={**_GET, **headers}, timeout=timeout, allow_redirects=False),
        worker=worker,
        timeout=timeout,
        max_bytes=max_bytes,
        check=None,
    )


async def probe_get(
    session: aiohttp.ClientSession,
    url: str,
    *,
    timeout: aiohttp.ClientTimeout,
    headers: Mapping[str, str],
    pool: PoolSpec,
) -> Answer | None:
    """A health probe's GET: the answer (read up to what the pool's workers may answer
    at all), or None when the worker could not be reached or answered broken HTTP,
    which every protocol reads as "down"."""
    try:
        return await get_json(
            session,
            url,
            worker="probe",
            timeout=timeout,
            headers=headers,
            max_bytes=pool.max_response_bytes,
        )
    except UpstreamError:
        return None


async def _exchange(
    request: Any,  # aiohttp's _RequestContextManager: not a public type
    *,
    worker: str,
    timeout: aiohttp.ClientTimeout,
    max_bytes: int,
    check: Check | None,
) -> Answer:
    answered = False  # a lost connection before the answer began is safe to retry
    try:
        async with request as resp:
            answered = True
            answer = Answer(resp.status, resp.headers, await _read(resp, max_bytes, worker))
            if check is not None and answer.status == 200:
                try:
                    check(answer)
                except UpstreamError:
                    resp.close()
                    raise
            return answer
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise upstream_error(
            exc, worker=worker, answered=answered, timeout_s=timeout.total
        ) from exc


async def _read(resp: aiohttp.ClientResponse, limit: int, worker: str) -> bytes:
    """The whole answer, at most `limit` bytes: refused before reading when its
    Content-Length is over, else as soon as what arrived is over."""
    length = resp.content_length
    if length is not None:
        if length > limit:
            resp.close()
            raise _too_large(resp.status, worker, f"{length} bytes", limit)
        return await resp.read()
    chunks, size = [], 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            resp.close()
            raise _too_large(resp.status, worker, f"more than {limit} bytes", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(status: int, worker: str, size: str, limit: int) -> UpstreamError:
    what = f"answered {status} with {size}, over max_response_bytes ({limit})"
    return UpstreamError(Cause.TOO_LARGE, f"worker {worker}", what)


def _dumps(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def refusal(
    answer: Answer, worker: str, *, message: Callable[[bytes], str] | None = None
) -> UpstreamError | UpstreamRejected:
    """A non-200 `answer` as the error to raise. A 4xx (but 408 and 429) is the
    client's input: the same status, with the worker's message (`message`, default
    `error_message`). Everything else is a cause, and its body is never shown."""
    status = answer.status
    if 400 <= status < 500 and status not in (408, 429):
        words = (message or error_message)(answer.body)
        return UpstreamRejected(status, f"worker rejected the request: {words}")
    # A 5xx body may hold a traceback or internal names: it never reaches the client.
    return UpstreamError(
        status_cause(status, answer.retry_after), f"worker {worker}", f"HTTP {status}"
    )


def status_cause(status: int, retry_after: bool) -> Cause:
    """429 and 503 say "not now" before the job started; a 503 that says when to come
    back (Retry-After) is busy, not broken. Any other answer but 200 and 4xx (a 1xx,
    2xx, 3xx or 408) is not what these APIs answer: a bad answer."""
    if status == 429:
        return Cause.HTTP_429
    if status == 503:
        return Cause.HTTP_503_BUSY if retry_after else Cause.HTTP_503
    return Cause.HTTP_5XX if status >= 500 else Cause.BAD_ANSWER


def error_message(body: bytes) -> str:
    """The message of an error body, on one short line; the text itself when it is
    not JSON of a shape known here. Never a traceback."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return one_line(body.decode("utf-8", "replace"))
    return one_line(_message_of(data))


def _message_of(data: Any) -> str:
    if not isinstance(data, dict):
        return str(data)
    error, detail = data.get("error"), data.get("detail")
    if isinstance(error, dict) and error.get("message"):  # OpenAI, vLLM, LocalAI
        return str(error["message"])
    if isinstance(detail, list):  # FastAPI's 422: [{"loc": [...], "msg": ...}, ...]
        return "; ".join(_validation_item(item) for item in detail[:3])
    if detail:  # FastAPI's HTTPException; AUTOMATIC1111 (with "error": its class name)
        return str(detail)
    for key in ("message", "error"):
        if data.get(key):
            return str(data[key])
    return str(data)


def _validation_item(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)
    loc = [str(part) for part in item.get("loc") or () if part != "body"]
    msg = str(item.get("msg", item))
    return f"{'.'.join(loc)}: {msg}" if loc else msg


def one_line(text: str) -> str:
    """`text` on one line of at most MAX_MESSAGE characters, cut before any traceback:
    what follows one names files, modules and often addresses inside the worker."""
    text = text.split("Traceback (most recent call last)", 1)[0]
    line = " ".join(text.split())
    return line[:MAX_MESSAGE] or "(no message)"
