"""What the gateway costs on the miss path: the same upstream, direct and through it.

    python -m bench.overhead [--upstream static|sim] [--duration 5] [--auth]
                             [--baseline DIR] [--rounds N]
    python -m bench.overhead --check-only
    python -m bench.overhead --protocols [--duration 5] [--rounds N]

Starts an upstream on loopback (a static responder that costs almost no CPU, or the
sim worker with zero delay), the real gateway under uvicorn in front of it, then loads
each at concurrency 1 and 16 in one run and prints req/s, p50/p99 and the ratios.
With two or more cores the gateway is pinned to core 0 and the load generator and
upstream to the others, as in the issue's measurements. The load generator is wrk
when it is installed (`apt-get install wrk`), else an aiohttp client (slower: it
shares the load core with the upstream, so gateway/direct ratios stay comparable but
absolute figures are lower). `--auth` gives the gateway an `auth` section and sends
every request with its key, to price authentication (no rate limit: one key, one
hash, one lookup, one in-flight count).

The answer is a real JPEG (640x640: 149 KB in base64), so the gateway's answer check
(`gateway.answers`) runs on every request as it would on a GPU worker's answer.
Every run also times the answer check (`gateway.answers.problem`) on the same response
body, against what a full check would cost (json.loads + a strict base64 decode);
`--check-only` prints just that.

`--protocols` prices each worker protocol's translation in one run: one gateway with a
pool per row, each pool in front of a static upstream answering that protocol's shape
(the same 640x640 picture; ComfyUI's and Cog's answers per route, precomputed:
/prompt, /history/{id}, /view, /queue, /system_stats; /predictions, /health-check),
loaded in turn at concurrency 1 and 16. Each row is printed as a ratio to the
friendli-container passthrough: an image in the format asked passes through (sliced
out of the answer, checked, text chunks blanked for a1111), one in the other format is
decoded and re-encoded (what a1111's or ComfyUI's PNG costs a client asking JPEG).

`--baseline DIR` prices a change in one run: DIR is another checkout of the gateway
(`git worktree add /tmp/old <commit>`), served by a second gateway process on the
same core, loaded in turn with this one for `--rounds` rounds (the medians are
reported). Besides req/s, each gateway's CPU time per request is read from
/proc/<pid>/stat: it moves far less than throughput when other jobs share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp

from gateway.answers import problem
from gateway.auth import hash_key
from gateway.schema import ImageGenerationBody
from gateway.simworker import Drawing, draw_picture, render, stop, wait_healthy

BODY = {
    "prompt": "a red fox in the snow",
    "num_inference_steps": 20,
    "guidance_scale": 7.5,
    "seed": 7,
}
PATH = "/v1/images/generations"
BENCH_KEY = "gw_bench-key"
# Every request is the same image, so the result cache would answer all but the first:
# no-store keeps this the forwarding path it measures (bench/cache.py measures hits).
NO_STORE = "no-store"


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int = 0
    cpu_us: float | None = None  # the serving process's CPU time per request


@dataclass
class Target:
    url: str
    pid: int | None = None  # a gateway's process, for its CPU time


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", choices=["static", "sim"], default="static")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--size", type=int, default=640, help="image side (640: ~160 KB)")
    parser.add_argument("--auth", action="store_true", help="API keys on, one key sent")
    parser.add_argument("--check-only", action="store_true", help="time the answer check only")
    parser.add_argument("--baseline", type=Path, help="another gateway checkout to compare")
    parser.add_argument("--rounds", type=int, default=1, help="gateway/baseline rounds")
    parser.add_argument("--protocols", action="store_true", help="a row per worker protocol")
    parser.add_argument("--yardstick", action="store_true", help="against nginx (issue 14)")
    parser.add_argument("--processes", type=int, default=1, help="--yardstick: per server")
    parser.add_argument("--profile", type=Path, help="--yardstick: py-spy SVGs into this dir")
    parser.add_argument(
        "--coordination",
        action="store_true",
        help="also a gateway coordinated through a local redis-server, as a follower",
    )
    args = parser.parse_args(argv)
    if args.yardstick:
        from bench.yardstick import run_yardstick  # it imports this module

        run_yardstick(
            args.size, args.duration, args.rounds, args.processes, args.profile, args.baseline
        )
        return
    if args.check_only:
        report_check(image_response(args.size))
        return
    if args.protocols:
        run_protocols(args.size, args.duration, args.rounds)
        return
    headers = {"Content-Type": "application/json", "Cache-Control": NO_STORE}
    if args.auth:
        headers["Authorization"] = f"Bearer {BENCH_KEY}"
    with (
        tempfile.TemporaryDirectory() as tmp,
        servers(args.upstream, args.size, Path(tmp), auth=args.auth, baseline=args.baseline) as t,
        coordinated(t, Path(tmp), enabled=args.coordination),
    ):
        runs: dict[tuple[str, int], list[Result]] = {}
        for round_ in range(args.rounds):
            for name, target in t.items():
                if name == "direct" and round_:
                    continue  # the upstream alone does not change between rounds
                for conc in (1, 16):
                    result = load(target, conc, args.duration, headers)
                    runs.setdefault((name, conc), []).append(result)
    report({key: _median(results) for key, results in runs.items()}, args)


@contextmanager
def servers(
    upstream: str, size: int, tmp: Path, *, auth: bool, baseline: Path | None
) -> Iterator[dict[str, Target]]:
    """direct (the upstream), gateway (this checkout) and baseline (`baseline`'s)."""
    cores = os.cpu_count() or 1
    gateway_cpu = ["taskset", "-c", "0"] if cores >= 2 and shutil.which("taskset") else []
    other_cpu = ["taskset", "-c", f"1-{cores - 1}"] if gateway_cpu else []
    up_port = _free_port()
    if upstream == "static":
        body_file = tmp / "response.json"
        body_file.write_bytes(image_response(size))
        up_cmd = [sys.executable, "-m", "bench.static_upstream", "--body-file", str(body_file)]
    else:
        up_cmd = [
            sys.executable,
            "-m",
            "gateway",
            "sim-worker",
            "--step-ms",
            "0",
            "--size",
            str(size),
            "--concurrency",
            "1000",
        ]
    config = tmp / "adapters.yaml"
    config.write_text(
        "pools:\n  p:\n    workers:\n"
        f"      - {{url: 'http://127.0.0.1:{up_port}', max_concurrency: 1000}}\n"
        "adapters:\n  - {name: base, pool: p, default: true}\n" + (_auth_section() if auth else "")
    )
    gw_cmd = [
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--config",
        str(config),
        "--log-level",
        "warning",
    ]
    procs = []
    try:
        procs.append(subprocess.Popen([*other_cpu, *up_cmd, "--port", str(up_port)]))
        targets = {"direct": Target(f"http://127.0.0.1:{up_port}")}
        wait_healthy(targets["direct"].url, proc=procs[0], path="/health")
        trees = {"gateway": None, "baseline": baseline} if baseline else {"gateway": None}
        for name, tree in trees.items():
            port = _free_port()
            env = {**os.environ, "PYTHONPATH": str(tree.resolve())} if tree else None
            cmd = [*gateway_cpu, *gw_cmd, "--port", str(port)]
            procs.append(subprocess.Popen(cmd, env=env, cwd=tree))
            targets[name] = Target(f"http://127.0.0.1:{port}", procs[-1].pid)
            wait_healthy(targets[name].url, proc=procs[-1], path="/healthz")
        yield targets
    finally:
        for proc in procs:
            stop(proc)


def _auth_section() -> str:
    key = f"{{name: bench, sha256: {hash_key(BENCH_KEY)}, max_concurrent: 1000}}"
    return f"auth:\n  keys:\n    - {key}\n"


def image_response(size: int) -> bytes:
    body = ImageGenerationBody.model_validate(BODY)
    return b'{"image":"' + base64.b64encode(render(body, size)) + b'"}'


def check_cost_us(body: bytes) -> tuple[float, float]:
    """Microseconds per call: the gateway's answer check, and a full parse and decode."""

    def full() -> None:
        base64.b64decode(json.loads(body)["image"], validate=True)

    assert problem(body, "jpeg") is None, "the bench's answer must pass the check"
    times = {}
    for name, call in (("check", lambda: problem(body, "jpeg")), ("full", full)):
        number = 200
        best = min(timeit.repeat(call, number=number, repeat=5))  # the least disturbed
        times[name] = best / number * 1e6
    return times["check"], times["full"]


def report_check(body: bytes) -> None:
    check, full = check_cost_us(body)
    print(
        f"answer check on a {len(body) / 1000:.0f} KB answer: {check:.0f} us a call; "
        f"json.loads + b64decode: {full:.0f} us ({check / full:.2f}x)"
    )


def load(
    target: Target,
    concurrency: int,
    duration: float,
    headers: Mapping[str, str],
    body: Mapping[str, object] = BODY,
) -> Result:
    url = target.url + PATH
    cpu_before = _cpu_s(target.pid)
    if shutil.which("wrk"):
        result = load_wrk(url, concurrency, duration, headers, body)
    else:
        result = asyncio.run(load_aiohttp(url, concurrency, duration, headers, body))
    cpu_after = _cpu_s(target.pid)
    if cpu_before is not None and cpu_after is not None and result.requests:
        result.cpu_us = (cpu_after - cpu_before) / result.requests * 1e6
    return result


def _cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of process `pid` so far (Linux), else None."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _median(results: Sequence[Result]) -> Result:
    cpus = [r.cpu_us for r in results if r.cpu_us is not None]
    return Result(
        rps=statistics.median(r.rps for r in results),
        p50_ms=statistics.median(r.p50_ms for r in results),
        p99_ms=statistics.median(r.p99_ms for r in results),
        requests=sum(r.requests for r in results),
        cpu_us=statistics.median(cpus) if cpus else None,
    )


def load_wrk(
    url: str,
    concurrency: int,
    duration: float,
    headers: Mapping[str, str],
    body: Mapping[str, object] = BODY,
) -> Result:
    cores = os.cpu_count() or 1
    pin = ["taskset", "-c", f"1-{cores - 1}"] if cores >= 2 and shutil.which("taskset") else []
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            f"wrk.body = '{json.dumps(body)}'\n"
            + "".join(f'wrk.headers["{name}"] = "{value}"\n' for name, value in headers.items())
        )
    try:
        done = subprocess.run(
            [
                *pin,
                "wrk",
                "-t1",
                f"-c{concurrency}",
                f"-d{round(duration)}s",
                "--latency",
                "-s",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
        )
    finally:
        os.unlink(script.name)
    if done.returncode != 0:  # e.g. "unable to connect to ...": no run at all
        raise SystemExit(
            f"wrk failed on {url} (exit {done.returncode}):\n{done.stderr}{done.stdout}"
        )
    return parse_wrk(done.stdout, url)


# wrk prints these lines only when a count is not zero. "Non-2xx or 3xx" counts the
# statuses above 399 (wrk's wording); neither the upstreams nor the gateway redirect.
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_ERROR_STATUSES = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_REQUESTS = re.compile(r"^\s+(\d+) requests in ", re.M)


def wrk_failures(out: str) -> dict[str, int]:
    """The requests wrk counted as failed, by kind (connect, read, write, timeout,
    status); empty when every request got a 2xx answer in time."""
    failures: dict[str, int] = {}
    if match := _SOCKET_ERRORS.search(out):
        kinds = ("connect", "read", "write", "timeout")
        failures.update((kind, int(n)) for kind, n in zip(kinds, match.groups(), strict=True))
    if match := _ERROR_STATUSES.search(out):
        failures["status"] = int(match.group(1))
    return {kind: n for kind, n in failures.items() if n}


def parse_wrk(out: str, url: str) -> Result:
    """wrk's req/s and latencies, only for a run where no request failed: a failed
    request is missing from the latencies (a timeout shows as none at all) and a quick
    error answer inflates req/s, so a ratio over such a run would be a false figure."""
    if failures := wrk_failures(out):
        counts = ", ".join(f"{kind} {n}" for kind, n in failures.items())
        raise SystemExit(
            f"wrk: failed requests on {url} ({counts}); no figures from this run:\n{out}"
        )
    completed = _REQUESTS.search(out)
    if completed is None or int(completed.group(1)) == 0:  # e.g. nothing answered at all
        raise SystemExit(f"wrk: no request completed on {url}; no figures from this run:\n{out}")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert rps, out
    return Result(
        rps=float(rps.group(1)),
        p50_ms=_wrk_ms(out, "50%"),
        p99_ms=_wrk_ms(out, "99%"),
        requests=int(completed.group(1)),
    )


def _wrk_ms(out: str, pct: str) -> float:
    match = re.search(rf"^\s+{pct}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    assert match, out
    value, unit = float(match.group(1)), match.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


async def load_aiohttp(
    url: str,
    concurrency: int,
    duration: float,
    headers: Mapping[str, str],
    body: Mapping[str, object] = BODY,
) -> Result:
    latencies: list[float] = []
    payload = json.dumps(body).encode()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.perf_counter() + duration

        async def client() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.post(url, data=payload, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise SystemExit(f"{url}: HTTP {resp.status}")
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100)
    return Result(len(latencies) / elapsed, cuts[49] * 1000, cuts[98] * 1000, len(latencies))


def report(results: dict[tuple[str, int], Result], args: argparse.Namespace) -> None:
    tool = "wrk" if shutil.which("wrk") else "aiohttp client"
    size = len(image_response(args.size))
    print(
        f"upstream={args.upstream}  response={size / 1000:.0f} KB  load={tool}  "
        f"auth={'on' if args.auth else 'off'}  "
        f"duration={args.duration}s per run\n"
    )
    print(f"{'target':<8} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'cpu us/req':>10}")
    for (name, conc), r in results.items():
        cpu = "" if r.cpu_us is None else f"{r.cpu_us:.0f}"
        print(f"{name:<8} {conc:>4} {r.rps:>9.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {cpu:>10}")
    d1, g1 = results["direct", 1], results["gateway", 1]
    d16, g16 = results["direct", 16], results["gateway", 16]
    print(
        f"\ngateway/direct throughput at c=16: {g16.rps / d16.rps:.2f}x "
        f"({g16.rps:.0f} vs {d16.rps:.0f} req/s)"
    )
    print(f"gateway/direct throughput at c=1:  {g1.rps / d1.rps:.2f}x")
    print(
        f"added p50 at c=1: {g1.p50_ms - d1.p50_ms:+.2f} ms; "
        f"added p50 at c=16: {g16.p50_ms - d16.p50_ms:+.2f} ms"
    )
    if ("baseline", 16) in results:
        b1, b16 = results["baseline", 1], results["baseline", 16]
        print(
            f"gateway/baseline ({args.baseline}), medians of {args.rounds} rounds: "
            f"throughput at c=16 {g16.rps / b16.rps:.2f}x ({g16.rps:.0f} vs {b16.rps:.0f}); "
            f"p50 at c=1 {g1.p50_ms - b1.p50_ms:+.2f} ms; "
            f"CPU per request at c=16 {_us(g16.cpu_us)} vs {_us(b16.cpu_us)}"
        )
    if ("coordinated", 16) in results:
        c1, c16 = results["coordinated", 1], results["coordinated", 16]
        print(
            f"coordinated (a follower: each try through Redis)/gateway: throughput at c=16 "
            f"{c16.rps / g16.rps:.2f}x; added p50 at c=1 {c1.p50_ms - g1.p50_ms:+.2f} ms, "
            f"at c=16 {c16.p50_ms - g16.p50_ms:+.2f} ms; CPU per request at c=16 "
            f"{_us(c16.cpu_us)} vs {_us(g16.cpu_us)}"
        )
    report_check(image_response(args.size))


@contextmanager
def coordinated(targets: dict[str, Target], tmp: Path, *, enabled: bool) -> Iterator[None]:
    """`--coordination`: a redis-server, a first gateway that wins the pool's election
    (idle), then the measured one, which follows: every try it makes goes to the
    dispatcher through Redis and back, the cost a replica pays."""
    if not enabled:
        yield
        return
    redis_port = _free_port()
    config = tmp / "coordinated.yaml"
    text = (tmp / "adapters.yaml").read_text()
    config.write_text(text + f"coordination: {{url: 'redis://127.0.0.1:{redis_port}'}}\n")
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    cmd += ["--log-level", "warning"]
    cores = os.cpu_count() or 1
    gateway_cpu = ["taskset", "-c", "0"] if cores >= 2 and shutil.which("taskset") else []
    redis = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1"]
    procs = [subprocess.Popen([*redis, "--save", "", "--appendonly", "no"])]
    try:
        for name in ("leader", "coordinated"):  # the first to heartbeat leads
            port = _free_port()
            procs.append(subprocess.Popen([*gateway_cpu, *cmd, "--port", str(port)]))
            target = Target(f"http://127.0.0.1:{port}", procs[-1].pid)
            wait_healthy(target.url, proc=procs[-1], path="/healthz")
            if name == "coordinated":
                targets[name] = target
        yield
    finally:
        for proc in reversed(procs):
            stop(proc)


def _us(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f} us"


# -- --protocols: a row per worker protocol --------------------------------------------


@dataclass(frozen=True)
class ProtocolRow:
    name: str
    protocol: str
    answer: bytes | None  # what the static upstream answers every request with, or
    response_format: str  # what the client asks for
    path: str  # what the gateway does with the image
    # "METHOD /path" -> (body, content type): each route its own answer (servers that
    # answer in several exchanges); what no route matches gets `answer`, else a 404.
    routes: Mapping[str, tuple[bytes, str]] = field(default_factory=dict)
    settings: str = ""  # the pool's protocol block, YAML
    ready_path: str = "/health"  # a route the static upstream answers 200

    @property
    def image_kb(self) -> float:
        """The size of the answer that carries the image."""
        sizes = [len(body) for body, _ in self.routes.values()]
        return max([len(self.answer or b""), *sizes]) / 1000


def protocol_rows(size: int) -> list[ProtocolRow]:
    """The same picture as each protocol's answer: in the format asked, and not."""
    drawing = Drawing("a red fox in the snow", 20, 7.5, None, 7, size, size, "JPEG")
    jpeg = draw_picture(drawing)
    infotext = "a red fox in the snow\nSteps: 20, Sampler: Euler, Seed: 7, Version: v1.10.1"
    png = draw_picture(replace(drawing, image_format="PNG", text=(("parameters", infotext),)))
    plain_png = draw_picture(replace(drawing, image_format="PNG"))  # SaveImage's: no text

    def openai(image: bytes) -> bytes:
        item = {"b64_json": base64.b64encode(image).decode(), "url": None, "revised_prompt": None}
        return json.dumps({"created": 1, "data": [item]}).encode()

    a1111 = json.dumps(
        {
            "images": [base64.b64encode(png).decode()],
            "parameters": {"prompt": "a red fox in the snow", "seed": 7},
            "info": json.dumps({"seed": 7, "infotexts": [infotext]}),
        }
    ).encode()
    friendli = b'{"image":"' + base64.b64encode(jpeg) + b'"}'
    friendli_png = b'{"image":"' + base64.b64encode(png) + b'"}'
    return [
        ProtocolRow("friendli", "friendli-container", friendli, "jpeg", "passthrough"),
        # The PNG's bytes passed through: what a1111's and comfyui's PNG rows cost
        # for their size alone.
        ProtocolRow("friendli-png", "friendli-container", friendli_png, "raw", "passthrough, PNG"),
        ProtocolRow("openai", "openai-images", openai(jpeg), "jpeg", "sliced, checked"),
        ProtocolRow("openai-reenc", "openai-images", openai(png), "jpeg", "PNG -> JPEG"),
        ProtocolRow("a1111", "a1111", a1111, "raw", "PNG, text blanked"),
        ProtocolRow("a1111-reenc", "a1111", a1111, "jpeg", "PNG -> JPEG"),
        *comfyui_rows(plain_png),
        cog_row(jpeg),
    ]


COMFYUI_WORKFLOW = Path(__file__).resolve().parent.parent / "examples" / "comfyui-sd15-lora.json"
_PROMPT_ID = "9f2b4c1e-7d3a-4e5b-8c6f-0a1b2c3d4e5f"
_JSON = "application/json"


def comfyui_rows(png: bytes) -> list[ProtocolRow]:
    """ComfyUI's exchanges as its server.py answers them: /prompt queues, /history/{id}
    holds the finished prompt, /view the PNG that SaveImage wrote; /system_stats and
    /queue for the gateway's probes. The first poll comes after 1 ms (poll_first_s),
    so each request is three exchanges, not a wait."""
    workflow = json.loads(COMFYUI_WORKFLOW.read_text())
    image = {"filename": "gateway_00001_.png", "subfolder": "", "type": "output"}
    entry = {
        "prompt": [0, _PROMPT_ID, workflow, {"client_id": "bench"}, ["9"]],
        "outputs": {"9": {"images": [image]}},
        "status": {
            "status_str": "success",
            "completed": True,
            "messages": [
                ["execution_start", {"prompt_id": _PROMPT_ID, "timestamp": 1}],
                ["execution_success", {"prompt_id": _PROMPT_ID, "timestamp": 2}],
            ],
        },
        "meta": {"9": {"node_id": "9", "display_node": "9", "real_node_id": "9"}},
    }
    stats = {
        "system": {"os": "posix", "comfyui_version": "0.3.40", "python_version": "3.12"},
        "devices": [{"name": "cuda:0 NVIDIA H100", "type": "cuda", "index": 0}],
    }
    routes = {
        "POST /prompt": (
            json.dumps({"prompt_id": _PROMPT_ID, "number": 0, "node_errors": {}}).encode(),
            _JSON,
        ),
        "GET /history/*": (json.dumps({_PROMPT_ID: entry}).encode(), _JSON),
        "GET /view": (png, "image/png"),
        "GET /queue": (b'{"queue_running": [], "queue_pending": []}', _JSON),
        "GET /system_stats": (json.dumps(stats).encode(), _JSON),
    }
    settings = (
        f"    comfyui: {{workflow: '{COMFYUI_WORKFLOW}', prompt_node: '6', sampler_node: '3',"
        " lora_node: '10', output_node: '9', poll_first_s: 0.001}\n"
    )
    row = ProtocolRow(
        "comfyui", "comfyui", None, "raw", "3 exchanges, PNG", routes, settings, "/system_stats"
    )
    return [row, replace(row, name="comfyui-reenc", response_format="jpeg", path="... -> JPEG")]


def cog_row(jpeg: bytes) -> ProtocolRow:
    """Cog's synchronous prediction (python/cog/server/http.py; coglet's routes.rs): the
    output a list of data URLs, as Replicate's SDXL image answers."""
    prediction = {
        "id": "bench0000000000000000000000",
        "input": {"prompt": "a red fox in the snow", "seed": 7, "output_format": "jpg"},
        "output": ["data:image/jpeg;base64," + base64.b64encode(jpeg).decode()],
        "logs": "",
        "error": None,
        "status": "succeeded",
        "created_at": "2026-12-01T00:00:00.000000+00:00",
        "started_at": "2026-12-01T00:00:00.000000+00:00",
        "completed_at": "2026-12-01T00:00:01.000000+00:00",
        "metrics": {"predict_time": 1.0},
    }
    health = {
        "status": "READY",
        "setup": {"status": "succeeded", "logs": "", "started_at": "", "completed_at": ""},
        "version": {"cog": "0.16.8", "python": "3.12"},
    }
    routes = {
        "POST /predictions": (json.dumps(prediction).encode(), _JSON),
        "GET /health-check": (json.dumps(health).encode(), _JSON),
    }
    return ProtocolRow(
        "cog", "cog", None, "jpeg", "data URL parsed", routes=routes, ready_path="/health-check"
    )


def run_protocols(size: int, duration: float, rounds: int = 1) -> None:
    """Every row in turn, `rounds` times over; each figure the median of its rounds
    (other work on the machine moves one run's req/s by tens of percent)."""
    rows = protocol_rows(size)
    headers = {"Content-Type": "application/json", "Cache-Control": NO_STORE}
    runs: dict[tuple[str, int], list[Result]] = {}
    with tempfile.TemporaryDirectory() as tmp, protocol_servers(rows, Path(tmp)) as target:
        for _ in range(rounds):
            for row in rows:
                body = {**BODY, "model": row.name, "response_format": row.response_format}
                for conc in (1, 16):
                    result = load(target, conc, duration, headers, body)
                    runs.setdefault((row.name, conc), []).append(result)
    results = {key: _median(found) for key, found in runs.items()}
    report_protocols(rows, results, size, duration, rounds)


@contextmanager
def protocol_servers(rows: Sequence[ProtocolRow], tmp: Path) -> Iterator[Target]:
    """A static upstream per row and one gateway with a pool per row (pinned as the
    main run pins them)."""
    cores = os.cpu_count() or 1
    gateway_cpu = ["taskset", "-c", "0"] if cores >= 2 and shutil.which("taskset") else []
    other_cpu = ["taskset", "-c", f"1-{cores - 1}"] if gateway_cpu else []
    urls: list[str] = []
    procs = []
    try:
        for row in rows:
            port = _free_port()
            cmd = [sys.executable, "-m", "bench.static_upstream", *_upstream_args(row, tmp)]
            procs.append(subprocess.Popen([*other_cpu, *cmd, "--port", str(port)]))
            urls.append(f"http://127.0.0.1:{port}")
            wait_healthy(urls[-1], proc=procs[-1], path=row.ready_path)
        config = tmp / "adapters.yaml"
        config.write_text(protocols_registry(rows, urls))
        port = _free_port()
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
        procs.append(
            subprocess.Popen([*gateway_cpu, *cmd, "--log-level", "warning", "--port", str(port)])
        )
        target = Target(f"http://127.0.0.1:{port}", procs[-1].pid)
        wait_healthy(target.url, proc=procs[-1], path="/healthz")
        yield target
    finally:
        for proc in procs:
            stop(proc)


def protocols_registry(rows: Sequence[ProtocolRow], urls: Sequence[str]) -> str:
    """adapters.yaml: a pool per row, its one worker at the url given, and an adapter
    named as the row."""
    pools = [
        f"  {row.name}:\n    protocol: {row.protocol}\n{row.settings}    workers:\n"
        f"      - {{url: '{url}', max_concurrency: 1000}}\n"
        for row, url in zip(rows, urls, strict=True)
    ]
    adapters = [f"  - {{name: {row.name}, pool: {row.name}}}\n" for row in rows]
    return "pools:\n" + "".join(pools) + "adapters:\n" + "".join(adapters)


def _upstream_args(row: ProtocolRow, tmp: Path) -> list[str]:
    """bench.static_upstream's arguments for `row`: its files written under `tmp`."""
    args = []
    if row.answer is not None:
        answer = tmp / f"{row.name}.json"
        answer.write_bytes(row.answer)
        args += ["--body-file", str(answer)]
    if row.routes:
        table = {}
        for i, (route, (body, kind)) in enumerate(row.routes.items()):
            file = tmp / f"{row.name}.{i}"
            file.write_bytes(body)
            table[route] = [str(file), kind]
        routes = tmp / f"{row.name}.routes.json"
        routes.write_text(json.dumps(table))
        args += ["--routes", str(routes)]
    return args


def report_protocols(
    rows: Sequence[ProtocolRow],
    results: Mapping[tuple[str, int], Result],
    size: int,
    duration: float,
    rounds: int = 1,
) -> None:
    tool = "wrk" if shutil.which("wrk") else "aiohttp client"
    print(
        f"image {size}x{size}  load={tool}  duration={duration}s per run, medians of "
        f"{rounds} round(s); static upstreams\n"
    )
    print(
        f"{'row':<13} {'protocol':<19} {'image':<25} {'KB':>5} {'c=16 req/s':>10} "
        f"{'x friendli':>10} {'cpu us/req':>10} {'x':>5} {'p50 c=1':>8}"
    )
    base = results["friendli", 16]
    for row in rows:
        r16, r1 = results[row.name, 16], results[row.name, 1]
        cpu = "" if r16.cpu_us is None else f"{r16.cpu_us:.0f}"
        cpu_x = f"{r16.cpu_us / base.cpu_us:.1f}" if r16.cpu_us and base.cpu_us else ""
        print(
            f"{row.name:<13} {row.protocol:<19} {row.path:<25} {row.image_kb:>5.0f} "
            f"{r16.rps:>10.0f} {r16.rps / base.rps:>10.2f} {cpu:>10} {cpu_x:>5} "
            f"{r1.p50_ms:>8.2f}"
        )


def _free_port() -> int:
    """A port that was free a moment ago. The baseline tree's `gateway serve` and the
    static upstream cannot report a port of their own choosing; a lost race fails the
    run, not a test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


if __name__ == "__main__":
    main()
