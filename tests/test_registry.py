from __future__ import annotations

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
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "pixel-art | pixelart -> pool sdxl (friendli-container)" in out
    assert "    https://flux.internal:8000  max_concurrency=1" in out


def test_check_bad_file_exits_1_with_the_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "adapters.yaml"
    path.write_text(edit("pool: flux, ignore", "pool: nowhere, ignore"))
    assert main(["check", str(path)]) == 1
    assert f"{path}:13: adapters.2.pool: unknown pool 'nowhere'" in capsys.readouterr().err


def test_repository_adapters_yaml_is_valid() -> None:
    registry = load_registry(Path(__file__).parent.parent / "adapters.yaml")
    assert len(registry.pools) >= 2
    assert registry.resolve(None).default


def test_pool_settings_have_documented_defaults_and_are_validated() -> None:
    pool = parse_registry(GOOD).pools["sdxl"]
    assert (pool.max_queue, pool.queue_timeout_s, pool.adapter_load_s) == (100, 30.0, 1.0)
    assert (pool.max_retries, pool.max_accepted_retries) == (2, 1)
    assert pool.retry_on == ("5xx", "timeout", "truncated")
    assert pool.health.consecutive_failures == 5
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
