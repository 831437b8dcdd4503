"""The running registry reload service: watch the file, re-read it, swap it in.

A valid file replaces the serving registry whole; an invalid one is refused (logged
and counted) and the old registry keeps serving. Parsing and validation live in
`gateway.registry`; this module adds only the file watching and the reporting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.registry import Registry, load_registry

log = logging.getLogger("gateway.registry")  # the name operators' log filters know


class RegistryFile:
    """The file a registry is read from, and whether it changed since the last look."""

    def __init__(
        self, path: str | Path, *, prepare: Callable[[Registry], Registry] = lambda r: r
    ) -> None:
        """`prepare`: applied to every registry read (the environment's overrides,
        `gateway.settings.Settings.over`), so a reload serves what a start would."""
        self.path = Path(path)
        self.prepare = prepare
        self._stamp = self._read_stamp()

    def _read_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)  # ino: an editor's rename-over

    def changed(self) -> bool:
        stamp = self._read_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        return True

    def load(self) -> Registry:
        return self.prepare(load_registry(self.path))


class Reloader:
    """Re-reads the registry file; a valid one replaces the serving registry whole, an
    invalid one is refused (logged and counted) and the old one keeps serving."""

    def __init__(
        self,
        source: RegistryFile,
        *,
        current: Callable[[], Registry],
        apply: Callable[[Registry], None],
        metrics: Metrics,
    ) -> None:
        self.source = source
        self.current = current
        self.apply = apply
        self.metrics = metrics

    def reload(self) -> str:
        """Says "ok" or "unchanged"; a refused file raises ConfigError."""
        try:
            new = self.source.load()
        except ConfigError as exc:
            self.metrics.reloads.labels("error").inc()
            log.error("registry reload refused", extra={"fields": {"error": str(exc)}})
            raise
        if new.digest == self.current().digest:
            self.metrics.reloads.labels("unchanged").inc()
            return "unchanged"
        self.apply(new)
        self.metrics.reloads.labels("ok").inc()
        self.metrics.set_registry(new.digest)
        log.info("registry reloaded", extra={"fields": {"registry": new.digest}})
        return "ok"

    def reload_quietly(self) -> None:
        """For SIGHUP and the file watcher: a refusal is logged and counted, no more."""
        with contextlib.suppress(ConfigError):
            self.reload()

    async def watch(self, *, every_s: float) -> None:
        """Poll the file's stamp (no busy loop, no inotify dependency)."""
        while True:
            await asyncio.sleep(every_s)
            if self.source.changed():
                self.reload_quietly()
