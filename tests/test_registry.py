from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.errors import ConfigError, UnknownModel
from gateway.registry import load_registry, parse_registry

GOOD = """\
pools:
  sdxl:
    protocol: friendli-container
    workers:
      - {url: "http://127.0.0.1:9001", max_concurrency: 2}
      - {url: "http://127.0.0.1:9002/", max_concurrency: 2, weight: 2}
  flux:
    workers:
      - {url: "https://flux.internal:8000"}
adapters:
  - {name: sdxl-base, pool: sdxl, default: true}
  - {name: pixel-art, pool: sdxl, upstream_model: pixel-art, aliases: [pixelart]}
  - {name: flux-schnell, pool: flux, ignore: [guidance_scale]}
"""


def test_good_file_loads_into_frozen_objects() -> None:
    registry = parse_registry(GOOD)
    assert registry.model_names() == ["sdxl-base", "pixel-art", "flux-schnell"]
    assert registry.pools["sdxl"].workers[1].url == "http://127.0.0.1:9002"
    assert registry.pools["sdxl"].workers[1].weight == 2
    with pytest.raises(ValueError, match="frozen"):
        registry.adapters[0].pool = "flux"  # type: ignore[misc]


def test_routing_by_name_alias_and_default() -> None:
    registry = parse_registry(GOOD)
    assert registry.resolve("pixel-art").upstream_model == "pixel-art"
    assert registry.resolve("pixelart").name == "pixel-art"
    assert registry.resolve(None).name == "sdxl-base"
    with pytest.raises(UnknownModel, match="flux-schnell, pixel-art, sdxl-base"):
        registry.resolve("sd15")


def test_no_default_adapter_means_null_model_is_unknown() -> None:
    registry = parse_registry(GOOD.replace(", default: true", ""))
    with pytest.raises(UnknownModel, match="no model given"):
        registry.resolve(None)


def edit(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            edit("name: flux-schnell", "name: pixel-art"),
            r":13: adapters\.2\.name: 'pixel-art' is already used",
        ),
        (
            edit("name: flux-schnell", "name: pixelart"),
            r":13: adapters\.2\.name: 'pixelart' is already used by an alias",
        ),
        (
            edit("aliases: [pixelart]", "aliases: [sdxl-base]"),
            r":12: adapters\.1\.aliases\.0: 'sdxl-base'",
        ),
        (
            edit("pool: flux, ignore", "pool: flx, ignore"),
            r":13: adapters\.2\.pool: unknown pool 'flx' \(pools: flux, sdxl\)",
        ),
        (
            edit("pool: sdxl, upstream_model", "pool: sdxl, default: true, upstream_model"),
            r":12: adapters\.1\.default: two default",
        ),
        (
            edit("http://127.0.0.1:9001", "ftp://127.0.0.1:9001"),
            r":5: pools\.sdxl\.workers\.0\.url: .*http:// or https://",
        ),
        (edit("http://127.0.0.1:9001", "127.0.0.1:9001"), r"pools\.sdxl\.workers\.0\.url"),
        (
            edit("max_concurrency: 2}", "max_concurrency: 0}"),
            r":5: pools\.sdxl\.workers\.0\.max_concurrency",
        ),
        (edit("protocol: friendli-container", "protocol: grpc"), r":3: pools\.sdxl\.protocol"),
        (edit("ignore: [guidance_scale]", "ignore: [prompt]"), r"adapters\.2\.ignore\.0"),
        (
            edit(
                '    workers:\n      - {url: "https://flux',
                '    wrkers:\n      - {url: "https://flux',
            ),
            r"pools\.flux\.(wrkers|workers)",
        ),
        (
            edit("9002/", "9001"),
            r":6: pools\.sdxl\.workers\.1\.url: worker 'http://127.0.0.1:9001' is listed twice",
        ),
        (GOOD + "  - {name: extra, pool: sdxl}\npools: {}\n", r":15: pools: duplicate key"),
        ("pools: [\n", r"not valid YAML"),
        ("- just\n- a list\n", r"expected a mapping"),
        (GOOD.split("adapters:")[0], r"adapters: Field required"),
    ],
)
def test_bad_files_are_refused_naming_line_and_key(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_registry(text, source="adapters.yaml")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_registry(tmp_path / "nope.yaml")


def test_check_prints_routing_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "adapters.yaml"
    path.write_text(GOOD)
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "pixel-art | pixelart -> pool sdxl (friendli-container)" in out
    assert "    https://flux.internal:8000  max_concurrency=1" in out


def test_check_bad_file_exits_1_with_the_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "adapters.yaml"
    path.write_text(edit("pool: flux, ignore", "pool: nowhere, ignore"))
    assert main(["check", "--config", str(path)]) == 1
    assert f"{path}:13: adapters.2.pool: unknown pool 'nowhere'" in capsys.readouterr().err


def test_repository_adapters_yaml_is_valid() -> None:
    registry = load_registry(Path(__file__).parent.parent / "adapters.yaml")
    assert len(registry.pools) >= 2
    assert registry.resolve(None).default


def test_pool_settings_have_documented_defaults_and_are_validated() -> None:
    pool = parse_registry(GOOD).pools["sdxl"]
    assert (pool.max_queue, pool.queue_timeout_s, pool.adapter_load_s) == (100, 30.0, 1.0)
    assert (pool.max_retries, pool.max_accepted_retries) == (2, 1)
    assert pool.retry_on == ("5xx", "timeout", "truncated", "bad_answer")
    assert pool.max_response_bytes == 32 * 2**20
    assert pool.health.consecutive_failures == 5
    with pytest.raises(ConfigError, match=r"pools\.sdxl\.max_response_bytes"):
        parse_registry(edit("    protocol: friendli-container\n", "    max_response_bytes: 10\n"))
    with pytest.raises(ConfigError, match=r"pools\.sdxl\.retry_on\.0"):
        parse_registry(edit("    protocol: friendli-container\n", "    retry_on: [4xx]\n"))
    with pytest.raises(ConfigError, match=r"pools\.sdxl\.health\.healthy_threshold"):
        parse_registry(
            edit("    protocol: friendli-container\n", "    health: {healthy_threshold: 0}\n")
        )


def test_a_pool_takes_workers_or_discover_not_both() -> None:
    both = edit(
        "    protocol: friendli-container\n",
        "    discover: {dns: workers.sdxl.svc, port: 8000}\n",
    )
    with pytest.raises(ConfigError, match=r":3: pools\.sdxl: give either a 'workers' list or"):
        parse_registry(both)
    dns_only = GOOD.replace(
        '    workers:\n      - {url: "https://flux.internal:8000"}\n',
        "    discover: {dns: flux.ns.svc.cluster.local, port: 8000, every_s: 5}\n",
    )
    discover = parse_registry(dns_only).pools["flux"].discover
    assert discover is not None
    assert discover.url_for("10.1.2.3") == "http://10.1.2.3:8000"


KEY_HASH = "A" * 64  # upper case: stored lower
OTHER_HASH = "b" * 64
GUARDED = (
    GOOD
    + f"""\
limits: {{max_body_bytes: 4096, max_prompt_chars: 500}}
auth:
  keys:
    - {{name: team-a, sha256: {KEY_HASH}, adapters: [sdxl-base], rate: {{per_s: 5}}}}
    - {{name: team-b, sha256: {OTHER_HASH}, max_concurrent: 3}}
  metrics_key_sha256: {"c" * 64}
  redis_url: "redis://:${{REDIS_PASSWORD}}@redis.internal:6379/0"
"""
)
ENV = {"REDIS_PASSWORD": "pw"}


def test_auth_and_limits_sections_load() -> None:
    registry = parse_registry(GUARDED, env=ENV)
    assert registry.limits.max_body_bytes == 4096
    assert registry.limits.max_header_bytes == 16384  # the default
    assert registry.auth is not None
    team_a = registry.auth.key_for("a" * 64)
    assert team_a is not None
    assert team_a.name == "team-a"
    assert team_a.may_use("sdxl-base")
    assert not team_a.may_use("pixel-art")
    assert team_a.rate is not None
    assert team_a.rate.capacity == 5
    team_b = registry.auth.key_for(OTHER_HASH)
    assert team_b is not None
    assert team_b.may_use("flux-schnell")
    assert registry.auth.redis_url == "redis://:pw@redis.internal:6379/0"
    for secret in ("a" * 64, OTHER_HASH, "c" * 64, ":pw@"):
        assert secret not in repr(registry)


def test_no_sections_means_open_with_default_limits() -> None:
    registry = parse_registry(GOOD)
    assert registry.auth is None
    assert registry.limits.max_body_bytes == 65536
    assert registry.limits.max_prompt_chars == 4000


def guarded_edit(old: str, new: str) -> str:
    assert old in GUARDED
    return GUARDED.replace(old, new)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (guarded_edit(KEY_HASH, "abc"), r":17: auth\.keys\.0\.sha256: String should match"),
        (guarded_edit("name: team-b", "name: team-a"), r":18: auth\.keys\.1\.name: .*used twice"),
        (
            guarded_edit("adapters: [sdxl-base]", "adapters: [sdxl-base, pixelart]"),
            r":17: auth\.keys\.0\.adapters\.1: unknown adapter 'pixelart' \(adapter names: ",
        ),
        (
            guarded_edit(OTHER_HASH, KEY_HASH.lower()),
            r":18: auth\.keys\.1\.sha256: same key hash as key 'team-a'",
        ),
        (
            guarded_edit("c" * 64, OTHER_HASH),
            r":19: auth\.metrics_key_sha256: same key hash as key 'team-b'",
        ),
        (
            guarded_edit(KEY_HASH, hashlib.sha256(b"").hexdigest()),
            r"auth\.keys\.0\.sha256: that is the hash of an empty key",
        ),
        (guarded_edit("per_s: 5", "per_s: 0"), r":17: auth\.keys\.0\.rate\.per_s"),
        (guarded_edit("max_concurrent: 3", "max_concurrent: 0"), r"auth\.keys\.1\.max_concurrent"),
        (guarded_edit("redis://:", "http://:"), r":20: auth\.redis_url: .*redis://"),
        (
            guarded_edit("${REDIS_PASSWORD}", "${NO_SUCH_VAR}"),
            r":20: auth\.redis_url: .*environment variable NO_SUCH_VAR is not set",
        ),
        (
            guarded_edit("max_body_bytes: 4096", "max_body_bytes: 10"),
            r":14: limits\.max_body_bytes",
        ),
        (guarded_edit("max_prompt_chars", "max_prompt_char"), r":14: limits\.max_prompt_char"),
        (
            guarded_edit("max_body_bytes: 4096", "max_body_bytes: 4096, body_idle_s: 0"),
            r":14: limits\.body_idle_s: Input should be greater than 0",
        ),
        (
            guarded_edit("max_body_bytes: 4096", "max_body_bytes: 4096, max_connections: 0"),
            r":14: limits\.max_connections: Input should be greater than or equal to 1",
        ),
        (
            guarded_edit("  keys:\n", "  keys: []\n  old_keys:\n"),
            r":16: auth\.keys: Tuple should have at least 1",
        ),
    ],
)
def test_bad_auth_and_limits_are_refused_naming_line_and_key(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        parse_registry(text, source="adapters.yaml", env=ENV)
    for secret in (KEY_HASH, KEY_HASH.lower(), OTHER_HASH, "pw"):
        assert secret not in str(info.value).replace("password", "")


POOL_HEADERS = edit(
    "    protocol: friendli-container\n",
    "    protocol: friendli-container\n"
    '    headers: {Authorization: "Bearer ${SDXL_TOKEN}", X-Team: images}\n',
)


def test_pool_headers_are_expanded_from_the_environment() -> None:
    registry = parse_registry(POOL_HEADERS, env={"SDXL_TOKEN": "s3cret"})
    assert dict(registry.pools["sdxl"].headers) == {
        "Authorization": "Bearer s3cret",
        "X-Team": "images",
    }
    assert dict(registry.pools["flux"].headers) == {}
    assert "s3cret" not in repr(registry)


@pytest.mark.parametrize(
    ("old", "new", "env", "expected"),
    [
        (
            "${SDXL_TOKEN}",
            "${SDXL_TOKEN}",
            {},
            r":4: pools\.sdxl\.headers\.Authorization: .*variable SDXL_TOKEN is not set",
        ),
        ("X-Team", "Connection", {"SDXL_TOKEN": "t"}, r"pools\.sdxl\.headers\.Connection"),
        ("X-Team", "Proxy-Authorization", {"SDXL_TOKEN": "t"}, r"headers\.Proxy-Authorization"),
        (
            "X-Team",
            "Host",
            {"SDXL_TOKEN": "t"},
            r"pools\.sdxl\.headers\.Host: .*set by the gateway",
        ),
        ("X-Team", '"Bad Name"', {"SDXL_TOKEN": "t"}, r"not a valid header name"),
        ("${SDXL_TOKEN}", "${SDXL_TOKEN}", {"SDXL_TOKEN": "a\r\nX-Evil: 1"}, r"CR, LF or NUL"),
    ],
)
def test_bad_pool_headers_are_refused_at_load(
    old: str, new: str, env: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_registry(POOL_HEADERS.replace(old, new), source="adapters.yaml", env=env)


def test_aliases_that_multiply_or_loop_are_refused_quickly() -> None:
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for level in "bcdefghij":
        prev = chr(ord(level) - 1)
        laughs += f"{level}: &{level} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
    with pytest.raises(ConfigError, match="more than 100000 values once aliases expand"):
        parse_registry(laughs)
    with pytest.raises(ConfigError, match="more than 100000 values"):
        parse_registry("pools: &p [*p]\nadapters: []\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_registry("pools: " + "[" * 5000 + "]" * 5000 + "\n")


def test_aliases_within_bounds_still_work() -> None:
    text = GOOD.replace(
        '      - {url: "https://flux.internal:8000"}',
        '      - &w {url: "https://flux.internal:8000"}',
    ).replace("adapters:\n", "  extra:\n    workers: [*w]\nadapters:\n")
    assert parse_registry(text).pools["extra"].workers[0].url == "https://flux.internal:8000"
