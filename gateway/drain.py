"""Graceful drain: how a gateway process stops without dropping a request.

On the first SIGTERM the process turns draining: /readyz answers 503 at once so the
load balancer stops sending, yet new connections are still served for `grace_s`
(the balancer needs a few probe periods to notice). Then the signal goes on to
uvicorn, which stops accepting, lets requests in flight finish for at most its
`timeout_graceful_shutdown` (the hard cap), and runs the lifespan's shutdown, which
stops the background tasks. A second SIGTERM, or SIGINT, skips the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Any

from gateway.metrics import Metrics

log = logging.getLogger("gateway.drain")


class Drain:
    def __init__(self, *, grace_s: float, metrics: Metrics | None = None) -> None:
        self.grace_s = grace_s
        self.metrics = metrics
        self.draining = False
        self._passed_on: Any = None  # the handler we stand in front of (uvicorn's)
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stand in front of the SIGTERM handler uvicorn installed (call at start-up)."""
        self._loop = loop
        self._passed_on = signal.signal(signal.SIGTERM, self._on_sigterm)

    def uninstall(self) -> None:
        if self._passed_on is not None:
            signal.signal(signal.SIGTERM, self._passed_on)
            self._passed_on = None

    def _on_sigterm(self, sig: int, frame: FrameType | None) -> None:
        if self.draining or self._loop is None:
            self._pass_on(sig)
            return
        self.draining = True
        if self.metrics is not None:
            self.metrics.draining.set(1)
        log.info("draining", extra={"fields": {"grace_s": self.grace_s}})
        # A signal handler runs between two bytecodes: schedule, don't act, here.
        self._loop.call_soon_threadsafe(self._loop.call_later, self.grace_s, self._pass_on, sig)

    def _pass_on(self, sig: int) -> None:
        handler = self._passed_on
        if callable(handler):
            handler(sig, None)
        elif handler == signal.SIG_DFL:
            raise SystemExit(128 + sig)
