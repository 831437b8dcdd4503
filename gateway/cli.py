"""`gateway serve|check|demo|sim-worker|generate|hash-key`."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import getpass
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from uvicorn.supervisors import Multiprocess

from gateway.app import create_app
from gateway.auth import hash_key, new_key
from gateway.errors import ConfigError
from gateway.protocols import deterministic, protocol_for
from gateway.protocols.openai_images import served_model
from gateway.registry import CacheSpec, Registry, load_registry, redacted
from gateway.server import SERVED_PROTOCOL, ServerLimits, raise_fd_limit, uvicorn_config
from gateway.settings import Settings
from gateway.simservers import FACES
from gateway.simservers import create_app as create_sim_app
from gateway.simworker import SIM_PROTOCOLS, SimConfig, announce, start_sim, stop

log = logging.getLogger("gateway.server")  # where the server layer logs its limits


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the gateway")
    _config_arg(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="server processes (metrics summed); the GPU workers are adapters.yaml's",
    )
    p.add_argument(
        "--workers",
        type=int,
        dest="processes",
        default=argparse.SUPPRESS,
        action=_DeprecatedAlias,
        instead="--processes: it counts server processes, not GPU workers",
        help=argparse.SUPPRESS,
    )
    p.add_argument(
        "--drain-grace-s",
        type=float,
        default=None,
        help="after SIGTERM: /readyz is 503 but new requests are served this long "
        "(GATEWAY_DRAIN_GRACE_S, else 5)",
    )
    p.add_argument(
        "--drain-timeout-s",
        type=float,
        default=60.0,
        help="then: requests in flight get this long to finish (the hard cap)",
    )
    p.add_argument(
        "--reload-every-s",
        type=float,
        default=None,
        help="registry file polling (GATEWAY_RELOAD_EVERY_S, else 2)",
    )
    p.add_argument("--metrics-dir", default=None, help="multiprocess metrics (--processes > 1)")
    _url_file_arg(p)
    p.set_defaults(run=serve)

    p = sub.add_parser("check", help="validate adapters.yaml and print the routing table")
    _config_arg(p)
    # The spelling before --config, kept working: `gateway check FILE`.
    p.add_argument("legacy_config", nargs="?", metavar="FILE", help=argparse.SUPPRESS)
    p.set_defaults(run=check)

    p = sub.add_parser("demo", help="the gateway plus simulated workers on loopback")
    _config_arg(p)
    p.add_argument("--port", type=int, default=8080, help="gateway port (0: any free port)")
    p.add_argument("--step-ms", type=float, default=20.0, help="simulated time per step")
    p.set_defaults(run=demo)

    p = sub.add_parser(
        "sim-worker",
        help="a SIMULATED GPU worker (no model: draws test images with Pillow)",
        description=(
            "A GPU-worker SIMULATOR speaking an image server's API (--protocol: the "
            "Friendli Container one by default) with that server's request and response "
            "shapes. It runs no model: it draws a deterministic test picture and takes "
            "the time a GPU would. For tests, the demo and benchmarks."
        ),
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="0: any free port")
    _url_file_arg(p)
    p.add_argument(
        "--protocol",
        choices=(*SIM_PROTOCOLS, *FACES),
        default="friendli-container",
        help="the API served",
    )
    p.add_argument("--step-ms", type=float, default=20.0, help="time per inference step")
    p.add_argument("--concurrency", type=int, default=2, help="generations at once")
    p.add_argument(
        "--adapters",
        default=None,
        help="comma-separated LoRA names served (openai-images: served model names)",
    )
    p.add_argument("--adapter-load-ms", type=float, default=500.0)
    p.add_argument("--max-loaded-adapters", type=int, default=4)
    p.add_argument("--fail-rate", type=float, default=0.0, help="share answered with 500")
    p.add_argument("--size", type=int, default=512, help="image width and height")
    p.add_argument("--seed", type=int, default=None, help="seeds the failure draws")
    p.set_defaults(run=sim_worker)

    p = sub.add_parser("generate", help="ask a gateway for one image and write it")
    p.add_argument("prompt")
    p.add_argument("--model", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--format", choices=["jpeg", "raw"], default="jpeg")
    p.add_argument("--out", required=True, help="file to write the image to")
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--timeout", type=float, default=300.0)
    p.set_defaults(run=generate)

    p = sub.add_parser(
        "hash-key",
        help="make a new API key and print it with its sha256 for adapters.yaml",
        description=(
            "Makes a new API key and prints it (once: it is stored nowhere) with the "
            "sha256 that goes into adapters.yaml. With --stdin, hashes a key you already "
            "have instead; a key is never taken as an argument, where shell history and "
            "`ps` would keep it."
        ),
    )
    p.add_argument("--stdin", action="store_true", help="hash a key read from stdin")
    p.add_argument("--name", default="NAME", help="the key's name in the printed snippet")
    p.set_defaults(run=hash_key_command)
    return parser


def _url_file_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url-file",
        default=None,
        help='once listening, write {"url": ..., "instance": ...} here (for --port 0)',
    )


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", default=None, help="the registry (GATEWAY_CONFIG, else adapters.yaml)"
    )


def _settings(args: argparse.Namespace, **flags: object) -> Settings:
    """The environment's settings with this command's flags over them (one precedence
    for all: see gateway.settings)."""
    return Settings.from_env().replace(config=args.config, **flags)


class _DeprecatedAlias(argparse.Action):
    """An old spelling of an option: stores into the new one's `dest`, and says once
    on stderr what to write instead."""

    def __init__(
        self, option_strings: Sequence[str], dest: str, *, instead: str, **kw: Any
    ) -> None:
        super().__init__(option_strings, dest, **kw)
        self.instead = instead
        self.warned = False

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if not self.warned:
            self.warned = True
            print(f"note: {option_string} is deprecated, write {self.instead}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def serve(args: argparse.Namespace) -> int:
    """Each server process builds its app from the environment set here (app_from_env),
    so one process and `--processes N` run the same code."""
    # One id for this run, in every process's /healthz: a waiter knows it reached us.
    instance = secrets.token_hex(8)
    settings = _settings(
        args,
        drain_grace_s=args.drain_grace_s,
        reload_every_s=args.reload_every_s,
        instance=instance,
    )
    # A bad file or variable stops us here, with its line and key, before any process starts.
    registry = settings.over(load_registry(settings.config))
    config = uvicorn_config(
        "gateway.app:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        http=SERVED_PROTOCOL,
        workers=args.processes,
        timeout_graceful_shutdown=args.drain_timeout_s,
    )
    fds = raise_fd_limit()  # inherited by the processes uvicorn starts
    connections = ServerLimits.of(registry.limits).max_connections  # as each process has it
    log.info("at most %d connections per process (open-files limit %d)", connections, fds)
    sock = config.bind_socket()  # bound here, so that port 0 is known before serving
    announce(args.url_file, f"http://{args.host}:{sock.getsockname()[1]}", instance)
    if args.processes == 1:
        os.environ.update(settings.to_env())
        uvicorn.Server(config).run(sockets=[sock])
        return 0
    with _multiprocess_metrics(args.metrics_dir or settings.metrics_dir) as directory:
        os.environ.update(settings.replace(metrics_dir=directory).to_env())
        Multiprocess(config, sockets=[sock]).run()
    return 0


@contextlib.contextmanager
def _multiprocess_metrics(path: str | None) -> Iterator[str]:
    """prometheus-client's multiprocess files, in a directory emptied at start (stale
    files from an earlier run would be summed in); a temporary one when none is given."""
    directory = Path(path or tempfile.mkdtemp(prefix="gateway-metrics-"))
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    try:
        yield str(directory)
    finally:
        if path is None:
            shutil.rmtree(directory, ignore_errors=True)


def check(args: argparse.Namespace) -> int:
    if args.legacy_config is not None:
        if args.config is not None:
            print("error: give the registry once, with --config", file=sys.stderr)
            return 2
        print(
            f"note: `gateway check FILE` is deprecated, write `gateway check --config "
            f"{args.legacy_config}`",
            file=sys.stderr,
        )
    settings = _settings(args).replace(config=args.legacy_config)
    registry = settings.over(load_registry(settings.config))
    print(routing_table(registry))
    return 0


def hash_key_command(args: argparse.Namespace) -> int:
    if args.stdin:
        key = getpass.getpass("key: ") if sys.stdin.isatty() else sys.stdin.read()
        key = key.strip(" \t\r\n")
        if not key:
            print("error: no key on stdin", file=sys.stderr)
            return 1
        print(hash_key(key))
        return 0
    key = new_key()
    print(f"key:    {key}\n        (give it to the client now: it is stored nowhere)")
    print(f"sha256: {hash_key(key)}\n\nin adapters.yaml:\nauth:\n  keys:")
    print(f"    - {{name: {args.name}, sha256: {hash_key(key)}}}")
    return 0


def routing_table(registry: Registry) -> str:
    """Each adapter: its names, its pool and that pool's protocol, and how the adapter
    is chosen on the workers (the protocol's words: `model=...`, a LoRA tag...)."""
    lines = [f"registry {registry.digest}: {len(registry.adapters)} adapters"]
    for adapter in registry.adapters:
        pool = registry.pool_of(adapter)
        names = [adapter.name, *adapter.aliases]
        mark = " (default)" if adapter.default else ""
        chosen = protocol_for(pool.protocol).selection(adapter, pool)
        if not deterministic(adapter, pool):
            chosen += "; not deterministic: " + (
                "cached anyway" if adapter.cache_nondeterministic else "not cached"
            )
        lines.append(
            f"{' | '.join(names)}{mark} -> pool {adapter.pool} ({pool.protocol}), {chosen}"
        )
        for worker in pool.workers:
            lines.append(f"    {worker.url}  max_concurrency={worker.max_concurrency}")
        if (d := pool.discover) is not None:
            where = f"{d.scheme}://{d.dns}:{d.port}"
            lines.append(f"    every A/AAAA record of {where}, every {d.every_s:g}s")
    lines.append(cache_line(registry.cache))
    return "\n".join(lines)


def cache_line(spec: CacheSpec) -> str:
    """Where results are cached, without the URL's password."""
    if not spec.enabled:
        return "cache: off"
    if spec.url is None:
        store = f"in-process memory, at most {spec.memory_max_bytes / 2**20:g} MiB"
    else:
        store = f"{'Redis Cluster' if spec.cluster else 'Redis'} {redacted(spec.url)}"
    return f"cache: {store}; namespace {spec.namespace}, ttl {spec.ttl_s:g} s"


def sim_worker(args: argparse.Namespace) -> int:
    config = SimConfig(
        step_ms=args.step_ms,
        concurrency=args.concurrency,
        adapters=tuple(args.adapters.split(",")) if args.adapters else None,
        adapter_load_ms=args.adapter_load_ms,
        max_loaded_adapters=args.max_loaded_adapters,
        fail_rate=args.fail_rate,
        size=args.size,
        rng_seed=args.seed,
        protocol=args.protocol,
    )
    app = create_sim_app(config)
    sock = _listen(args.host, args.port)
    announce(args.url_file, f"http://{args.host}:{sock.getsockname()[1]}", app.state.instance)
    server = uvicorn.Server(uvicorn_config(app, log_level="warning"))
    server.run(sockets=[sock])
    return 0


def generate(args: argparse.Namespace) -> int:
    body = {
        "prompt": args.prompt,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "model": args.model,
        "response_format": args.format,
        "seed": args.seed,
    }
    started = time.perf_counter()
    try:
        resp = httpx.post(args.url + "/v1/images/generations", json=body, timeout=args.timeout)
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    elapsed_ms = (time.perf_counter() - started) * 1000
    if resp.status_code != 200:
        print(f"error: HTTP {resp.status_code}: {resp.text}", file=sys.stderr)
        return 1
    Path(args.out).write_bytes(base64.b64decode(resp.json()["image"]))
    h = resp.headers
    print(
        f"wrote {args.out}  seed={h.get('x-seed')} cache={h.get('x-cache')} "
        f"adapter={h.get('x-adapter')} time={elapsed_ms:.0f}ms"
    )
    return 0


def demo(args: argparse.Namespace) -> int:
    """One sim worker per configured worker, each on a free loopback port, and the
    gateway in this process serving the same registry pointed at them."""
    settings = _settings(args)
    registry = settings.over(load_registry(settings.config))
    sock = _listen("127.0.0.1", args.port)
    procs, registry = _start_sim_workers(registry, step_ms=args.step_ms)
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        print(routing_table(registry))
        print(f"\ngateway listening on {url}\n\n{_curl_example(url, registry)}\n", flush=True)
        config = uvicorn_config(
            create_app(registry),
            log_level="warning",
            limits=registry.limits,
        )
        server = uvicorn.Server(config)
        # uvicorn re-raises SIGTERM after its own shutdown; exit through `finally` then,
        # so the sim workers are stopped rather than orphaned.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        for proc in procs:
            stop(proc)
        sock.close()
    return 0


def _start_sim_workers(
    registry: Registry, *, step_ms: float
) -> tuple[list[subprocess.Popen[bytes]], Registry]:
    data = registry.model_dump(mode="json")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, pool in data["pools"].items():
            spec = registry.pools[name]
            served = served_names(registry, name)
            for worker in pool["workers"]:
                slots = str(worker["max_concurrency"])
                options = ["--step-ms", str(step_ms), "--concurrency", slots]
                options += ["--protocol", spec.protocol]
                if served:
                    options += ["--adapters", ",".join(served)]
                started = start_sim(*options)
                procs.append(started.proc)
                worker["url"] = started.wait_ready()
    except BaseException:
        for proc in procs:
            stop(proc)
        raise
    return procs, Registry.model_validate(data)


def _curl_example(url: str, registry: Registry) -> str:
    """One curl per pool (so every protocol the demo runs is one paste away), then
    `gateway generate` for the first."""
    decode = (
        "python3 -c 'import sys,json,base64; "
        'sys.stdout.buffer.write(base64.b64decode(json.load(sys.stdin)["image"]))\''
    )
    lines = ["try it, one request per pool:"]
    models = []
    for pool_name, pool in registry.pools.items():
        adapters = [a for a in registry.adapters if a.pool == pool_name]
        if not adapters:
            continue
        # A LoRA adapter shows routing best; the pool's first adapter when there is none.
        model = next((a.name for a in adapters if a.upstream_model), adapters[0].name)
        models.append(model)
        body = json.dumps(
            {
                "prompt": "a red fox in the snow",
                "num_inference_steps": 20,
                "guidance_scale": 7.5,
                "model": model,
                "seed": 7,
            }
        )
        lines += [
            f"  # pool {pool_name} ({pool.protocol})",
            f"  curl -s {url}/v1/images/generations -H 'Content-Type: application/json' \\",
            f"    -d '{body}' | {decode} > fox-{pool_name}.jpg",
        ]
    lines += [
        "or:",
        f"  gateway generate 'a red fox in the snow' --model {models[0]} --seed 7 "
        f"--out fox.jpg --url {url}",
        "Ctrl-C stops the gateway and its workers.",
    ]
    return "\n".join(lines)


def served_names(registry: Registry, pool_name: str) -> list[str]:
    """What the demo's sim workers of a pool serve: the names the gateway will send
    (for openai-images, served model names; else the adapters' upstream_model)."""
    pool = registry.pools[pool_name]
    names = set()
    for adapter in registry.adapters:
        if adapter.pool != pool_name:
            continue
        if pool.protocol == "openai-images":
            name = served_model(adapter.upstream_model, pool.openai)
        else:
            name = adapter.upstream_model
        if name is not None:
            names.add(name)
    return sorted(names)


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        msg = f"error: cannot listen on {host}:{port}: {exc.strerror} (try --port 0)"
        raise SystemExit(msg) from exc
    sock.listen(2048)
    return sock
