"""The gateway against nginx, in one run: `python -m bench.overhead --yardstick`.

    python -m bench.overhead --yardstick [--rounds 3] [--duration 4] [--processes N]

One static upstream (nginx answering every POST with the same image answer, a real
640x640 JPEG in base64), and in front of it, side by side:

    nginx proxy      nginx `proxy_pass` with upstream keep-alive: the miss yardstick
    nginx cache      nginx `proxy_cache` of the POST (key: URI + body), every answer a hit
    gateway miss     `gateway serve`, its cache off: every request forwarded and checked
    gateway memory   the same with the in-process memory cache, every answer a hit
    gateway redis    the same with a Redis cache (redis-server started here), every hit

Every gateway feature is on, as served: Prometheus metrics, the JSON access log (to a
file, at level info), request ids, auth (one key, sent with every request), and the
answer check on every worker 200. The run checks each of them once before loading and
prints which are on. Each row is loaded with wrk at c=1 and c=16 in every round; the
four ratios of issue 14 are computed within each round and their median is printed.

CPU pinning (taskset): wrk on the last core, every server (nginx, redis-server, the
gateways) on the others, which with 2 cores is one core for all servers. `--processes
N` gives the gateways N server processes and nginx N workers, and lets the servers
use N cores (wrk's included where there are no more): the scaling measurement.

nginx is not a dependency of the gateway: when none is on PATH, the run fetches
Debian's `nginx` package with `apt-get download` and unpacks it under
~/.cache/image-gateway-bench (dpkg -x: nothing is installed or started system-wide, so
no nginx service comes up listening on port 80). It runs as this user, with its own
prefix, configuration and temporary files under the run's temporary directory, on
127.0.0.1 free ports, and is stopped at the end.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from bench.overhead import (
    BENCH_KEY,
    BODY,
    Result,
    Target,
    _auth_section,
    _free_port,
    image_response,
    load,
)
from gateway.simworker import stop, wait_healthy

PATH = "/v1/images/generations"
CACHE_DIR = Path.home() / ".cache" / "image-gateway-bench"

# Issue 14's goals: a ratio to nginx at c=16 (at least), or added p50 at c=1 (at most).
GOALS = {
    "miss / nginx proxy": 0.25,
    "memory hit / nginx cache": 0.35,
    "redis hit / nginx cache": 0.18,
}
ADDED_P50_GOAL_MS = 0.45


@dataclass(frozen=True)
class Row:
    name: str
    url: str
    gateway: bool  # sends the API key, answers X-Cache and X-Request-ID
    pid: int  # the serving process (nginx's master, a gateway's): py-spy's target
    servers: tuple[int, ...]  # every server process whose CPU a request may use


def server_pin(processes: int) -> list[str]:
    """taskset for every server: core 0 (0..N-1 with N processes). wrk runs on cores 1
    and up (bench.overhead.load_wrk), so with 2 cores and N=2 it shares core 1."""
    n = os.cpu_count() or 1
    if n < 2 or not shutil.which("taskset"):
        return []
    return ["taskset", "-c", "0" if processes == 1 else f"0-{min(processes, n) - 1}"]


def nginx_binary() -> str:
    """nginx from PATH, else Debian's package unpacked under CACHE_DIR (once)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if found:
        return found
    binary = CACHE_DIR / "nginx" / "usr" / "sbin" / "nginx"
    if binary.exists():
        return str(binary)
    if not shutil.which("apt-get"):
        raise SystemExit("nginx not found and no apt-get: install nginx (nginx-light) first")
    download = CACHE_DIR / "download"
    download.mkdir(parents=True, exist_ok=True)
    print("nginx not found: fetching Debian's nginx package (apt-get download)", flush=True)
    fetch = ["apt-get", "download", "-q", "nginx"]
    done = subprocess.run(fetch, cwd=download, capture_output=True, text=True)
    debs = sorted(download.glob("nginx_*.deb"))
    if not debs and os.geteuid() == 0:  # stale package lists: refresh them once
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        done = subprocess.run(fetch, cwd=download, capture_output=True, text=True)
        debs = sorted(download.glob("nginx_*.deb"))
    if not debs:
        raise SystemExit(f"apt-get download nginx failed:\n{done.stderr}")
    subprocess.run(["dpkg", "-x", str(debs[-1]), str(CACHE_DIR / "nginx")], check=True)
    return str(binary)


def nginx_conf(
    prefix: Path, ports: Mapping[str, int], docroot: Path, workers: int, logs: bool = True
) -> str:
    """Three servers in one nginx: the upstream (a static file for every POST) and the
    two yardsticks in front of it. Proxy buffers hold a whole answer in memory."""
    access = f"access_log {prefix}/access.log;" if logs else "access_log off;"
    # As root, nginx's workers would run as nobody, who cannot read the run's 0700 tmp.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    return f"""
{user}
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    default_type application/json;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    proxy_cache_path {prefix}/cache keys_zone=images:10m;
    upstream worker {{ server 127.0.0.1:{ports["upstream"]}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{ports["upstream"]};
        access_log off;
        root {docroot};
        # The static module answers POST with 405: serve the file as the answer.
        error_page 405 =200 $uri;
    }}
    server {{
        listen 127.0.0.1:{ports["proxy"]};
        {access}
        location / {{
            proxy_pass http://worker;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffers 64 8k;
        }}
    }}
    server {{
        listen 127.0.0.1:{ports["cache"]};
        {access}
        location / {{
            proxy_pass http://worker;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffers 64 8k;
            proxy_cache images;
            proxy_cache_methods POST;
            proxy_cache_key "$request_uri|$request_body";
            proxy_cache_valid 200 1d;
            add_header X-Cache $upstream_cache_status;
        }}
    }}
}}
"""


@contextmanager
def nginx(
    tmp: Path, answer: bytes, ports: Mapping[str, int], *, workers: int, pin: list[str]
) -> Iterator[int]:
    """nginx's master process id, once all three servers answer."""
    prefix = tmp / "nginx"
    docroot = prefix / "www"
    (docroot / PATH.strip("/")).parent.mkdir(parents=True)
    (docroot / PATH.strip("/")).write_bytes(answer)
    (docroot / "health").write_text("ok\n")
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, ports, docroot, workers))
    cmd = [*pin, nginx_binary(), "-p", str(prefix), "-c", str(conf), "-e", "stderr"]
    proc = subprocess.Popen([*cmd, "-g", "daemon off;"])
    try:
        for name in ("upstream", "proxy", "cache"):
            wait_healthy(f"http://127.0.0.1:{ports[name]}", proc=proc, path="/health")
        yield proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
        stop(proc)


@contextmanager
def redis_server(tmp: Path, port: int, pin: list[str]) -> Iterator[tuple[str, int]]:
    """redis-server on `port`, no persistence: its URL and process id."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: apt-get install -y redis-server")
    cmd = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    cmd += ["--appendonly", "no", "--dir", str(tmp)]
    proc = subprocess.Popen([*pin, *cmd], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while _send(port, b"PING\r\n") != b"+PONG\r\n":
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}", proc.pid
    finally:
        stop(proc)


def _send(port: int, line: bytes) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(line)
            return sock.recv(64)
    except OSError:
        return b""


def gateway_config(upstream: str, cache: str, auth: str) -> str:
    return (
        "pools:\n  p:\n    workers:\n"
        f"      - {{url: '{upstream}', max_concurrency: 1000}}\n"
        "adapters:\n  - {name: base, pool: p, default: true}\n"
        f"cache: {cache}\n" + auth
    )


@contextmanager
def gateway(
    tmp: Path,
    name: str,
    config: str,
    port: int,
    *,
    processes: int,
    pin: list[str],
    tree: Path | None = None,
) -> Iterator[tuple[Path, int]]:
    """`gateway serve` as an operator runs it (log level info: the access log on, to a
    file), from this checkout or `tree`; the path of its log and its process id."""
    path = tmp / f"{name}.yaml"
    path.write_text(config)
    log = tmp / f"{name}.log"
    cmd = [*pin, sys.executable, "-m", "gateway", "serve", "--config", str(path)]
    cmd += ["--port", str(port), "--log-level", "info", "--processes", str(processes)]
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())} if tree else None
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stderr=out, stdout=out, env=env, cwd=tree)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc=proc, path="/healthz", timeout_s=90)
        yield log, proc.pid
    finally:
        stop(proc)


@contextmanager
def bare_asgi(tmp: Path, answer: bytes, port: int, pin: list[str]) -> Iterator[int]:
    """bench.bare_asgi: the server the gateway runs on, answering the cached answer with
    no gateway work at all (the floor of a hit). Its process id."""
    body = tmp / "bare.json"
    body.write_bytes(answer)
    cmd = [sys.executable, "-m", "bench.bare_asgi", "--port", str(port), "--body-file", str(body)]
    proc = subprocess.Popen([*pin, *cmd])
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc=proc, path="/")
        yield proc.pid
    finally:
        stop(proc)


def post(url: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url + PATH, data=body, headers=dict(headers), method="POST")
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()


def check_features(
    rows: Sequence[Row],
    body: bytes,
    headers: Mapping[str, str],
    key: str,
    logs: Sequence[Path],
    processes: int,
) -> list[str]:
    """Each feature seen working once, before any load: what the report says is on."""
    keyed = {**headers, "Authorization": f"Bearer {key}"}
    seen: list[str] = []
    for row in rows:
        want_hit = row.name.endswith(("cache", "memory", "redis"))
        # The first fills a cache; a later one must hit it (with N processes, each
        # memory cache fills on its own first request: N + 1 tries, and some more).
        for _ in range(2 + 4 * (processes - 1)):
            status, got, answer = post(row.url, body, keyed if row.gateway else headers)
            if status != 200 or not answer.startswith(b'{"image":"'):
                raise SystemExit(f"{row.name}: HTTP {status}, not an image answer")
            cache = got.get("x-cache", "").lower()
            if want_hit and cache == "hit":
                break
        if row.name == "bare uvicorn":
            continue
        if want_hit and cache != "hit":
            raise SystemExit(f"{row.name}: no cache hit after the first request ({cache!r})")
        if row.gateway:
            if "x-request-id" not in got:
                raise SystemExit(f"{row.name}: no X-Request-ID on the answer")
            if (refused := _status(row.url, body, headers)) != 401:  # no key sent
                raise SystemExit(f"{row.name}: a request without the key got {refused}")
    for log in logs:
        if '"logger":"gateway.access"' not in log.read_text():
            raise SystemExit(f"{log}: no access-log line")
    seen.append("metrics (gateway_requests_total etc., every request)")
    seen.append("access log (JSON line per request, level info, to a file)")
    seen.append("request ids (X-Request-ID on every answer, seen)")
    seen.append("auth (one API key configured and sent; keyless refused 401, seen)")
    seen.append("answer check (gateway.answers on every worker 200: the miss row)")
    return seen


def _status(url: str, body: bytes, headers: Mapping[str, str]) -> int:
    try:
        return post(url, body, headers)[0]
    except urllib.error.HTTPError as exc:
        return exc.code


def requests_counted(url: str, key: str) -> float:
    """gateway_requests_total over every label, from the gateway's /metrics."""
    request = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        float(m.group(1))
        for m in re.finditer(r"^gateway_requests_total\{.*\} ([\d.e+]+)$", text, re.M)
    )


def run_yardstick(
    size: int,
    duration: float,
    rounds: int,
    processes: int,
    profile: Path | None = None,
    baseline: Path | None = None,
) -> None:
    """`baseline`: another checkout of the gateway, whose three gateways are loaded in
    the same rounds ("old ..." rows), for a before/after inside one run."""
    answer = image_response(size)
    body = json.dumps(BODY).encode()
    plain = {"Content-Type": "application/json"}
    keyed = {**plain, "Authorization": f"Bearer {BENCH_KEY}"}
    pin = server_pin(processes)
    names = ["upstream", "proxy", "cache", "redis", "miss", "memory", "rediscache", "bare"]
    names += ["old miss", "old memory", "old rediscache"] if baseline else []
    names += ["1p miss", "1p memory", "1p rediscache"] if processes > 1 else []
    ports = {name: _free_port() for name in names}
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    with tempfile.TemporaryDirectory() as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        nginx_pid = stack.enter_context(nginx(tmp, answer, ports, workers=processes, pin=pin))
        redis_url, redis_pid = stack.enter_context(redis_server(tmp, ports["redis"], pin))
        caches = {
            "miss": "{enabled: false}",
            "memory": "{enabled: true}",
            "rediscache": f"{{enabled: true, url: '{redis_url}'}}",
        }
        trees: dict[str, Path | None] = dict.fromkeys(caches)
        counts = dict.fromkeys(caches, processes)
        if processes > 1:  # the same gateways with one process, on core 0 alone
            caches |= {f"1p {name}": cache for name, cache in caches.items()}
            counts |= dict.fromkeys(("1p miss", "1p memory", "1p rediscache"), 1)
        if baseline:  # the old ones keep their Redis entries apart (another namespace)
            old = f"{{enabled: true, url: '{redis_url}', namespace: old}}"
            caches |= {"old miss": caches["miss"], "old memory": caches["memory"]}
            caches["old rediscache"] = old
            trees |= dict.fromkeys(("old miss", "old memory", "old rediscache"), baseline)
            counts |= dict.fromkeys(("old miss", "old memory", "old rediscache"), processes)
        served = [
            stack.enter_context(
                gateway(
                    tmp,
                    name.replace(" ", "-"),
                    gateway_config(url["upstream"], cache, _auth_section()),
                    ports[name],
                    processes=counts[name],
                    pin=pin if counts[name] == processes else server_pin(1),
                    tree=trees.get(name),
                )
            )
            for name, cache in caches.items()
        ]
        bare_pid = stack.enter_context(bare_asgi(tmp, answer, ports["bare"], pin))
        logs = [log for log, _ in served]
        pid = {name: pid for name, (_, pid) in zip(caches, served, strict=True)}
        shared = (nginx_pid, redis_pid)  # the upstream and nginx's yardsticks; Redis
        rows = [
            Row("direct", url["upstream"], False, nginx_pid, shared),
            Row("nginx proxy", url["proxy"], False, nginx_pid, shared),
            Row("nginx cache", url["cache"], False, nginx_pid, shared),
            Row("bare uvicorn", url["bare"], False, bare_pid, (bare_pid, *shared)),
        ]
        # Gateway rows: "gateway miss" (this tree, N processes), "1p miss" (this tree,
        # one process: only with N > 1), "old miss" (--baseline), and so on.
        for prefix in ("", "1p ", "old "):
            for path, key in (("miss", "miss"), ("memory", "memory"), ("redis", "rediscache")):
                if prefix + key in pid:
                    served_by = pid[prefix + key]
                    name = f"{prefix or 'gateway '}{path}"
                    rows.append(Row(name, url[prefix + key], True, served_by, (served_by, *shared)))
        features = check_features(rows, body, plain, BENCH_KEY, logs, processes)
        counted_before = requests_counted(url["miss"], BENCH_KEY)
        runs: list[dict[tuple[str, int], Result]] = []
        for round_ in range(rounds):
            results: dict[tuple[str, int], Result] = {}
            order = rows if round_ % 2 == 0 else rows[::-1]  # drift moves all rows alike
            for row in order:
                for conc in (1, 16):
                    headers = keyed if row.gateway else plain
                    spy = profile if round_ == 0 and row.gateway and conc == 16 else None
                    with py_spy(row, spy, duration, processes) if spy else nullcontext():
                        results[row.name, conc] = measure(row, conc, duration, headers)
            runs.append(results)
            print(f"round {round_ + 1}/{rounds} done", file=sys.stderr, flush=True)
        counted = requests_counted(url["miss"], BENCH_KEY) - counted_before
        loaded = sum(run["gateway miss", conc].requests for run in runs for conc in (1, 16))
        if counted < loaded:
            raise SystemExit(f"gateway miss: /metrics counted {counted:.0f} of {loaded} requests")
    print(
        f"answer {len(answer) / 1000:.0f} KB  load=wrk  {duration:g}s per run, {rounds} rounds "
        f"(rows alternate order)  server processes/nginx workers: {processes}\n"
        f"pinning: servers (nginx, redis-server, gateways) {' '.join(pin[2:]) or 'unpinned'}"
        f", wrk on cores 1-{(os.cpu_count() or 1) - 1} (taskset); "
        f"upstream: nginx answering a static file\n"
        "gateway features on: " + "; ".join(features) + "\n"
    )
    report(rows, runs)


def measure(row: Row, conc: int, duration: float, headers: Mapping[str, str]) -> Result:
    """A wrk run on `row`, with the CPU time the servers spent per request: the row's
    gateway, nginx (the upstream, and the yardstick's own work on nginx rows) and
    redis-server. What the run counts against each request, however busy the machine."""
    before = sum(_tree_cpu_s(pid) for pid in row.servers)
    result = load(Target(row.url), conc, duration, headers)
    spent = sum(_tree_cpu_s(pid) for pid in row.servers) - before
    result.cpu_us = spent / max(1, result.requests) * 1e6
    return result


def _tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` and its descendants (nginx's workers, the
    processes of `gateway serve --processes N`), reaped ones included."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    own = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return own / os.sysconf("SC_CLK_TCK") + sum(_tree_cpu_s(int(child)) for child in children)


@contextmanager
def py_spy(row: Row, directory: Path, duration: float, processes: int) -> Iterator[None]:
    """A flame graph (SVG) of `row`'s gateway while it is loaded: py-spy, sampling."""
    binary = shutil.which("py-spy")
    if binary is None:
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"{row.name.replace(' ', '-')}.svg"
    cmd = [binary, "record", "--pid", str(row.pid), "--output", str(out), "--rate", "250"]
    cmd += ["--duration", str(max(1, round(duration) - 1)), "--nonblocking"]
    if processes > 1:
        cmd.append("--subprocesses")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.wait(timeout=60)
        print(f"profile of {row.name}: {out}", file=sys.stderr)


def ratios(results: Mapping[tuple[str, int], Result]) -> dict[str, float]:
    """Issue 14's figures, from one round's results: the req/s ratios (the issue's),
    and the same ratios of the servers' CPU per request (nginx's over the gateway's),
    which is what the req/s ratio is when the servers' core is theirs alone."""

    def rps(name: str) -> float:
        return results[name, 16].rps

    def cpu(name: str, conc: int = 16) -> float:
        return results[name, conc].cpu_us or float("nan")

    def p50(name: str) -> float:
        return results[name, 1].p50_ms

    old = {
        f"cpu: new / old, {path}": cpu(f"gateway {path}") / cpu(f"old {path}")
        for path in ("miss", "memory", "redis")
        if ("old " + path, 16) in results
    }
    scaling = {
        f"N processes / 1, {path}": rps(f"gateway {path}") / rps(f"1p {path}")
        for path in ("miss", "memory", "redis")
        if ("1p " + path, 16) in results
    }
    return (
        old
        | scaling
        | {
            "miss / nginx proxy": rps("gateway miss") / rps("nginx proxy"),
            "memory hit / nginx cache": rps("gateway memory") / rps("nginx cache"),
            "redis hit / nginx cache": rps("gateway redis") / rps("nginx cache"),
            "added p50 c=1 (ms)": p50("gateway miss") - p50("direct"),
            "nginx proxy added p50 c=1 (ms)": p50("nginx proxy") - p50("direct"),
            "cpu: miss / nginx proxy": cpu("nginx proxy") / cpu("gateway miss"),
            "cpu: memory hit / nginx cache": cpu("nginx cache") / cpu("gateway memory"),
            "cpu: redis hit / nginx cache": cpu("nginx cache") / cpu("gateway redis"),
            "cpu: added at c=1 (ms)": (cpu("gateway miss", 1) - cpu("direct", 1)) / 1000,
            "cpu: bare uvicorn / nginx cache": cpu("nginx cache") / cpu("bare uvicorn"),
        }
    )


def report(rows: Sequence[Row], runs: Sequence[Mapping[tuple[str, int], Result]]) -> None:
    print(
        f"{'row':<15} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'cpu us/req':>10}"
        "   (medians; cpu: every server's CPU per request, the upstream included)"
    )
    for row in rows:
        for conc in (1, 16):
            got = [run[row.name, conc] for run in runs]
            print(
                f"{row.name:<15} {conc:>4} {statistics.median(r.rps for r in got):>9.0f} "
                f"{statistics.median(r.p50_ms for r in got):>8.2f} "
                f"{statistics.median(r.p99_ms for r in got):>8.2f} "
                f"{statistics.median(r.cpu_us or 0.0 for r in got):>10.0f}"
            )
    per_round = [ratios(run) for run in runs]
    print(f"\n{'figure (ratios within each round)':<32} {'rounds':<24} {'median':>7}  goal")
    for name in per_round[0]:
        values = [r[name] for r in per_round]
        median = statistics.median(values)
        shown = " ".join(f"{v:.2f}" for v in values)
        figure = name.removeprefix("cpu: ")
        if figure in GOALS:
            goal = f">= {GOALS[figure]:.2f} {'met' if median >= GOALS[figure] else 'NOT MET'}"
        elif figure.startswith("N processes"):
            goal = "(req/s, N vs 1 in this run)"
        elif figure.startswith("new / old"):
            goal = "(this tree / --baseline)"
        elif figure.startswith("added"):
            met = "met" if median <= ADDED_P50_GOAL_MS else "NOT MET"
            goal = f"<= +{ADDED_P50_GOAL_MS:.2f} {met}"
        else:
            goal = "(yardstick)"
        print(f"{name:<32} {shown:<24} {median:>7.2f}  {goal}")
