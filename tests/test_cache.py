from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import secrets
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from gateway.cache import (
    CacheCounters,
    CachePolicy,
    Lookup,
    MemoryCache,
    RedisCache,
    ResultCache,
    cache_key,
    open_cache,
    policy_from_cache_control,
)
from gateway.cli import main
from gateway.errors import CacheUnavailable, ConfigError
from gateway.registry import AdapterSpec, CacheSpec, parse_registry, redacted, with_redis_url
from gateway.schema import MAX_SEED, ImageGenerationBody, WorkerRequest
from gateway.testing import registry_yaml
from tests.support import blackhole, dead_url, redis_cache, redis_server

ADAPTER = AdapterSpec(name="sdxl-base", pool="sdxl")
FLUX = AdapterSpec(name="flux-schnell", pool="flux", ignore=("guidance_scale",))

prompts = st.text(min_size=1, max_size=40).filter(lambda text: bool(text.strip()))
guidances = st.floats(allow_nan=False, allow_infinity=False, width=64)
# Every input that decides the image, each with every value it may take.
CHANGES: dict[str, st.SearchStrategy[Any]] = {
    "prompt": prompts,
    "num_inference_steps": st.integers(1, 50),
    "guidance_scale": guidances,
    "seed": st.integers(0, MAX_SEED),
    "response_format": st.sampled_from(["jpeg", "raw"]),
}
requests = st.fixed_dictionaries(
    {**CHANGES, "response_format": st.sampled_from([None, "jpeg", "raw"])}
)


def key_of(text: str, adapter: AdapterSpec = ADAPTER, namespace: str = "ns") -> str:
    """The key for a JSON body, the way the pipeline gets there."""
    body = ImageGenerationBody.model_validate_json(text)
    job = WorkerRequest.from_body(body, upstream_model=adapter.upstream_model)
    return cache_key(adapter, job, namespace=namespace)


def spellings(guidance: float) -> list[str]:
    """One number, written the ways a client might: 7.5 / 7.50, 1.0 / 1."""
    text = repr(guidance)
    out = [text]
    if "e" not in text and "." in text:
        out.append(text + "00")
    if guidance.is_integer() and abs(guidance) < 2**53 and math.copysign(1, guidance) > 0:
        out.append(str(int(guidance)))
    return out


def to_json(fields: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f'"{name}":{value}' for name, value in fields) + "}"


def json_str(value: Any) -> str:
    return json.dumps(value)


@given(request=requests, order=st.randoms(use_true_random=False), data=st.data())
def test_key_ignores_how_the_json_is_written(
    request: dict[str, Any], order: Any, data: st.DataObject
) -> None:
    """Field order, 7.5 / 7.50, 1 / 1.0, and a null or missing optional field with the
    same meaning (response_format null = "jpeg", model null = the default) are one key."""
    fmt = request["response_format"]
    expected = key_of(json_str({**request, "response_format": fmt or "jpeg"}))
    guidance = data.draw(st.sampled_from(spellings(request["guidance_scale"])))
    variant = [
        ("prompt", json_str(request["prompt"])),
        ("num_inference_steps", str(request["num_inference_steps"])),
        ("seed", str(request["seed"])),
        ("guidance_scale", guidance),
    ]
    if data.draw(st.booleans()):
        variant.append(("model", "null"))
    if fmt is not None:
        variant.append(("response_format", json_str(fmt)))
    elif data.draw(st.booleans()):
        variant.append(("response_format", "null"))
    order.shuffle(variant)
    assert key_of(to_json(variant)) == expected


@given(request=requests, field=st.sampled_from(sorted(CHANGES)), data=st.data())
def test_anything_that_changes_the_image_changes_the_key(
    request: dict[str, Any], field: str, data: st.DataObject
) -> None:
    request["response_format"] = request["response_format"] or "jpeg"
    new = data.draw(CHANGES[field].filter(lambda value: repr(value) != repr(request[field])))
    changed = {**request, field: new}
    before, after = key_of(json_str(request)), key_of(json_str(changed))
    assert before != after
    # Guidance is no input at all to an adapter that ignores it.
    if field == "guidance_scale":
        assert key_of(json_str(request), FLUX) == key_of(json_str(changed), FLUX)


@given(request=requests)
def test_adapter_name_and_revision_are_part_of_the_key(request: dict[str, Any]) -> None:
    text = json_str(request)
    keys = {
        key_of(text, ADAPTER),
        key_of(text, ADAPTER.model_copy(update={"revision": "2"})),
        key_of(text, ADAPTER.model_copy(update={"name": "pixel-art"})),
    }
    assert len(keys) == 3


def test_key_is_namespace_version_and_sha256_of_the_canonical_form() -> None:
    """The canonical form is a contract: changing it must come with a KEY_VERSION bump,
    or old entries would be read under the new form's meaning."""
    body = '{"prompt":"a red fox","num_inference_steps":4,"guidance_scale":7.50,"seed":7}'
    canonical = (
        '{"adapter":"sdxl-base","format":"jpeg","guidance":7.5,"prompt":"a red fox",'
        '"revision":"1","seed":7,"steps":4}'
    )
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    assert key_of(body, namespace="gateway") == f"gateway:v1:{digest}"
    assert re.fullmatch(r"team-a:v1:[0-9a-f]{64}", key_of(body, namespace="team-a"))


@pytest.mark.parametrize(
    ("header", "policy"),
    [
        (None, CachePolicy.USE),
        ("", CachePolicy.USE),
        ("max-age=60", CachePolicy.USE),
        ("no-cache", CachePolicy.REFRESH),
        ("No-Cache, max-age=0", CachePolicy.REFRESH),
        ('no-cache="Set-Cookie"', CachePolicy.REFRESH),
        ("no-store", CachePolicy.BYPASS),
        ("no-cache, no-store", CachePolicy.BYPASS),
    ],
)
def test_cache_control_to_policy(header: str | None, policy: CachePolicy) -> None:
    assert policy_from_cache_control(header) is policy


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_memory_cache_expires_entries_and_locks() -> None:
    clock = FakeClock()
    cache = MemoryCache(max_bytes=1000, clock=clock)
    await cache.set("k", b"v", ttl_ms=500)
    assert await cache.get("k") == b"v"
    assert await cache.lock("l", "a", ttl_ms=500)
    assert not await cache.lock("l", "b", ttl_ms=500)
    assert not await cache.extend("l", "b", ttl_ms=500)
    await cache.unlock("l", "b")  # not b's to free
    assert not await cache.lock("l", "b", ttl_ms=500)
    clock.now += 0.5
    assert await cache.get("k") is None
    assert await cache.lock("l", "b", ttl_ms=500), "a lapsed lock is free"
    assert cache.size == 0


async def test_memory_cache_is_bounded_by_bytes_least_recently_used_first() -> None:
    cache = MemoryCache(max_bytes=300)
    for name in "abc":
        await cache.set(name, bytes(99), ttl_ms=10_000)  # 100 bytes with the key
    assert await cache.get("a") is not None  # a is now the most recent
    await cache.set("d", bytes(99), ttl_ms=10_000)
    assert await cache.get("b") is None
    assert [await cache.get(name) is not None for name in "acd"] == [True, True, True]
    assert cache.size == 300
    await cache.set("huge", bytes(400), ttl_ms=10_000)
    assert await cache.get("huge") is None
    assert len(cache) == 3


async def test_redis_cache_stores_exact_bytes_with_a_ttl(redis_url: str) -> None:
    backend = RedisCache.from_spec(CacheSpec(**redis_cache(redis_url)))
    try:
        body = bytes(range(256)) * 10
        key = f"k-{secrets.token_hex(4)}"
        await backend.set(key, body, ttl_ms=60_000)
        assert await backend.get(key) == body
        with redis.Redis.from_url(redis_url) as client:
            assert 0 < int(client.pttl(key)) <= 60_000, "Redis will drop it on its own"
        # ...and does: a short TTL, watched until it has gone (no race with the clock).
        await backend.set(key, body, ttl_ms=100)
        async with asyncio.timeout(10):
            while await backend.get(key) is not None:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    finally:
        await backend.aclose()


async def test_redis_lock_is_compare_and_set(redis_url: str) -> None:
    backend = RedisCache.from_spec(CacheSpec(**redis_cache(redis_url)))
    try:
        lock = f"l-{secrets.token_hex(4)}"
        assert await backend.lock(lock, "a", ttl_ms=60_000)  # long: no stall can lapse it
        assert not await backend.lock(lock, "b", ttl_ms=60_000)
        assert not await backend.extend(lock, "b", ttl_ms=60_000)
        await backend.unlock(lock, "b")
        assert await backend.extend(lock, "a", ttl_ms=100)  # now short: "a" crashes
        async with asyncio.timeout(10):  # "a crashed holder's lock lapses"
            while not await backend.lock(lock, "b", ttl_ms=60_000):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert not await backend.extend(lock, "a", ttl_ms=60_000)
        await backend.unlock(lock, "b")
    finally:
        await backend.aclose()


@pytest.mark.parametrize("kind", ["tls", "cluster"])
async def test_rediss_and_cluster_urls_work_through_redis_py(kind: str) -> None:
    with redis_server(**{kind: True}) as server:
        spec = CacheSpec(**redis_cache(server.url, cluster=kind == "cluster"))
        async with open_cache(spec) as cache:
            key = "gateway:v1:" + "0" * 64
            await cache.store(key, b"image", CachePolicy.USE)
            assert (await cache.lookup(key, CachePolicy.USE)).body == b"image"
            assert await cache.lock(key + ":lock", "t") is True
            assert await cache.extend(key + ":lock", "t")
            await cache.unlock(key + ":lock", "t")
            assert isinstance(cache.observer, CacheCounters)
            assert not cache.observer.errors


def counters(cache: ResultCache) -> CacheCounters:
    assert isinstance(cache.observer, CacheCounters)
    return cache.observer


async def test_result_cache_hit_miss_bypass_and_too_big(redis_url: str) -> None:
    spec = CacheSpec(**redis_cache(redis_url, max_entry_bytes=10))
    async with open_cache(spec) as cache:
        assert (await cache.lookup("k", CachePolicy.USE)).status == "miss"
        await cache.store("k", b"0123456789", CachePolicy.USE)
        assert await cache.lookup("k", CachePolicy.USE) == Lookup(b"0123456789", "hit")
        assert (await cache.lookup("k", CachePolicy.REFRESH)).status == "bypass"
        await cache.store("big", b"0123456789a", CachePolicy.USE)
        await cache.store("gone", b"x", CachePolicy.BYPASS)
        assert (await cache.lookup("big", CachePolicy.USE)).body is None
        assert (await cache.lookup("gone", CachePolicy.USE)).body is None
        seen = counters(cache)
        assert seen.lookups == {"miss": 3, "hit": 1, "bypass": 1}
        assert seen.stores == {"stored": 1, "too_big": 1, "bypass": 1}


async def test_disabled_cache_bypasses_everything() -> None:
    async with open_cache(CacheSpec(enabled=False)) as cache:
        assert cache.policy(CachePolicy.USE) is CachePolicy.BYPASS


async def test_breaker_opens_after_threshold_and_probes_once_per_cooldown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    spec = CacheSpec(url=dead_url().replace("http", "redis"), failure_threshold=3, cooldown_s=5)
    backend = RedisCache.from_spec(spec)
    cache = ResultCache(backend=backend, spec=spec, clock=clock)
    try:
        statuses = [(await cache.lookup("k", CachePolicy.USE)).status for _ in range(10)]
        assert statuses == ["miss"] * 3 + ["bypass"] * 7  # a failure is a miss
        assert counters(cache).errors == {"get": 3}
        clock.now += 5
        assert await cache.lock("l", "t") is None  # the probe: fails, opens again
        assert (await cache.lookup("k", CachePolicy.USE)).status == "bypass"
        assert counters(cache).errors == {"get": 3, "lock": 1}
        opened = [r for r in caplog.records if "bypassing it for 5.0 s" in r.getMessage()]
        assert len(opened) == 2, "logged once per cool-down, not once per request"
    finally:
        await backend.aclose()


async def test_breaker_closes_when_the_probe_succeeds(redis_url: str) -> None:
    clock = FakeClock()
    spec = CacheSpec(**redis_cache(redis_url, failure_threshold=1, cooldown_s=5))
    backend = RedisCache.from_spec(spec)
    cache = ResultCache(backend=backend, spec=spec, clock=clock)
    try:
        cache.breaker.failed(CacheUnavailable("as if Redis had failed"), probe=False)
        assert (await cache.lookup("k", CachePolicy.USE)).status == "bypass"
        clock.now += 5
        assert (await cache.lookup("k", CachePolicy.USE)).status == "miss"
        assert cache.breaker.open_until is None
        assert (await cache.lookup("k", CachePolicy.USE)).status == "miss"
    finally:
        await backend.aclose()


async def test_a_store_that_never_answers_costs_at_most_the_timeout_per_call() -> None:
    with blackhole() as url:
        spec = CacheSpec(url=url, timeout_ms=50, connect_timeout_ms=50, failure_threshold=3)
        async with open_cache(spec) as cache:
            async with asyncio.timeout(10):  # a hang fails; a busy machine does not
                for _ in range(3):
                    assert (await cache.lookup("k", CachePolicy.USE)).status == "miss"
            for _ in range(100):
                assert (await cache.lookup("k", CachePolicy.USE)).status == "bypass"
            # The count carries the proof: the breaker opened, no call after the third.
            assert counters(cache).errors == {"get": 3}


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("cache: {url: 'http://h:1'}", r":\d+: cache\.url: .*redis://, rediss:// or unix://"),
        ("cache: {url: 'redis://:secret@'}", r"cache\.url: .*no host"),
        ("cache: {url: 'unix:///tmp/r.sock', cluster: true}", r"cache: .*cluster"),
        ("cache: {ttl_s: 0}", r"cache\.ttl_s"),
        ("cache: {timeout_ms: 0}", r"cache\.timeout_ms"),
        ("cache: {namespace: 'a b'}", r"cache\.namespace"),
        ("cache: {ttl: 5}", r"cache\.ttl: Extra inputs"),
    ],
)
def test_cache_section_is_validated_naming_line_and_key(section: str, expected: str) -> None:
    text = registry_yaml({"sdxl": ["http://127.0.0.1:9001"]}) + section + "\n"
    with pytest.raises(ConfigError, match=expected) as caught:
        parse_registry(text, source="adapters.yaml")
    assert "secret" not in str(caught.value)


def test_cache_section_defaults_and_env_url() -> None:
    registry = parse_registry(registry_yaml({"sdxl": ["http://127.0.0.1:9001"]}))
    assert registry.cache.url is None  # memory: the default
    assert registry.cache.timeout_ms == registry.cache.connect_timeout_ms == 50
    spec = with_redis_url(registry.cache, "rediss://:pw@cache:6380", source="GATEWAY_REDIS_URL")
    assert spec.url == "rediss://:pw@cache:6380"
    assert "pw" not in repr(spec)
    assert redacted(spec.url) == "rediss://***@cache:6380"
    with pytest.raises(ConfigError, match=r"GATEWAY_REDIS_URL: .*redis://"):
        with_redis_url(registry.cache, "memcached://x", source="GATEWAY_REDIS_URL")


def test_check_prints_where_results_are_cached_without_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "adapters.yaml"
    text = registry_yaml({"sdxl": ["http://127.0.0.1:9001"]})
    path.write_text(text + "cache: {url: 'rediss://:hunter2@cache:6380/0', ttl_s: 60}\n")
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "cache: Redis rediss://***@cache:6380/0; namespace gateway, ttl 60 s" in out
    assert "hunter2" not in out
    path.write_text(text)
    assert main(["check", "--config", str(path)]) == 0
    assert "cache: in-process memory, at most 256 MiB" in capsys.readouterr().out
