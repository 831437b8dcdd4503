"""Who may call: API keys from the registry's `auth` section.

A caller sends `Authorization: Bearer <key>`. The registry holds only the sha256 of
each key, so neither the file nor this process's memory holds a usable key. A missing,
malformed and unknown key get the same 401, after the same work (one sha256, one dict
lookup). A known key may still be refused a given adapter (403). With no `auth`
section the gateway is open, and says so once at start.

Keys appear in logs, errors and request state by name only, never as key or hash.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from typing import Literal

from starlette.requests import Request

from gateway.errors import Forbidden, Unauthorized
from gateway.registry import AuthSpec, KeySpec, Registry

log = logging.getLogger("gateway.auth")

RouteKind = Literal["metrics", "admin"]

_AUTHORIZATION = b"authorization"
_BEARER = b"bearer "


def hash_key(key: str) -> str:
    """What adapters.yaml stores for a key: its sha256, in hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh key: 256 random bits, URL-safe, prefixed so it is recognisable in a leak."""
    return "gw_" + secrets.token_urlsafe(32)


def authenticate(request: Request, auth: AuthSpec | None) -> KeySpec | None:
    """The caller's key, or None when the gateway is open; 401 for anything else.

    The presented key is hashed and the hash looked up in a dict. A lookup's timing
    can only tell an attacker how much of the sha256 of *their own guess* matches a
    stored hash; that says nothing useful about any key (finding a key from it means
    inverting sha256), so a per-key `hmac.compare_digest` loop would buy nothing and
    cost O(keys) per request.
    """
    if auth is None:
        return None
    token = _bearer_token(request)
    key = auth.key_for(hashlib.sha256(token).hexdigest())
    if key is None or not token:
        log.debug("401: no known API key (client %s)", _client(request))
        raise Unauthorized()
    # For access logs and metrics: the name only. (The scope's state dict directly:
    # `request.state` builds a wrapper object, a measurable cost on every request.)
    request.scope.setdefault("state", {})["key_name"] = key.name
    return key


def authorize(key: KeySpec | None, adapter: str) -> None:
    """403 unless `key` may use `adapter`; None (an open gateway) may use any."""
    if key is not None and not key.may_use(adapter):
        log.info("403: key %r may not use adapter %r", key.name, adapter)
        raise Forbidden(f"key {key.name!r} may not use adapter {adapter!r}")


def require_key(request: Request, kind: RouteKind, auth: AuthSpec | None) -> None:
    """The hook for operator routes (`/metrics`, `/status`, `/admin/*`): call it first.

    Each kind has its own key (`auth.metrics_key_sha256`, `auth.admin_key_sha256`);
    an API key never opens them. Without an `auth` section they are open, like the
    rest of the gateway. With one: `/metrics` without its own key stays open (it holds
    counts and key names, no secrets), while `/admin/*` without its key is refused.
    """
    if auth is None:
        return
    expected = _expected_hash(auth, kind)
    if expected is None:
        if kind == "metrics":
            return
        raise Forbidden("admin routes are closed: no auth.admin_key_sha256 is configured")
    if not _presents(request, expected):
        log.debug("401: no %s key (client %s)", kind, _client(request))
        raise Unauthorized()
    request.scope.setdefault("state", {})["key_name"] = kind


def holds_key(request: Request, kind: RouteKind, auth: AuthSpec | None) -> bool:
    """Whether the caller presents `kind`'s own key: never on an open gateway, nor when
    that key is not configured. For what a route shows only to that key's holder."""
    if auth is None:
        return False
    expected = _expected_hash(auth, kind)
    return expected is not None and _presents(request, expected)


def _expected_hash(auth: AuthSpec, kind: RouteKind) -> str | None:
    return auth.metrics_key_sha256 if kind == "metrics" else auth.admin_key_sha256


def _presents(request: Request, expected: str) -> bool:
    token = _bearer_token(request)
    # One stored hash: compare in constant time.
    return bool(token) and hmac.compare_digest(hashlib.sha256(token).hexdigest(), expected)


def log_auth_mode(registry: Registry) -> None:
    """One line at start: open (a warning) or how many keys guard what."""
    auth = registry.auth
    if auth is None:
        log.warning("no auth section in the registry: the gateway is open to every caller")
        return
    metrics = "its own key" if auth.metrics_key_sha256 else "open"
    admin = "its own key" if auth.admin_key_sha256 else "closed"
    log.info("auth: %d API keys; /metrics: %s; /admin: %s", len(auth.keys), metrics, admin)


def _bearer_token(request: Request) -> bytes:
    """The raw key after `Bearer `, or b"" when there is none (never an error here)."""
    for name, value in request.scope["headers"]:
        if name == _AUTHORIZATION:
            if value[: len(_BEARER)].lower() == _BEARER:
                token: bytes = value[len(_BEARER) :].strip()
                return token
            return b""
    return b""


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"
