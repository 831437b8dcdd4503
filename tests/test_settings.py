"""The environment, read once (gateway.settings), with one precedence for every
setting: the command line, then the environment, then the file, then the default."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import redis

from gateway.errors import ConfigError
from gateway.ratelimit import redis_for
from gateway.registry import parse_registry
from gateway.reload import RegistryFile
from gateway.settings import ENV_REDIS_URL, Settings
from gateway.testing import ServedSim, registry_yaml
from tests.support import api_key, bearer, body, dead_url, gateway_process, redis_cache

KEY = "gw_settings-test-key"


def yaml_text(cache_url: str, limiter_url: str) -> str:
    sections = {
        "auth": {
            "keys": [api_key("team", KEY, rate={"per_s": 100})],
            "redis_url": limiter_url,
        }
    }
    return registry_yaml({"p": [dead_url()]}, sections=sections, cache=redis_cache(cache_url))


def test_unset_or_empty_variables_give_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()
    empty = {"GATEWAY_CONFIG": "", "GATEWAY_DRAIN_GRACE_S": "", "GATEWAY_REDIS_URL": ""}
    assert Settings.from_env(empty) == Settings()


def test_each_variable_is_read() -> None:
    env = {
        "GATEWAY_CONFIG": "/etc/gw/adapters.yaml",
        "GATEWAY_DRAIN_GRACE_S": "7.5",
        "GATEWAY_RELOAD_EVERY_S": "0.5",
        "GATEWAY_REDIS_URL": "redis://cache:6379/0",
        "PROMETHEUS_MULTIPROC_DIR": "/tmp/m",
    }
    assert Settings.from_env(env) == Settings(
        config="/etc/gw/adapters.yaml",
        drain_grace_s=7.5,
        reload_every_s=0.5,
        redis_url="redis://cache:6379/0",
        metrics_dir="/tmp/m",
    )


@pytest.mark.parametrize("text", ["soon", "nan", "-1", "inf"])
def test_a_bad_number_is_refused_naming_the_variable(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^GATEWAY_DRAIN_GRACE_S: "):
        Settings.from_env({"GATEWAY_DRAIN_GRACE_S": text})


def test_flags_win_over_the_environment_and_absent_flags_leave_it() -> None:
    env = Settings.from_env({"GATEWAY_CONFIG": "env.yaml", "GATEWAY_DRAIN_GRACE_S": "9"})
    given = env.replace(config="flag.yaml", drain_grace_s=None)
    assert (given.config, given.drain_grace_s) == ("flag.yaml", 9.0)


def test_to_env_gives_another_process_the_same_settings(tmp_path: Path) -> None:
    settings = Settings(
        config=str(tmp_path / "a.yaml"),
        drain_grace_s=0.25,
        reload_every_s=3.0,
        redis_url="rediss://:pw@cache:6380/1",
        metrics_dir=str(tmp_path),
    )
    assert Settings.from_env(settings.to_env()) == settings


def test_the_environment_url_replaces_both_of_the_files_redis_urls() -> None:
    registry = parse_registry(yaml_text("redis://file-cache:6379", "redis://file-limits:6379"))
    over = Settings(redis_url="redis://env:6379/2").over(registry)
    assert over.cache.url == "redis://env:6379/2"
    assert redis_for(over)[0] == "redis://env:6379/2"
    assert over.cache.timeout_ms == registry.cache.timeout_ms  # the rest of the file stays
    assert Settings().over(registry) is registry  # no variable: the file as it is


def test_a_bad_environment_url_is_refused_without_echoing_it() -> None:
    registry = parse_registry(yaml_text("redis://c:6379", "redis://l:6379"))
    with pytest.raises(ConfigError, match=f"^{ENV_REDIS_URL}: ") as caught:
        Settings(redis_url="memcached://user:s3cret@x").over(registry)
    assert "s3cret" not in str(caught.value)


def test_a_reload_applies_the_environment_as_the_start_did(tmp_path: Path) -> None:
    path = tmp_path / "adapters.yaml"
    path.write_text(yaml_text("redis://file:6379", "redis://file:6379"))
    settings = Settings(redis_url="redis://env:6379")
    reloaded = RegistryFile(path, prepare=settings.over).load()
    assert reloaded.cache.url == "redis://env:6379"
    assert redis_for(reloaded)[0] == "redis://env:6379"


def test_a_served_gateway_keeps_cache_and_rate_limits_in_the_environments_redis(
    fast_sims: list[ServedSim], redis_url: str, tmp_path: Path
) -> None:
    """End to end: the file names a Redis where nothing listens, for both uses; with
    GATEWAY_REDIS_URL set, the image and the key's rate state land in that one."""
    nowhere = dead_url().replace("http://", "redis://")
    slow_rate = {"per_s": 0.01, "burst": 5}  # its state lives ~100 s: long enough to see
    text = registry_yaml(
        {"p": [sim.url for sim in fast_sims]},
        sections={"auth": {"keys": [api_key("team", KEY, rate=slow_rate)], "redis_url": nowhere}},
        cache=redis_cache(nowhere),
    )
    config = tmp_path / "adapters.yaml"
    config.write_text(text)
    env = {**os.environ, ENV_REDIS_URL: redis_url}
    with gateway_process(str(config), "--drain-grace-s", "0", env=env) as url:
        answer = httpx.post(
            url + "/v1/images/generations", json=body(seed=5), headers=bearer(KEY), timeout=30
        )
    assert answer.status_code == 200, answer.text
    with redis.Redis.from_url(redis_url) as client:
        keys = [key.decode() for key in client.keys("*")]
    assert any(key.startswith("gateway:v1:") for key in keys), keys  # the cached image
    assert any(key.startswith("gateway:ratelimit:") for key in keys), keys  # the key's rate
