"""The gateway's one exception tree, and the one place errors become responses.

    GatewayError                       every error the gateway raises on purpose
    ├── ConfigError                    adapters.yaml refused (never reaches a client)
    ├── CacheUnavailable               the cache store failed or timed out (never
    │                                  reaches a client: the cache fails open)
    └── RequestError                   ends a client's request; carries status + detail
        ├── Unauthorized       401     no API key, or one the registry does not know
        ├── Forbidden          403     the key may not use this adapter (or route)
        ├── ValidationFailed   422     the body broke the schema (detail is a list)
        ├── PayloadTooLarge    413     the body passed `limits.max_body_bytes`
        ├── HeadersTooLarge    431     the request head passed `limits.max_header_bytes`
        ├── RequestTimeout     408     the head or body came too slowly (`limits.*_s`)
        ├── MalformedRequest   400     bytes that do not parse as HTTP/1.1
        ├── UnsupportedMediaType 415   the body is not JSON
        ├── UnknownModel       404     `model` names no adapter (detail lists known ones)
        ├── UnknownPool        404     `/readyz?pool=` names no pool (detail lists them)
        ├── ReloadRefused      422     POST /admin/reload found a bad file (old one serves)
        ├── RetryLater                 refused for now; carries Retry-After
        │   ├── RateLimited    429     the key is over its rate or `max_concurrent`
        │   └── Overloaded     503     no capacity now (a pool, or the connection cap)
        ├── UpstreamRejected   4xx     a worker refused the request's input
        └── UpstreamError   502/504    no worker produced an image: its `cause`
                                       (gateway.causes.Cause) says why, and from it come
                                       the status, retries, health and metric label

Foreign exceptions (aiohttp, redis, pydantic, OSError) are translated where they are caught,
with `raise ... from exc`; `error_response` is the single table from error to HTTP.
Messages name adapters, pools, workers and API keys by name, never worker addresses,
key material or credentials.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ExceptionHandler

from gateway.causes import Cause


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The registry file was refused; the message names the file, line and key."""


class CacheUnavailable(GatewayError):
    """A cache call failed, timed out or was refused by the store. `gateway.cache`
    counts it and carries on as a miss; it is never turned into a response."""


class RequestError(GatewayError):
    status_code = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail: Any = detail

    def headers(self) -> Mapping[str, str]:
        return {}


class Unauthorized(RequestError):
    """One body and one header for a missing, malformed or unknown key: the answer
    tells a caller nothing about which it was."""

    status_code = 401

    def __init__(self) -> None:
        super().__init__("missing or unknown API key: send 'Authorization: Bearer <key>'")

    def headers(self) -> Mapping[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="image-gateway"'}


class Forbidden(RequestError):
    status_code = 403


class PayloadTooLarge(RequestError):
    status_code = 413

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is larger than {limit} bytes")

    def headers(self) -> Mapping[str, str]:
        # The rest of the body is never read: the connection cannot be reused.
        return {"Connection": "close"}


class HeadersTooLarge(RequestError):
    status_code = 431

    def __init__(self, limit: int) -> None:
        super().__init__(f"request line and headers are larger than {limit} bytes")


class RequestTimeout(RequestError):
    """The client sent its request too slowly. Like MalformedRequest, never raised:
    the server layer (gateway/server.py) answers with it and closes the connection."""

    status_code = 408

    def headers(self) -> Mapping[str, str]:
        return {"Connection": "close"}


class MalformedRequest(RequestError):
    status_code = 400


class ValidationFailed(RequestError):
    status_code = 422

    def __init__(self, errors: Sequence[Mapping[str, Any]]) -> None:
        super().__init__("request body is invalid")
        self.detail = list(errors)


class UnsupportedMediaType(RequestError):
    status_code = 415


class UnknownModel(RequestError):
    status_code = 404

    def __init__(self, model: str | None, known: Iterable[str]) -> None:
        names = ", ".join(sorted(known))
        if model is None:
            msg = f"no model given and no default adapter configured; known models: {names}"
        else:
            msg = f"unknown model {model!r}; known models: {names}"
        super().__init__(msg)


class UnknownPool(RequestError):
    status_code = 404

    def __init__(self, pool: str, known: Iterable[str]) -> None:
        super().__init__(f"unknown pool {pool!r}; known pools: {', '.join(sorted(known))}")


class ReloadRefused(RequestError):
    status_code = 422


class RetryLater(RequestError):
    """Refused for now, not for good: the client may try again after `Retry-After`."""

    def __init__(self, detail: str, *, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = max(1, retry_after_s)

    def headers(self) -> Mapping[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class RateLimited(RetryLater):
    status_code = 429


class Overloaded(RetryLater):
    status_code = 503


class UpstreamRejected(RequestError):
    """A worker answered 4xx: the client's input, passed through with its status."""

    cause = Cause.REJECTED

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code


class UpstreamError(RequestError):
    """No image from a worker, or from a pool (none healthy, none in time). `where` names
    it ("worker sdxl-0", "pool 'sdxl'"); `what` tells what happened, else the cause's
    own words. Everything else is the `cause`'s."""

    def __init__(self, cause: Cause, where: str, what: str | None = None) -> None:
        super().__init__(f"{where}: {what or cause.says}")
        self.cause = cause
        self.status_code = cause.status

    @property
    def reason(self) -> str:
        """The cause's bounded word, for metrics and logs."""
        return self.cause.label


def error_response(exc: RequestError) -> Response:
    """The one table from error to HTTP: status and headers live on the class."""
    return JSONResponse({"detail": exc.detail}, exc.status_code, headers=dict(exc.headers()))


async def _request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    # Starlette's own 404/405 and the like, in the same JSON shape as ours.
    assert isinstance(exc, HTTPException)
    return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    # A bug: the traceback goes to the server log (uvicorn logs it), never to the client.
    return JSONResponse({"detail": "internal error in the gateway"}, 500)


EXCEPTION_HANDLERS: Mapping[Any, ExceptionHandler] = {
    RequestError: _request_error,
    HTTPException: _http_error,
    Exception: _internal_error,
}
