"""The SIMULATED worker's Cog and ComfyUI faces: those servers' routes and shapes, in
front of the same `SimWorker` (its Pillow drawing, its GPU time, slots and LoRAs).

What each answers is what the real server answers (see docs/protocols.md for the
sources), down to the status codes:

Cog (`--protocol cog`, the input names of Replicate's SDXL image):
    POST /predictions  {"input": {prompt, num_inference_steps, guidance_scale, seed,
                       output_format: webp|jpg|png, lora_weights, lora_scale}}
                       -> 200 {"status": "succeeded", "output": ["data:image/...;base64,"]},
                       200 {"status": "failed", "error"} (a LoRA it does not serve,
                       `fail_rate`), 422 {"detail": [...]}, 409 when every slot is busy
                       (Cog queues nothing)
    GET /health-check  -> 200 {"status": "READY" | "BUSY", "setup": ..., "version": ...}

ComfyUI (`--protocol comfyui`): an API-format workflow, read by class_type (KSampler,
CLIPTextEncode on its `positive` link, LoraLoader, SaveImage); the images it saves are
PNG, as ComfyUI's SaveImage writes them.
    POST /prompt       {"prompt": workflow, "client_id"} -> {"prompt_id", "number",
                       "node_errors": {}}; 400 {"error", "node_errors"} when a value is
                       out of its node's range or a LoRA is not in its list
    GET /history/{id}  {} until done; then {id: {"prompt", "outputs", "status"}}
    GET /view          ?filename&subfolder&type=output -> the PNG
    GET /queue         {"queue_running": [...], "queue_pending": [...]}
    POST /queue        {"delete": [id, ...]} takes waiting prompts out (a running one
                       stays), {"clear": true} all of them -> 200, empty
    POST /interrupt    {"prompt_id": id} stops that prompt if it runs (no id: whichever
                       runs); it ends in history with status "error" -> 200, empty
    GET /system_stats  {"system": {...}, "devices": [...]}
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import random
import time
import uuid
from collections import OrderedDict
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.schema import ImageGenerationBody, ResponseFormat
from gateway.simworker import SimConfig, SimWorker, create_sim_app, drawing_for

# -- Cog ---------------------------------------------------------------------------------

_COG_FORMATS: dict[str, ResponseFormat] = {"jpg": "jpeg", "png": "raw", "webp": "raw"}


class SimCog:
    def __init__(self, worker: SimWorker) -> None:
        self.worker = worker

    async def predict(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"detail": [_item("body", "invalid JSON")]}, 422)
        inputs = body.get("input") if isinstance(body, dict) else None
        if not isinstance(inputs, dict):
            inputs = {}
        job, problems = _cog_job(inputs)
        if problems:
            return JSONResponse({"detail": problems}, 422)
        worker = self.worker
        if worker.gpu.locked():  # every slot in use: Cog answers 409, it queues nothing
            return JSONResponse(
                {"error": "At capacity - all prediction slots busy", "status": "failed"}, 409
            )
        served = worker.config.adapters
        started = time.perf_counter()
        async with worker.gpu:
            if job.model is not None and served is not None and job.model not in served:
                return _failed(f"cannot load weights {job.model!r}", started)
            if worker.fails():
                return _failed("simulated worker failure", started)
            image = await worker.draw_held(drawing_for(job, worker.config.size))
        fmt = inputs.get("output_format", "webp")
        if fmt == "webp":
            image = await asyncio.to_thread(_to_webp, image)
        mime = {"jpg": "jpeg"}.get(fmt, fmt)
        url = f"data:image/{mime};base64," + _b64(image)
        return JSONResponse(
            {
                "id": uuid.uuid4().hex[:26],
                "input": inputs,
                "output": [url],
                "logs": "",
                "status": "succeeded",
                "metrics": {"predict_time": round(time.perf_counter() - started, 3)},
            }
        )

    async def health(self, request: Request) -> Response:
        status = "BUSY" if self.worker.gpu.locked() else "READY"
        return JSONResponse(
            {
                "status": status,
                "setup": {"status": "succeeded", "logs": ""},
                "version": {"coglet": "simulated", "cog": "simulated"},
            }
        )


def _cog_job(inputs: dict[str, Any]) -> tuple[ImageGenerationBody, list[dict[str, Any]]]:
    problems: list[dict[str, Any]] = []
    prompt = inputs.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        problems.append(_item("prompt", "Field required"))
    steps = inputs.get("num_inference_steps", 30)
    if not isinstance(steps, int) or not 1 <= steps <= 500:
        problems.append(_item("num_inference_steps", "must be an integer in 1..500"))
    guidance = inputs.get("guidance_scale", 7.5)
    if not isinstance(guidance, int | float) or not 1 <= guidance <= 50:
        problems.append(_item("guidance_scale", "must be a number in 1..50"))
    seed = inputs.get("seed")
    if seed is not None and not isinstance(seed, int):
        problems.append(_item("seed", "must be an integer"))
    fmt = inputs.get("output_format", "webp")
    if fmt not in _COG_FORMATS:
        problems.append(_item("output_format", "must be one of webp, jpg, png"))
    if problems or not isinstance(prompt, str):
        return _NO_JOB, problems
    # Replicate's models draw a random seed when none is given, as this does.
    job = ImageGenerationBody.model_construct(
        prompt=prompt,
        num_inference_steps=steps,
        guidance_scale=float(guidance),
        model=inputs.get("lora_weights"),
        response_format=_COG_FORMATS[fmt],
        seed=random.randrange(2**32) if seed is None else seed,
    )
    return job, []


_NO_JOB = ImageGenerationBody.model_construct(prompt="", num_inference_steps=1, guidance_scale=1.0)


def _item(field: str, msg: str) -> dict[str, Any]:
    return {"loc": ["body", "input", field], "msg": msg, "type": "value_error"}


def _failed(error: str, started: float) -> Response:
    # run() raised: Cog answers 200, the failure is in the prediction.
    elapsed = round(time.perf_counter() - started, 3)
    body = {"error": error, "logs": "", "status": "failed", "metrics": {"predict_time": elapsed}}
    return JSONResponse(body)


def _to_webp(image: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(image)).save(out, format="WEBP")
    return out.getvalue()


def _b64(image: bytes) -> str:
    return base64.b64encode(image).decode()


# -- ComfyUI -----------------------------------------------------------------------------


class SimComfyUI:
    def __init__(self, worker: SimWorker) -> None:
        self.worker = worker
        self.number = itertools.count()
        self.running: dict[str, list[Any]] = {}
        self.pending: dict[str, list[Any]] = {}
        self.history: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.files: OrderedDict[str, bytes] = OrderedDict()
        self.tasks: set[asyncio.Task[None]] = set()
        self.drawing: dict[str, asyncio.Future[bytes]] = {}  # the running prompts' GPU work
        self.interrupted: set[str] = set()

    async def prompt(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": "invalid JSON", "node_errors": []}, 400)
        workflow = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(workflow, dict):
            return JSONResponse({"error": "no prompt", "node_errors": []}, 400)
        parsed = _read_workflow(workflow, self.worker.config.adapters)
        if isinstance(parsed, Response):
            return parsed
        job, output = parsed
        prompt_id, number = str(uuid.uuid4()), next(self.number)
        item = [number, prompt_id, workflow, {"client_id": body.get("client_id")}, [output]]
        self.pending[prompt_id] = item
        task = asyncio.create_task(self._execute(prompt_id, item, job, output))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return JSONResponse({"prompt_id": prompt_id, "number": number, "node_errors": {}})

    async def _execute(
        self, prompt_id: str, item: list[Any], job: ImageGenerationBody, output: str
    ) -> None:
        async with self.worker.gpu:
            if prompt_id not in self.pending:
                return  # deleted while it waited (POST /queue): it never runs
            self.running[prompt_id] = self.pending.pop(prompt_id)
            try:
                image = None if self.worker.fails() else await self._draw(prompt_id, job)
            except asyncio.CancelledError:
                if prompt_id not in self.interrupted:
                    raise  # the server stopping, not POST /interrupt
                self._interrupted(prompt_id, item, output)
                return
            finally:
                self.running.pop(prompt_id, None)
        if image is None:
            status = {
                "status_str": "error",
                "completed": False,
                "messages": [
                    ["execution_start", {"prompt_id": prompt_id}],
                    [
                        "execution_error",
                        {
                            "prompt_id": prompt_id,
                            "node_id": output,
                            "exception_message": "simulated worker failure",
                            "exception_type": "RuntimeError",
                        },
                    ],
                ],
            }
            self._done(prompt_id, item, {}, status)
            return
        name = f"gateway_{item[0]:05d}_.png"
        self.files[name] = image
        while len(self.files) > 64:
            self.files.popitem(last=False)
        images = {"images": [{"filename": name, "subfolder": "", "type": "output"}]}
        status = {
            "status_str": "success",
            "completed": True,
            "messages": [
                ["execution_start", {"prompt_id": prompt_id}],
                ["execution_success", {"prompt_id": prompt_id}],
            ],
        }
        self._done(prompt_id, item, {output: images}, status)

    async def _draw(self, prompt_id: str, job: ImageGenerationBody) -> bytes:
        drawing = asyncio.ensure_future(
            self.worker.draw_held(drawing_for(job, self.worker.config.size))
        )
        self.drawing[prompt_id] = drawing
        try:
            return await drawing
        finally:
            self.drawing.pop(prompt_id, None)

    def _interrupted(self, prompt_id: str, item: list[Any], output: str) -> None:
        # execution.py's shape for a prompt stopped by /interrupt.
        stopped = {"prompt_id": prompt_id, "node_id": output, "node_type": "KSampler"}
        status = {
            "status_str": "error",
            "completed": False,
            "messages": [
                ["execution_start", {"prompt_id": prompt_id}],
                ["execution_interrupted", {**stopped, "executed": []}],
            ],
        }
        self._done(prompt_id, item, {}, status)

    async def post_queue(self, request: Request) -> Response:
        body = await _json_body(request)
        doomed = list(self.pending) if body.get("clear") else []
        delete = body.get("delete")
        doomed += [str(i) for i in delete] if isinstance(delete, list) else []
        for prompt_id in doomed:
            if self.pending.pop(prompt_id, None) is not None:
                self.worker.stats.queue_deletes += 1
        return Response(status_code=200)

    async def interrupt(self, request: Request) -> Response:
        wanted = (await _json_body(request)).get("prompt_id")
        for prompt_id, drawing in list(self.drawing.items()):
            if wanted in (None, prompt_id):
                self.interrupted.add(prompt_id)
                self.worker.stats.interrupts += 1
                drawing.cancel()
        return Response(status_code=200)

    def _done(
        self, prompt_id: str, item: list[Any], outputs: dict[str, Any], status: dict[str, Any]
    ) -> None:
        self.history[prompt_id] = {"prompt": item, "outputs": outputs, "status": status}
        while len(self.history) > 256:
            self.history.popitem(last=False)

    async def get_history(self, request: Request) -> Response:
        prompt_id = request.path_params["prompt_id"]
        entry = self.history.get(prompt_id)
        return JSONResponse({} if entry is None else {prompt_id: entry})

    async def view(self, request: Request) -> Response:
        query = request.query_params
        name = query.get("filename", "")
        if query.get("type", "output") != "output" or query.get("subfolder", ""):
            return Response(status_code=404)
        image = self.files.get(name)
        if image is None:
            return Response(status_code=404)
        headers = {"Content-Disposition": f'filename="{name}"'}
        return Response(image, media_type="image/png", headers=headers)

    async def queue(self, request: Request) -> Response:
        return JSONResponse(
            {
                "queue_running": list(self.running.values()),
                "queue_pending": list(self.pending.values()),
            }
        )

    async def system_stats(self, request: Request) -> Response:
        return JSONResponse(
            {
                "system": {"os": "posix", "comfyui_version": "simulated"},
                "devices": [{"name": "simulated", "type": "cpu", "index": 0}],
            }
        )


async def _json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; {} for none or another shape (server.py reads
    /interrupt's body the same way)."""
    try:
        data = json.loads(await request.body() or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _read_workflow(
    workflow: dict[str, Any], served: tuple[str, ...] | None
) -> tuple[ImageGenerationBody, str] | Response:
    """The job a txt2img workflow describes and its SaveImage node, or ComfyUI's 400."""
    by_class: dict[str, list[str]] = {}
    for node_id, node in workflow.items():
        if not isinstance(node, dict) or not isinstance(node.get("inputs"), dict):
            return JSONResponse({"error": f"bad node {node_id!r}", "node_errors": []}, 400)
        by_class.setdefault(str(node.get("class_type")), []).append(node_id)
    outputs = by_class.get("SaveImage", [])
    if not outputs or not by_class.get("KSampler"):
        error = {"type": "prompt_no_outputs", "message": "Prompt has no outputs"}
        body = {"error": {**error, "details": "", "extra_info": {}}, "node_errors": []}
        return JSONResponse(body, 400)
    sampler_id = by_class["KSampler"][0]
    sampler = workflow[sampler_id]["inputs"]
    errors: dict[str, dict[str, Any]] = {}

    def bad(node_id: str, name: str, message: str) -> None:
        kind = workflow[node_id].get("class_type")
        reason: dict[str, Any] = {"type": "value_error", "message": message, "details": name}
        reason["extra_info"] = {"input_name": name}
        entry = errors.setdefault(
            node_id, {"errors": [], "dependent_outputs": outputs, "class_type": kind}
        )
        entry["errors"].append(reason)

    steps, cfg, seed = sampler.get("steps"), sampler.get("cfg"), sampler.get("seed")
    if not isinstance(steps, int) or not 1 <= steps <= 10000:
        bad(sampler_id, "steps", f"Value {steps} out of range 1..10000")
    if not isinstance(cfg, int | float) or not 0 <= cfg <= 100:
        bad(sampler_id, "cfg", f"Value {cfg} out of range 0.0..100.0")
    if not isinstance(seed, int) or not 0 <= seed <= 2**64 - 1:
        bad(sampler_id, "seed", f"Value {seed} out of range 0..2**64-1")
    positive = sampler.get("positive")
    text_id = positive[0] if isinstance(positive, list) and positive else None
    text = workflow.get(text_id, {}).get("inputs", {}).get("text") if text_id else None
    lora = None
    for lora_id in by_class.get("LoraLoader", []):
        lora = workflow[lora_id]["inputs"].get("lora_name")
        if served is not None and lora not in served:
            bad(lora_id, "lora_name", "Value not in list")
    if errors:
        failed: dict[str, Any] = {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": "",
            "extra_info": {},
        }
        return JSONResponse({"error": failed, "node_errors": errors}, 400)
    job = ImageGenerationBody.model_construct(
        prompt=str(text or ""),
        num_inference_steps=steps,
        guidance_scale=float(cfg),
        model=lora,
        response_format="raw",  # SaveImage writes PNG
        seed=seed,
    )
    return job, outputs[0]


def routes_for(protocol: str, worker: SimWorker) -> list[Route]:
    if protocol == "cog":
        cog = SimCog(worker)
        return [
            Route("/predictions", cog.predict, methods=["POST"]),
            Route("/health-check", cog.health, methods=["GET"]),
        ]
    comfy = SimComfyUI(worker)
    return [
        Route("/prompt", comfy.prompt, methods=["POST"]),
        Route("/history/{prompt_id}", comfy.get_history, methods=["GET"]),
        Route("/view", comfy.view, methods=["GET"]),
        Route("/queue", comfy.queue, methods=["GET"]),
        Route("/queue", comfy.post_queue, methods=["POST"]),
        Route("/interrupt", comfy.interrupt, methods=["POST"]),
        Route("/system_stats", comfy.system_stats, methods=["GET"]),
    ]


FACES = ("comfyui", "cog")  # the servers whose routes live here


def create_app(config: SimConfig) -> Starlette:
    """The sim worker speaking `config.protocol`: ComfyUI's or Cog's routes from here,
    the others' from gateway.simworker."""
    if config.protocol in FACES:
        return create_sim_app(config, face=lambda worker: routes_for(config.protocol, worker))
    return create_sim_app(config)
