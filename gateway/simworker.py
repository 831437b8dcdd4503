"""A SIMULATED GPU worker speaking the API of an image server: Friendli Container's
(the default), or another server's (`--protocol`), with that server's real request and
response shapes: it validates what it is sent as that server would and answers as it does.

It runs no model: it draws a deterministic picture with Pillow from (prompt, seed,
steps, guidance, adapter, size), so the same inputs give the same bytes, and it behaves
like a GPU where the gateway can see it: each generation takes `steps * step_ms`,
at most `concurrency` run at once (the rest queue here), a LoRA adapter that is not
loaded costs `adapter_load_ms` to load into a bounded LRU, and `fail_rate` of the
requests fail with a 500. It is the test double for tests, the demo and benchmarks.

    friendli-container  POST /v1/images/generations, the gateway's own schema
    openai-images       POST /v1/images/generations as vLLM-Omni / SGLang take it
                        (vendor fields num_inference_steps, guidance_scale, seed,
                        output_format); `model` picks the adapter; GET /v1/models
    a1111               POST /sdapi/v1/txt2img as AUTOMATIC1111 takes it; LoRAs from
                        <lora:NAME:WEIGHT> in the prompt; PNG with its parameters in a
                        text chunk, as A1111 writes them; GET /sdapi/v1/progress
Every one also answers `GET /health` and `GET /stats` (the simulator's own counters).

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
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.schema import MAX_SEED, ImageGenerationBody, error_list

SIM_PROTOCOLS = ("friendli-container", "openai-images", "a1111")


@dataclass(frozen=True)
class SimConfig:
    step_ms: float = 20.0
    concurrency: int = 2
    adapters: tuple[str, ...] | None = None  # served LoRA names; None = any name
    adapter_load_ms: float = 500.0
    max_loaded_adapters: int = 4
    fail_rate: float = 0.0
    size: int = 512  # the side of a square image, when the request gives no size
    rng_seed: int | None = None  # seeds the failure draws, for repeatable runs
    protocol: str = "friendli-container"


@dataclass(frozen=True)
class Drawing:
    """Everything that decides a simulated picture."""

    prompt: str
    steps: int
    guidance: float
    adapter: str | None
    seed: int
    width: int
    height: int
    image_format: Literal["JPEG", "PNG", "WEBP"] = "JPEG"
    text: tuple[tuple[str, str], ...] = ()  # PNG text chunks (A1111's "parameters")


@dataclass
class SimStats:
    generations: int = 0
    adapter_loads: int = 0
    failures: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    requests_by_adapter: dict[str, int] = field(default_factory=dict)
    probes: int = 0  # status-route reads (A1111's progress), for probe tests
    queue_deletes: int = 0  # ComfyUI: waiting prompts taken out with POST /queue
    interrupts: int = 0  # ComfyUI: running prompts stopped with POST /interrupt
    waiting: int = 0  # requests in here waiting for a GPU slot
    max_waiting: int = 0

    def report(self) -> dict[str, int]:
        """What GET /stats leads with: proof that no worker was overcommitted."""
        return {
            "peak_concurrency": self.max_in_flight,  # most generations running at once
            "served": self.generations,
            "queued_peak": self.max_waiting,  # most requests waiting inside at once
        }


class SimWorker:
    """The simulated GPU: queueing, adapter loads, timing and the pictures. The
    protocol handlers below turn a server's request into a `Drawing` and back."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.stats = SimStats()
        self._gpu = asyncio.Semaphore(config.concurrency)
        self._loaded: OrderedDict[str, None] = OrderedDict()
        for name in (config.adapters or ())[: config.max_loaded_adapters]:
            self._loaded[name] = None
        self._rng = random.Random(config.rng_seed)
        self._renders: OrderedDict[Drawing, bytes] = OrderedDict()  # identical inputs, once

    def serves(self, adapter: str | None) -> bool:
        served = self.config.adapters
        return adapter is None or served is None or adapter in served

    def fails(self) -> bool:
        """Whether this request is one of the `fail_rate` that fail."""
        if self._rng.random() < self.config.fail_rate:
            self.stats.failures += 1
            return True
        return False

    @property
    def gpu(self) -> asyncio.Semaphore:
        """The GPU's slots: `draw` takes one; a face that must know when a job starts
        (ComfyUI's queue) or refuse when none is free (Cog's 409) takes it itself and
        calls `draw_held`."""
        return self._gpu

    async def draw(self, drawing: Drawing) -> bytes:
        """The picture's bytes, after the time a GPU would take."""
        stats, waits = self.stats, self._gpu.locked()  # every slot busy: it queues here
        stats.waiting += waits
        stats.max_waiting = max(stats.max_waiting, stats.waiting)
        try:
            await self._gpu.acquire()
        finally:
            stats.waiting -= waits
        try:
            return await self.draw_held(drawing)
        finally:
            self._gpu.release()

    async def draw_held(self, drawing: Drawing) -> bytes:
        """`draw`, for a caller that already holds a slot of `gpu`."""
        stats = self.stats
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            if drawing.adapter is not None:
                await self._load(drawing.adapter)
            await asyncio.sleep(drawing.steps * self.config.step_ms / 1000)
            stats.generations += 1
            key = drawing.adapter or ""
            stats.requests_by_adapter[key] = stats.requests_by_adapter.get(key, 0) + 1
            return await self._render_cached(drawing)
        finally:
            stats.in_flight -= 1

    @property
    def busy(self) -> bool:
        return self.stats.in_flight > 0

    async def _load(self, adapter: str) -> None:
        if adapter in self._loaded:
            self._loaded.move_to_end(adapter)
            return
        await asyncio.sleep(self.config.adapter_load_ms / 1000)
        self.stats.adapter_loads += 1
        self._loaded[adapter] = None
        while len(self._loaded) > self.config.max_loaded_adapters:
            self._loaded.popitem(last=False)

    async def _render_cached(self, drawing: Drawing) -> bytes:
        if drawing in self._renders:
            self._renders.move_to_end(drawing)
            return self._renders[drawing]
        # Drawing takes milliseconds of CPU: off the loop, so /health stays quick.
        image = await asyncio.to_thread(draw_picture, drawing)
        self._renders[drawing] = image
        if len(self._renders) > 64:
            self._renders.popitem(last=False)
        return image

    def loaded_adapters(self) -> list[str]:
        return list(self._loaded)


def _digest(drawing: Drawing) -> str:
    fields = asdict(drawing)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def render(body: ImageGenerationBody, size: int) -> bytes:
    """A Friendli Container request's picture: JPEG, or PNG for `raw`."""
    return draw_picture(drawing_for(body, size))


def draw_picture(drawing: Drawing) -> bytes:
    """A picture that is a pure function of `drawing`."""
    rng = random.Random(_digest(drawing))
    width, height = drawing.width, drawing.height
    image = Image.new("RGB", (width, height), _color(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(3 + drawing.steps // 5):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = (x0, y0, x0 + rng.randrange(width // 2 + 1), y0 + rng.randrange(height // 2 + 1))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=_color(rng))
    # Fewer steps leave more noise, as a diffusion model would; guidance sets contrast.
    noise = Image.frombytes("L", (width, height), rng.randbytes(width * height)).convert("RGB")
    image = Image.blend(image, noise, min(0.5, 1.5 / drawing.steps))
    caption = textwrap.fill(drawing.prompt[:200], width=40)
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(image)
    draw.multiline_text((8, 8), caption, fill=(255, 255, 255), font=font)
    footer = (
        f"SIMULATED  adapter={drawing.adapter or 'base'} seed={drawing.seed} cfg={drawing.guidance}"
    )
    draw.text((8, height - 16), footer, fill=(255, 255, 255), font=font)
    out = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    for key, value in drawing.text:
        info.add_text(key, value)
    # compress_level 1: a noisy 1024px PNG at Pillow's default 6 takes most of a second.
    image.save(out, format=drawing.image_format, quality=90, compress_level=1, pnginfo=info)
    return out.getvalue()


def _color(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _b64(image: bytes) -> str:
    return base64.b64encode(image).decode("ascii")


# -- Friendli Container ------------------------------------------------------------------


def drawing_for(body: ImageGenerationBody, size: int) -> Drawing:
    return Drawing(
        prompt=body.prompt,
        steps=body.num_inference_steps,
        guidance=body.guidance_scale,
        adapter=body.model,
        seed=body.seed if body.seed is not None else 0,
        width=size,
        height=size,
        image_format="PNG" if body.response_format == "raw" else "JPEG",
    )


def friendli_routes(worker: SimWorker) -> list[Route]:
    async def generate(request: Request) -> Response:
        try:
            body = ImageGenerationBody.model_validate_json(await request.body())
        except ValidationError as exc:
            return JSONResponse({"detail": error_list(exc)}, 422)
        if not worker.serves(body.model):
            return JSONResponse({"detail": f"adapter {body.model!r} is not served here"}, 400)
        if worker.fails():
            return JSONResponse({"detail": "simulated worker failure"}, 500)
        image = await worker.draw(drawing_for(body, worker.config.size))
        return Response(
            b'{"image":"' + base64.b64encode(image) + b'"}', media_type="application/json"
        )

    return [Route("/v1/images/generations", generate, methods=["POST"])]


# -- OpenAI Images, as vLLM-Omni and SGLang diffusion take it -----------------------------


class OpenAIImageRequest(BaseModel):
    """What vLLM-Omni's ImageGenerationRequest and SGLang's ImageGenerationsRequest both
    take (docs/protocols.md cites them). Unknown fields are refused here, stricter than
    either server, so a misspelt vendor field shows in a test rather than being ignored."""

    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, Field(min_length=1)]
    model: str | None = None
    n: Annotated[int, Field(ge=1, le=10)] = 1
    size: Annotated[str, Field(pattern=r"^[0-9]+x[0-9]+$")] | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = None
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    negative_prompt: str | None = None
    num_inference_steps: Annotated[int, Field(ge=1, le=200)] | None = None
    guidance_scale: Annotated[float, Field(ge=0.0, le=20.0)] | None = None  # vLLM-Omni's bounds
    true_cfg_scale: Annotated[float, Field(ge=0.0, le=20.0)] | None = None
    seed: int | None = None  # None: a random seed (vLLM-Omni)
    output_format: Literal["png", "jpeg", "webp"] | None = None  # SGLang; None: PNG
    output_compression: Annotated[int, Field(ge=0, le=100)] | None = None


_OPENAI_FORMATS: dict[str | None, Literal["JPEG", "PNG", "WEBP"]] = {
    None: "PNG",
    "png": "PNG",
    "jpeg": "JPEG",
    "webp": "WEBP",
}


def _openai_error(status: int, message: str, kind: str) -> Response:
    # vLLM's ErrorResponse: {"error": {"message", "type", "param", "code"}}
    error = {"message": message, "type": kind, "param": None, "code": status}
    return JSONResponse({"error": error}, status)


def openai_routes(worker: SimWorker) -> list[Route]:
    config = worker.config

    async def generate(request: Request) -> Response:
        try:
            req = OpenAIImageRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            return JSONResponse({"detail": error_list(exc)}, 422)
        if req.response_format == "url":
            return JSONResponse({"detail": "response_format=url is not supported"}, 400)
        if not worker.serves(req.model):
            return _openai_error(404, f"The model `{req.model}` does not exist.", "NotFoundError")
        if worker.fails():
            return _openai_error(500, "simulated worker failure", "InternalServerError")
        width, height = map(int, req.size.split("x")) if req.size else (config.size, config.size)
        if not (8 <= width <= 4096 and 8 <= height <= 4096):
            return JSONResponse({"detail": f"Invalid size: {req.size!r}"}, 400)
        seed = req.seed if req.seed is not None else random.randrange(MAX_SEED + 1)
        first = Drawing(
            prompt=req.prompt,
            steps=req.num_inference_steps or 20,
            guidance=req.guidance_scale if req.guidance_scale is not None else 4.0,
            adapter=req.model,
            seed=seed,
            width=width,
            height=height,
            image_format=_OPENAI_FORMATS[req.output_format],
        )
        images = [await worker.draw(replace(first, seed=seed + i)) for i in range(req.n)]
        data = [{"b64_json": _b64(image), "url": None, "revised_prompt": None} for image in images]
        return JSONResponse({"created": int(time.time()), "data": data})

    async def models(request: Request) -> Response:
        names = list(config.adapters or ("sim-base",))
        cards = [{"id": name, "object": "model", "owned_by": "sim"} for name in names]
        return JSONResponse({"object": "list", "data": cards})

    return [
        Route("/v1/images/generations", generate, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
    ]


# -- AUTOMATIC1111 (also Forge, SD.Next) --------------------------------------------------


class A1111Txt2Img(BaseModel):
    """The txt2img fields of A1111's StableDiffusionTxt2ImgProcessingAPI that clients
    use, with its defaults (modules/api/models.py builds the model from the processing
    class; pydantic ignores fields it does not know, and so does this)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: Annotated[int, Field(ge=1, le=8)] = 1
    n_iter: Annotated[int, Field(ge=1, le=8)] = 1
    steps: Annotated[int, Field(ge=1, le=150)] = 50
    cfg_scale: float = 7.0
    width: Annotated[int, Field(ge=64, le=4096)] = 512
    height: Annotated[int, Field(ge=64, le=4096)] = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    enable_hr: bool = False
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)


A1111_SAMPLERS = ("Euler", "Euler a", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DDIM", "UniPC")
A1111_VERSION = "v1.10.1"
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # A1111's modules/extra_networks.py


def _a1111_error(status: int, error: str, detail: str, errors: str) -> Response:
    # modules/api/api.py, api_middleware's handle_exception
    return JSONResponse({"error": error, "detail": detail, "body": "", "errors": errors}, status)


def _loras(prompt: str) -> tuple[str, list[tuple[str, str]]]:
    """The prompt without its extra-network tags, and its LoRAs (name, weight)."""
    found: list[tuple[str, str]] = []

    def take(match: re.Match[str]) -> str:
        kind, args = match.group(1), match.group(2).split(":")
        if kind == "lora":
            found.append((args[0], args[1] if len(args) > 1 else "1"))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), found


def a1111_routes(worker: SimWorker) -> list[Route]:
    async def txt2img(request: Request) -> Response:
        try:
            req = A1111Txt2Img.model_validate_json(await request.body())
        except ValidationError as exc:
            return JSONResponse({"detail": error_list(exc)}, 422)  # FastAPI's own handler
        sampler = req.sampler_name or req.sampler_index
        if sampler not in A1111_SAMPLERS:
            return _a1111_error(400, "HTTPException", "Sampler not found", "400: Sampler not found")
        if worker.fails():
            memory = "CUDA out of memory. Tried to allocate 20.00 MiB (simulated)"
            return _a1111_error(500, "OutOfMemoryError", "", memory)
        prompt, loras = _loras(req.prompt)
        # A LoRA the server does not have is skipped ("couldn't find Lora with name").
        served = [(name, weight) for name, weight in loras if worker.serves(name)]
        adapter = ",".join(f"{name}:{weight}" for name, weight in served) or None
        seed = req.seed if req.seed != -1 else random.randrange(4294967294)
        images, infotexts = [], []
        for i in range(req.batch_size * req.n_iter):
            infotext = (
                f"{req.prompt}\nSteps: {req.steps}, Sampler: {sampler}, CFG scale: "
                f"{req.cfg_scale}, Seed: {seed + i}, Size: {req.width}x{req.height}, "
                f"Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Version: {A1111_VERSION}"
            )
            drawing = Drawing(
                prompt=prompt.strip(),
                steps=req.steps,
                guidance=req.cfg_scale,
                adapter=adapter,
                seed=seed + i,
                width=req.width,
                height=req.height,
                image_format="PNG",
                text=(("parameters", infotext),),
            )
            images.append(_b64(await worker.draw(drawing)) if req.send_images else None)
            infotexts.append(infotext)
        info = {
            "prompt": req.prompt,
            "all_prompts": [req.prompt] * len(infotexts),
            "seed": seed,
            "all_seeds": [seed + i for i in range(len(infotexts))],
            "width": req.width,
            "height": req.height,
            "sampler_name": sampler,
            "cfg_scale": req.cfg_scale,
            "steps": req.steps,
            "infotexts": infotexts,
            "version": A1111_VERSION,
        }
        return JSONResponse(
            {
                "images": [image for image in images if image is not None],
                "parameters": req.model_dump(),
                "info": json.dumps(info),
            }
        )

    async def progress(request: Request) -> Response:
        worker.stats.probes += 1
        state = {
            "skipped": False,
            "interrupted": False,
            "stopping_generation": False,
            "job": "scripts_txt2img" if worker.busy else "",
            "job_count": worker.stats.in_flight,
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": 0,
            "sampling_steps": 0,
        }
        return JSONResponse(
            {
                "progress": 0.0,
                "eta_relative": 0.0,
                "state": state,
                "current_image": None,
                "textinfo": None,
                "current_task": None,
            }
        )

    return [
        Route("/sdapi/v1/txt2img", txt2img, methods=["POST"]),
        Route("/sdapi/v1/progress", progress, methods=["GET"]),
    ]


ROUTES: dict[str, Callable[[SimWorker], list[Route]]] = {
    "friendli-container": friendli_routes,
    "openai-images": openai_routes,
    "a1111": a1111_routes,
}


def create_sim_app(
    config: SimConfig, *, face: Callable[[SimWorker], list[Route]] | None = None
) -> Starlette:
    """The sim worker speaking `config.protocol`; `face`: another server's routes
    (gateway.simservers: ComfyUI's, Cog's), which then answer instead."""
    if face is None and config.protocol not in ROUTES:
        raise ValueError(f"no simulator for protocol {config.protocol!r}: {', '.join(ROUTES)}")
    worker = SimWorker(config)
    instance = secrets.token_hex(8)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "instance": instance})

    async def stats(request: Request) -> Response:
        data: dict[str, Any] = {
            **worker.stats.report(),
            **vars(worker.stats),
            "loaded": worker.loaded_adapters(),
        }
        return JSONResponse(data)

    app = Starlette(
        routes=[
            *(face or ROUTES[config.protocol])(worker),
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
