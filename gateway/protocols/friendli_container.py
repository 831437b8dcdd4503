"""The Friendli Container image API: `POST /v1/images/generations` -> `{"image": b64}`."""

from __future__ import annotations

import json
from collections.abc import Mapping

import aiohttp

from gateway.answers import problem
from gateway.causes import Cause
from gateway.errors import UpstreamError, UpstreamRejected
from gateway.protocols.client_errors import upstream_error
from gateway.schema import ResponseFormat

# identity: the session does not decompress (the bytes go to the client as they came),
# so a worker must not compress; aiohttp would otherwise offer gzip and deflate.
_JSON = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
_MAX_MESSAGE = 300


class FriendliContainer:
    name = "friendli-container"
    path = "/v1/images/generations"
    health_path = "/health"

    async def generate(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        payload: bytes,
        *,
        worker: str,
        timeout: aiohttp.ClientTimeout,
        headers: Mapping[str, str],
        response_format: ResponseFormat,
        max_bytes: int,
    ) -> bytes:
        """The worker's success body, untouched, once `gateway.answers` found an image
        of `response_format` in it; every failure as an UpstreamError. An answer over
        `max_bytes` is refused as it arrives (Cause.TOO_LARGE)."""
        answered = False  # a lost connection before the answer began is safe to retry
        try:
            async with session.post(
                base_url + self.path,
                data=payload,
                headers={**_JSON, **headers},
                timeout=timeout,
                allow_redirects=False,
            ) as resp:
                answered = True
                body = await _read(resp, max_bytes, worker)
                status, retry_after = resp.status, "Retry-After" in resp.headers
                if status == 200 and (wrong := problem(body, response_format)) is not None:
                    resp.close()  # what else it sent is not to be read as a next answer
                    raise UpstreamError(
                        Cause.BAD_ANSWER, f"worker {worker}", f"answered 200 {wrong}"
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise upstream_error(
                exc, worker=worker, answered=answered, timeout_s=timeout.total
            ) from exc
        if status == 200:
            return body
        return _raise_for(status, body, worker, retry_after=retry_after)

    async def healthy(
        self, session: aiohttp.ClientSession, base_url: str, *, timeout: aiohttp.ClientTimeout
    ) -> bool:
        """One probe: `GET /health` answered 200. Any failure is just "not healthy"."""
        try:
            async with session.get(
                base_url + self.health_path, timeout=timeout, allow_redirects=False
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False


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


def _raise_for(status: int, body: bytes, worker: str, *, retry_after: bool) -> bytes:
    if 400 <= status < 500 and status not in (408, 429):
        raise UpstreamRejected(status, f"worker rejected the request: {_message(body)}")
    # A 5xx body may hold a traceback or internal names: it never reaches the client.
    raise UpstreamError(_status_cause(status, retry_after), f"worker {worker}", f"HTTP {status}")


def _status_cause(status: int, retry_after: bool) -> Cause:
    """429 and 503 say "not now" before the job started; a 503 that says when to come
    back (Retry-After) is busy, not broken. Any other answer but 200 and 4xx (a 1xx,
    2xx, 3xx or 408) is not what this API answers: a bad answer."""
    if status == 429:
        return Cause.HTTP_429
    if status == 503:
        return Cause.HTTP_503_BUSY if retry_after else Cause.HTTP_503
    return Cause.HTTP_5XX if status >= 500 else Cause.BAD_ANSWER


def _message(body: bytes) -> str:
    """The worker's `detail` (or `message`) on one short line; never a traceback."""
    try:
        data = json.loads(body)
        text = data.get("detail") or data.get("message") or data if isinstance(data, dict) else data
    except ValueError:
        text = body.decode("utf-8", "replace")
    # The message may come before a traceback, never with it: what follows names files,
    # modules and often addresses inside the worker.
    text = str(text).split("Traceback (most recent call last)", 1)[0]
    line = " ".join(text.split())
    return line[:_MAX_MESSAGE] or "(no message)"
