"""What the environment says to the gateway, read once at start-up, in this one place.

One precedence for every setting: **the command line, then the environment, then
adapters.yaml, then the default.** `gateway serve` hands its flags to its server
processes through these same variables, so a flag and its variable are one setting.

    GATEWAY_CONFIG            the registry file                        (--config)
    GATEWAY_DRAIN_GRACE_S     after SIGTERM: still serving this long    (--drain-grace-s)
    GATEWAY_RELOAD_EVERY_S    how often the registry file is polled    (--reload-every-s)
    GATEWAY_REDIS_URL         the Redis of the result cache, of the per-key rate
                              limits and of the replicas' coordination: replaces the
                              file's `cache.url`, `auth.redis_url` and
                              `coordination.url` (a URL with a password belongs in a
                              secret, not in the file)
    PROMETHEUS_MULTIPROC_DIR  prometheus-client's own: where several server processes
                              keep their metrics (`serve --processes N` sets it)

Values in adapters.yaml may also name a variable, `${NAME}`: that is the file's own
text, expanded where it is parsed (`gateway.registry`), not an override.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import ConfigError
from gateway.registry import Registry, with_redis_url

ENV_CONFIG = "GATEWAY_CONFIG"
ENV_DRAIN_GRACE_S = "GATEWAY_DRAIN_GRACE_S"
ENV_RELOAD_EVERY_S = "GATEWAY_RELOAD_EVERY_S"
ENV_REDIS_URL = "GATEWAY_REDIS_URL"
ENV_METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"
ENV_INSTANCE = "GATEWAY_INSTANCE"  # set by `gateway serve` for its processes, not by hand
ENV_VARIABLES = (
    ENV_CONFIG,
    ENV_DRAIN_GRACE_S,
    ENV_RELOAD_EVERY_S,
    ENV_REDIS_URL,
    ENV_METRICS_DIR,
    ENV_INSTANCE,
)


@dataclass(frozen=True)
class Settings:
    config: str = "adapters.yaml"
    drain_grace_s: float = 5.0
    reload_every_s: float = 2.0
    redis_url: str | None = None
    metrics_dir: str | None = None  # None: one process, its metrics in memory
    instance: str | None = None  # the id /healthz answers; None: one per process

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings the environment gives (unset or empty: the default)."""
        env = os.environ if env is None else env
        default = cls()
        return cls(
            config=env.get(ENV_CONFIG) or default.config,
            drain_grace_s=_seconds(env, ENV_DRAIN_GRACE_S, default.drain_grace_s),
            reload_every_s=_seconds(env, ENV_RELOAD_EVERY_S, default.reload_every_s),
            redis_url=env.get(ENV_REDIS_URL) or None,
            metrics_dir=env.get(ENV_METRICS_DIR) or None,
            instance=env.get(ENV_INSTANCE) or None,
        )

    def replace(self, **flags: object) -> Settings:
        """These settings with the command line's flags over them (None: not given)."""
        given = {name: value for name, value in flags.items() if value is not None}
        return dataclasses.replace(self, **given)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """The variables that give these settings to another process."""
        env = {
            ENV_CONFIG: str(Path(self.config).resolve()),
            ENV_DRAIN_GRACE_S: repr(self.drain_grace_s),
            ENV_RELOAD_EVERY_S: repr(self.reload_every_s),
        }
        if self.redis_url is not None:
            env[ENV_REDIS_URL] = self.redis_url
        if self.metrics_dir is not None:
            env[ENV_METRICS_DIR] = self.metrics_dir
        if self.instance is not None:
            env[ENV_INSTANCE] = self.instance
        return env

    def over(self, registry: Registry) -> Registry:
        """`registry` with the environment's values in place of the file's: every
        registry the process serves, the first and each reload, goes through here."""
        if self.redis_url is None:
            return registry
        cache = with_redis_url(registry.cache, self.redis_url, source=ENV_REDIS_URL)
        auth = registry.auth
        if auth is not None:  # the same URL, already validated as the cache's
            auth = auth.model_copy(update={"redis_url": cache.url})
        coordination = registry.coordination
        if coordination.url is not None:  # its own URL given in the file: the same override
            coordination = coordination.model_copy(update={"url": cache.url})
        return registry.model_copy(
            update={"cache": cache, "auth": auth, "coordination": coordination}
        )


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name}: not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name}: must be a finite number of seconds >= 0, got {text!r}")
    return value
