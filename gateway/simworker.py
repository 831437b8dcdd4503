"""A SIMULATED GPU worker speaking the Friendli Container image API.

It runs no model: it draws a deterministic picture with Pillow from (prompt, seed,
steps, guidance, adapter), so the same inputs give the same bytes, and it behaves
like a GPU where the gateway can see it: each generation takes `steps * step_ms`,
at most `concurrency` run at once (the rest queue here), a LoRA adapter that is not
loaded costs `adapter_load_ms` to load into a bounded LRU, and `fail_rate` of the
requests fail with a 500. It is the test double for tests, the demo and benchmarks.

It imports nothing from the gateway but the schema, the contract both sides share.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw, ImageFont
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.schema import ImageGenerationBody, error_list


@dataclass(frozen=True)
class SimConfig:
    step_ms: float = 20.0
    concurrency: int = 2
    adapters: tuple[str, ...] | None = None  # served LoRA names; None = any name
    adapter_load_ms: float = 500.0
    max_loaded_adapters: int = 4
    fail_rate: float = 0.0
    size: int = 512
    rng_seed: int | None = None  # seeds the failure draws, for repeatable runs


@dataclass
class SimStats:
    generations: int = 0
    adapter_loads: int = 0
    failures: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    requests_by_adapter: dict[str, int] = field(default_factory=dict)


class SimWorker:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.stats = SimStats()
        self._gpu = asyncio.Semaphore(config.concurrency)
        self._loaded: OrderedDict[str, None] = OrderedDict()
        for name in (config.adapters or ())[: config.max_loaded_adapters]:
            self._loaded[name] = None
        self._rng = random.Random(config.rng_seed)
        self._renders: OrderedDict[str, bytes] = OrderedDict()  # identical inputs, once

    async def generate(self, request: Request) -> Response:
        try:
            body = ImageGenerationBody.model_validate_json(await request.body())
        except ValidationError as exc:
            return JSONResponse({"detail": error_list(exc)}, 422)
        adapter = body.model
        served = self.config.adapters
        if adapter is not None and served is not None and adapter not in served:
            return JSONResponse({"detail": f"adapter {adapter!r} is not served here"}, 400)
        if self._rng.random() < self.config.fail_rate:
            self.stats.failures += 1
            return JSONResponse({"detail": "simulated worker failure"}, 500)
        async with self._gpu:
            return Response(await self._run(body), media_type="application/json")

    async def _run(self, body: ImageGenerationBody) -> bytes:
        stats = self.stats
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            if body.model is not None:
                await self._load(body.model)
            await asyncio.sleep(body.num_inference_steps * self.config.step_ms / 1000)
            stats.generations += 1
            key = body.model or ""
            stats.requests_by_adapter[key] = stats.requests_by_adapter.get(key, 0) + 1
            return await self._render_cached(body)
        finally:
            stats.in_flight -= 1

    async def _load(self, adapter: str) -> None:
        if adapter in self._loaded:
            self._loaded.move_to_end(adapter)
            return
        await asyncio.sleep(self.config.adapter_load_ms / 1000)
        self.stats.adapter_loads += 1
        self._loaded[adapter] = None
        while len(self._loaded) > self.config.max_loaded_adapters:
            self._loaded.popitem(last=False)

    async def _render_cached(self, body: ImageGenerationBody) -> bytes:
        key = _digest(body)
        if key in self._renders:
            self._renders.move_to_end(key)
            return self._renders[key]
        # Drawing takes milliseconds of CPU: off the loop, so /health stays quick.
        image = await asyncio.to_thread(render, body, self.config.size)
        data = b'{"image":"' + base64.b64encode(image) + b'"}'
        self._renders[key] = data
        if len(self._renders) > 64:
            self._renders.popitem(last=False)
        return data

    def loaded_adapters(self) -> list[str]:
        return list(self._loaded)


def _digest(body: ImageGenerationBody) -> str:
    fields = body.model_dump(mode="json")
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def render(body: ImageGenerationBody, size: int) -> bytes:
    """A picture that is a pure function of the inputs: JPEG, or PNG for `raw`."""
    rng = random.Random(_digest(body))
    image = Image.new("RGB", (size, size), _color(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(3 + body.num_inference_steps // 5):
        x0, y0 = rng.randrange(size), rng.randrange(size)
        box = (x0, y0, x0 + rng.randrange(size // 2), y0 + rng.randrange(size // 2))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=_color(rng))
    # Fewer steps leave more noise, as a diffusion model would; guidance sets contrast.
    noise = Image.frombytes("L", (size, size), rng.randbytes(size * size)).convert("RGB")
    image = Image.blend(image, noise, min(0.5, 1.5 / body.num_inference_steps))
    caption = textwrap.fill(body.prompt[:200], width=40)
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(image)
    draw.multiline_text((8, 8), caption, fill=(255, 255, 255), font=font)
    footer = f"SIMULATED  adapter={body.model or 'base'} seed={body.seed} cfg={body.guidance_scale}"
    draw.text((8, size - 16), footer, fill=(255, 255, 255), font=font)
    out = io.BytesIO()
    if body.response_format == "raw":
        image.save(out, format="PNG")
    else:
        image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def _color(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def create_sim_app(config: SimConfig) -> Starlette:
    """`app.state.instance`: this app's id, in every `/health` answer, so that a waiter
    knows it reached this worker and not another server on the same port."""
    worker = SimWorker(config)
    instance = secrets.token_hex(8)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "instance": instance})

    async def stats(request: Request) -> Response:
        data: dict[str, Any] = {**vars(worker.stats), "loaded": worker.loaded_adapters()}
        return JSONResponse(data)

    app = Starlette(
        routes=[
            Route("/v1/images/generations", worker.generate, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/stats", stats, methods=["GET"]),
        ]
    )
    app.state.worker = worker
    app.state.instance = instance
    return app


def wait_healthy(
    url: str,
    *,
    timeout_s: float = 20.0,
    proc: subprocess.Popen[bytes] | None = None,
    path: str = "/health",
    instance: str | None = None,
) -> None:
    """Block until `url` + `path` answers 200 (and, given `instance`, says that id: the
    server we started, not another one on that port); fail fast if the process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with code {proc.returncode}")
        try:
            resp = httpx.get(url + path, timeout=1.0)
            if resp.status_code == 200 and (instance is None or _instance(resp) == instance):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url}: not healthy (or not instance {instance}) after {timeout_s}s")


def _instance(resp: httpx.Response) -> object:
    try:
        return resp.json().get("instance")
    except ValueError:
        return None


def announce(url_file: str | None, url: str, instance: str) -> None:
    """Once listening: write `{"url", "instance"}` to `url_file` (if given), whole or
    not at all (a rename), for the parent that started us on port 0."""
    if url_file is None:
        return
    partial = f"{url_file}.partial"
    Path(partial).write_text(json.dumps({"url": url, "instance": instance}))
    os.replace(partial, url_file)


@dataclass
class Started:
    """A `gateway` child told to listen on port 0 and say where in `url_file`."""

    proc: subprocess.Popen[bytes]
    url_file: Path

    def wait_ready(self, *, path: str = "/health", timeout_s: float = 20.0) -> str:
        """Its URL, once the child has bound its port and answers `path` as itself."""
        deadline = time.monotonic() + timeout_s
        try:
            while not self.url_file.exists():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"child exited with code {self.proc.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"child did not say where it listens in {timeout_s}s")
                time.sleep(0.01)
            where = json.loads(self.url_file.read_text())
        finally:
            shutil.rmtree(self.url_file.parent, ignore_errors=True)
        left_s = max(1.0, deadline - time.monotonic())
        url: str = where["url"]
        wait_healthy(url, proc=self.proc, path=path, instance=where["instance"], timeout_s=left_s)
        return url


def start_child(args: Sequence[str], **popen: Any) -> Started:
    """`python -m gateway ARGS --port 0 --url-file F`: the kernel picks the port and the
    child reports it, so no port is ever guessed free and then lost to another process."""
    url_file = Path(tempfile.mkdtemp(prefix="gateway-child-")) / "listening.json"
    cmd = [sys.executable, "-m", "gateway", *args, "--port", "0", "--url-file", str(url_file)]
    return Started(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, **popen), url_file)


def start_sim(*options: str, host: str = "127.0.0.1") -> Started:
    """A sim worker in a child process; `.wait_ready()` gives its URL."""
    return start_child(["sim-worker", "--host", host, *options])


def stop(proc: subprocess.Popen[bytes], *, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`: a child never outlives its parent's run."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
