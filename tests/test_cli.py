"""The real gateway under uvicorn in a child process, the demo, and `generate`."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from gateway.cli import _parser, main
from gateway.registry import load_registry
from gateway.simworker import SimConfig, create_sim_app
from gateway.testing import ServedSim, registry_yaml, serve_in_thread
from tests.support import body, dead_url, gateway_process

WORKERS_NOTE = "note: --workers is deprecated, write --processes"
CHECK_NOTE = "note: `gateway check FILE` is deprecated"


def write_config(tmp_path: Path, urls: list[str], **pool_options: Any) -> str:
    path = tmp_path / "adapters.yaml"
    adapters: list[dict[str, Any]] = [
        {"name": "sdxl-base", "pool": "sdxl", "default": True},
        {"name": "pixel-art", "pool": "sdxl", "upstream_model": "pixel-art"},
    ]
    path.write_text(registry_yaml({"sdxl": urls}, adapters, **pool_options))
    return str(path)


def test_served_gateway_round_trip(tmp_path: Path, fast_sims: list[ServedSim]) -> None:
    config = write_config(tmp_path, [s.url for s in fast_sims])
    with gateway_process(config) as url:
        resp = httpx.post(url + "/v1/images/generations", json=body(model="pixel-art", seed=5))
        again = httpx.post(url + "/v1/images/generations", json=body(model="pixel-art", seed=5))
        bad = httpx.post(url + "/v1/images/generations", json=body(num_inference_steps=51))
        ready = httpx.get(url + "/readyz")
    assert resp.status_code == 200
    image = Image.open(io.BytesIO(base64.b64decode(resp.json()["image"])))
    assert (image.format, image.size) == ("JPEG", (128, 128))
    assert again.content == resp.content
    assert bad.status_code == 422
    assert ready.json()["status"] == "ready"


def test_served_gateway_dead_and_slow_workers(tmp_path: Path) -> None:
    with serve_in_thread(create_sim_app(SimConfig(step_ms=200, size=32))) as slow:
        config = write_config(tmp_path, [slow], timeout_s=0.5)
        with gateway_process(config) as url:
            timed_out = httpx.post(
                url + "/v1/images/generations", json=body(num_inference_steps=10)
            )
            fast = httpx.post(url + "/v1/images/generations", json=body(num_inference_steps=1))
    assert timed_out.status_code == 504
    assert fast.status_code == 200
    dead = write_config(tmp_path, [dead_url()])
    with gateway_process(dead) as url:
        refused = httpx.post(url + "/v1/images/generations", json=body())
    assert refused.status_code == 502
    # Refused on the try, or already known down by the health prober: either way, said.
    assert refused.json()["detail"] in (
        "adapter 'sdxl-base': worker sdxl-0: cannot connect (connection refused)",
        "adapter 'sdxl-base': pool 'sdxl': no healthy worker",
    )


def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "adapters.yaml"
    path.write_text("pools: {}\nadapters: []\n")
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1
    assert f"error: {path}:2: adapters: Tuple should have at least 1 item" in proc.stderr


def test_generate_writes_the_image(
    tmp_path: Path, fast_sims: list[ServedSim], capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, [s.url for s in fast_sims])
    out = tmp_path / "fox.png"
    with gateway_process(config) as url:
        code = main(
            [
                "generate",
                "a red fox",
                "--model",
                "pixel-art",
                "--seed",
                "7",
                "--format",
                "raw",
                "--out",
                str(out),
                "--url",
                url,
            ]
        )
    assert code == 0
    with Image.open(out) as image:
        assert image.format == "PNG"
    assert re.search(r"seed=7 cache=\w+ adapter=pixel-art time=\d+ms", capsys.readouterr().out)


def test_demo_serves_images_and_stops_its_workers() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--port", "0", "--step-ms", "1"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    try:
        url, printed = "", ""
        for line in proc.stdout:
            printed += line
            if match := re.search(r"gateway listening on (http://127\.0\.0\.1:\d+)", line):
                url = match.group(1)
                break
        assert url, "demo never printed its URL"
        for line in proc.stdout:  # the banner's curls, one per pool, up to the first blank
            printed += line
            if not line.strip() and "curl" in printed:
                break
        worker_urls = re.findall(r"^    (http://127\.0\.0\.1:\d+)", printed, re.M)
        pools = re.findall(r"^  # pool (\S+) \((\S+)\)$", printed, re.M)
        bodies = re.findall(r"^    -d '(\{.*\})' \|", printed, re.M)
        protocols = {"friendli-container", "openai-images", "a1111", "comfyui", "cog"}
        assert {protocol for _, protocol in pools} == protocols  # the issue: every protocol
        listed = load_registry(Path(__file__).parent.parent / "adapters.yaml")
        assert len(bodies) == len(pools) == len(listed.pools)
        for payload in bodies:  # each curl of the banner, as it is printed
            resp = httpx.post(url + "/v1/images/generations", content=payload, timeout=30)
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-adapter"] == json.loads(payload)["model"]
    finally:
        proc.terminate()
        code = proc.wait(15)
        proc.stdout.close()
    assert code == 0
    assert len(set(worker_urls)) == sum(len(p.workers) for p in listed.pools.values())
    for worker_url in worker_urls:  # the demo's children are gone with it
        with pytest.raises(httpx.ConnectError):
            httpx.get(worker_url + "/health")


def test_check_reads_the_registry_named_by_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, [worker := dead_url()])
    assert main(["check", "--config", config]) == 0
    out, err = capsys.readouterr()
    assert f"    {worker}  max_concurrency=" in out  # this file, not ./adapters.yaml
    assert err == ""


def test_check_still_takes_the_file_as_an_argument_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, [worker := dead_url()])
    assert main(["check", config]) == 0
    out, err = capsys.readouterr()
    assert f"    {worker}  max_concurrency=" in out  # this file, not ./adapters.yaml
    assert f"{CHECK_NOTE}, write `gateway check --config {config}`" in err


def test_check_refuses_the_file_given_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, [dead_url()])
    assert main(["check", "--config", config, config]) == 2
    assert "give the registry once, with --config" in capsys.readouterr().err


def test_serve_counts_server_processes_with_processes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert _parser().parse_args(["serve"]).processes == 1
    assert _parser().parse_args(["serve", "--processes", "3"]).processes == 3
    assert WORKERS_NOTE not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    shown = capsys.readouterr().out
    assert "--processes" in shown
    assert "--workers" not in shown  # the old spelling works, but is not offered


def test_serve_workers_is_a_deprecated_alias_that_warns_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = _parser().parse_args(["serve", "--workers", "2", "--workers", "4"])
    assert args.processes == 4
    assert capsys.readouterr().err.count(WORKERS_NOTE) == 1
