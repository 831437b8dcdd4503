"""The app's typed state: what the lifespan builds and the handlers read.

`AppState` lives on the Starlette app from `create_app` on (as `app.state.gateway`,
the one attribute the gateway puts there); its `served` part is set by the lifespan
once the process's resources are open, and is None before (and in an app whose
lifespan never ran). Handlers reach it through `app_state(request)` and
`served(request)` (tests: `state_of(app)`, `served_of(app)`), never through untyped
`app.state` attributes.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request

from gateway.drain import Drain
from gateway.errors import Overloaded
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.ratelimit import KeyLimits
from gateway.reload import Reloader


@dataclass(eq=False)
class Served:
    """One process's serving resources, built in the lifespan."""

    pipeline: Pipeline
    key_limits: KeyLimits
    reloader: Reloader | None  # None: not started from a file (nothing to reload)
    openapi: tuple[str, bytes]  # (registry digest, /openapi.json made for it)


@dataclass(eq=False)
class AppState:
    metrics: Metrics
    drain: Drain
    served: Served | None = None  # None until the lifespan has started
    # Answered by /healthz: who a waiter reached (another server may hold the port).
    instance: str = field(default_factory=lambda: secrets.token_hex(8))


def state_of(app: Starlette) -> AppState:
    state: AppState = app.state.gateway
    return state


def served_of(app: Starlette) -> Served:
    """The serving resources; 503 while the process is still starting."""
    found = state_of(app).served
    if found is None:
        raise Overloaded("the gateway is starting", retry_after_s=1)
    return found


def app_state(request: Request) -> AppState:
    return state_of(request.app)


def served(request: Request) -> Served:
    return served_of(request.app)
