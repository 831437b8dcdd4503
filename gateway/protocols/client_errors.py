"""aiohttp's exceptions, translated into causes: one table, read by class.

`cause_of` walks the exception's class hierarchy (most specific class first) and takes
the first class the table names, so a DNS failure is `Cause.DNS` although
`ClientConnectorDNSError` is also a `ClientConnectorError` (which is `Cause.CONNECT`):
the answer never depends on the order of `except` clauses. A lost connection is
`RESET` before the worker's answer began and `TRUNCATED` once it had.
tests/test_client_errors.py lists every exception class aiohttp defines and fails on
one this table has not decided.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import aiohttp

from gateway.causes import Cause
from gateway.errors import UpstreamError

CAUSES: Mapping[type[BaseException], Cause] = {
    # Before a connection: the worker never saw the request.
    aiohttp.ClientConnectorDNSError: Cause.DNS,
    aiohttp.ClientSSLError: Cause.TLS,  # certificate and handshake errors alike
    aiohttp.ServerFingerprintMismatch: Cause.TLS,
    aiohttp.ConnectionTimeoutError: Cause.CONNECT_TIMEOUT,
    aiohttp.ClientConnectorError: Cause.CONNECT,  # refused, unreachable, ...
    # A request the client could not even send (the registry validates worker URLs and
    # redirects are never followed, so these mean a bug, reported as "cannot connect").
    aiohttp.InvalidURL: Cause.CONNECT,
    aiohttp.NonHttpUrlClientError: Cause.CONNECT,
    aiohttp.RedirectClientError: Cause.CONNECT,
    # Waiting for the answer.
    aiohttp.SocketTimeoutError: Cause.TIMEOUT,  # no byte within sock_read
    aiohttp.ServerTimeoutError: Cause.TIMEOUT,
    TimeoutError: Cause.TIMEOUT,  # the try's total time ran out
    # The answer's HTTP did not parse (e.g. more bytes than its Content-Length said).
    aiohttp.ClientResponseError: Cause.BAD_ANSWER,
    # The connection went away: before the answer began, or while reading it.
    aiohttp.ClientPayloadError: Cause.TRUNCATED,
    aiohttp.ClientConnectionError: Cause.RESET,
    aiohttp.UploadAbortedError: Cause.RESET,
    aiohttp.ClientError: Cause.RESET,
}


def cause_of(exc: BaseException, *, answered: bool) -> Cause | None:
    """The cause of `exc` (None: not a client failure, e.g. a bug of ours)."""
    for cls in type(exc).__mro__:
        cause = CAUSES.get(cls)
        if cause is not None:
            return Cause.TRUNCATED if cause is Cause.RESET and answered else cause
    return None


def upstream_error(
    exc: aiohttp.ClientError | TimeoutError,
    *,
    worker: str,
    answered: bool,
    timeout_s: float | None,
) -> UpstreamError:
    """`exc` as the UpstreamError a client gets, with what aiohttp knew that helps an
    operator and names no address."""
    cause = cause_of(exc, answered=answered)
    assert cause is not None, "the table names ClientError and TimeoutError themselves"
    return UpstreamError(cause, f"worker {worker}", _what(cause, exc, timeout_s))


def _what(cause: Cause, exc: BaseException, timeout_s: float | None) -> str | None:
    if cause is Cause.TIMEOUT and timeout_s is not None:
        return f"no answer within {round(timeout_s, 1):g}s"
    if cause is Cause.CONNECT and isinstance(exc, aiohttp.ClientConnectorError):
        # "connection refused", "network is unreachable": the OS's words for the errno,
        # never the exception's own text, which may name the address (uvloop's does).
        code = exc.os_error.errno
        return f"cannot connect ({os.strerror(code).lower()})" if code else None
    if cause is Cause.BAD_ANSWER and isinstance(exc, aiohttp.ClientResponseError):
        # The first line only: the rest quotes the worker's bytes.
        line = str(exc.message).partition("\n")[0][:300].rstrip(":") or "unparsable"
        return f"answered malformed HTTP ({line})"
    return None
