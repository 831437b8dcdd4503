"""ComfyUI: a workflow queued with `POST /prompt`, polled on `/history/{id}`, read with `/view`.

One try is three kinds of exchange, all within the try's deadline (ComfyUI's own
server.py routes; script_examples/websockets_api_example.py does the same steps):

    POST /prompt {"prompt": <the pool's workflow, our values filled in>, "client_id"}
        -> 200 {"prompt_id", "number", "node_errors": {}}
        -> 400 {"error": {...}, "node_errors": {id: {"errors": [...], "class_type"}}}
    GET /history/{prompt_id}     {} while it waits or runs; then {prompt_id: {"outputs":
                                 {node: {"images": [{filename, subfolder, type}]}},
                                 "status": {"status_str": "success" | "error", ...}}}
                                 polled after poll_first_s, doubling up to poll_max_s
    GET /view?filename&subfolder&type   the image's bytes (SaveImage writes PNG)

A 400 whose node errors all name inputs that the client's values fill (the prompt
node's text, the sampler's seed, steps or cfg) is the client's: a 422 naming our
field. Any other 400 (a LoRA or checkpoint file this worker lacks, a node it does not
have, a broken workflow) is Cause.WORKFLOW_REJECTED: retried on another worker, and
counted against this one's health. Only ComfyUI's short messages ("Value not in
list") reach the client, never its `details`, which list the worker's files. A
history entry whose status is "error" is Cause.JOB_FAILED.

The adapter's LoRA goes into the lora_node's lora_name, its weight into the strength
inputs; an adapter with no LoRA (the base model) takes the LoRA node out of the graph:
whatever read its MODEL (output 0) and CLIP (output 1) reads the node's own `model`
and `clip` inputs instead, as a LoraLoader at strength 0 would, without a file to load.

A try that ends before its prompt's history entry does (its deadline passed, the
client went away, /history answered garbage) leaves the prompt on the worker, where it
would hold the GPU for an image nobody takes. So it is taken off, in a task of its own
that the client's answer never waits for, within CLEANUP_S: `POST /queue {"delete":
[id]}` (server.py takes a waiting prompt out; a running one stays), then, if `GET
/queue` shows it running, `POST /interrupt {"prompt_id": id}` (server.py since 2025
interrupts only that prompt; an older one interrupts whatever runs, which was ours a
moment before). What it did, or why it could not, is logged.

Health: `GET /system_stats` answers 200 (down otherwise); then `GET /queue`: more than
`busy_queue` prompts pending is "busy". ComfyUI queues every prompt it accepts, so a
try never meets a "busy" answer: the balancer's slots keep its queue short.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

import aiohttp

from gateway.causes import Cause
from gateway.errors import UpstreamError, UpstreamRejected
from gateway.protocols.call import Call, Probe
from gateway.protocols.http import (
    Answer,
    get_json,
    one_line,
    post_json,
    probe_get,
    refusal,
    status_cause,
)
from gateway.protocols.imaging import bytes_to_answer
from gateway.registry import AdapterSpec, ComfyuiSettings, PoolSpec
from gateway.schema import WorkerRequest

log = logging.getLogger(__name__)

_JSON_MAX_BYTES = 4 * 2**20  # a history entry repeats the workflow; 4 MiB is ample
_PROMPT_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# The most the removal of an abandoned prompt may take, all exchanges together: past
# it the worker is too slow to answer a queue edit, and the prompt runs its course.
CLEANUP_S = 5.0


class ComfyUI:
    name = "comfyui"
    takes_control_images = False
    deterministic_seeds = True

    def __init__(self) -> None:
        # Removals under way; held here so that the loop does not drop them half done.
        self.cleanups: set[asyncio.Task[None]] = set()

    async def generate(self, call: Call) -> bytes:
        settings = _settings(call.pool)
        loop = asyncio.get_running_loop()
        total = call.timeout.total
        deadline = loop.time() + (total if total is not None else math.inf)
        body = {"prompt": workflow(settings, call.job, call.adapter), "client_id": uuid.uuid4().hex}
        answer = await post_json(
            call.session,
            call.base_url + "/prompt",
            body,
            worker=call.worker,
            timeout=_left(call, deadline),
            headers=call.headers,
            max_bytes=_JSON_MAX_BYTES,
        )
        if answer.status == 400:
            raise rejection(answer.body, settings, call.worker)
        if answer.status != 200:
            raise refusal(answer, call.worker)
        prompt_id = queued_id(answer.body, call.worker)
        try:
            entry = await self._finished(call, settings, prompt_id, deadline)
        except BaseException:  # a timeout, an error, or this task cancelled
            self._abandon(call, prompt_id)
            raise
        where = output_image(entry, settings.output_node, call.worker)
        image = await self._view(call, where, deadline)
        return await bytes_to_answer(
            image, call.job.response_format, jpeg_quality=call.pool.jpeg_quality, worker=call.worker
        )

    async def _finished(
        self, call: Call, settings: ComfyuiSettings, prompt_id: str, deadline: float
    ) -> Mapping[str, Any]:
        """Poll /history/{prompt_id} until it holds the prompt, with backoff."""
        wait = settings.poll_first_s
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(wait, max(0.0, deadline - loop.time())))
            answer = await get_json(
                call.session,
                f"{call.base_url}/history/{prompt_id}",
                worker=call.worker,
                timeout=_left(call, deadline),
                headers=call.headers,
                max_bytes=_JSON_MAX_BYTES,
            )
            _ok(answer, call.worker, "/history")
            entry = history_entry(answer.body, prompt_id, call.worker)
            if entry is not None:
                return entry
            wait = min(wait * 2, settings.poll_max_s)

    def _abandon(self, call: Call, prompt_id: str) -> None:
        where = (call.session, call.base_url, call.worker, call.headers)
        task = asyncio.get_running_loop().create_task(abandon(*where, prompt_id))
        self.cleanups.add(task)
        task.add_done_callback(self.cleanups.discard)

    async def _view(self, call: Call, where: Mapping[str, str], deadline: float) -> bytes:
        answer = await get_json(
            call.session,
            f"{call.base_url}/view?{urlencode(where)}",
            worker=call.worker,
            timeout=_left(call, deadline),
            headers=call.headers,
            max_bytes=call.max_bytes,
        )
        _ok(answer, call.worker, "/view")
        return answer.body

    async def probe(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        timeout: aiohttp.ClientTimeout,
        headers: Mapping[str, str],
        pool: PoolSpec,
    ) -> Probe:
        stats = await probe_get(
            session, base_url + "/system_stats", timeout=timeout, headers=headers, pool=pool
        )
        if stats is None or stats.status != 200:
            return "down"
        queue = await probe_get(
            session, base_url + "/queue", timeout=timeout, headers=headers, pool=pool
        )
        if queue is None or queue.status != 200:
            return "down"
        pending = queue_pending(queue.body)
        if pending is None:
            return "down"
        return "busy" if pending > _settings(pool).busy_queue else "ok"

    def honours_seed(self, pool: PoolSpec) -> bool:
        return self.deterministic_seeds

    def selection(self, adapter: AdapterSpec, pool: PoolSpec) -> str:
        settings = _settings(pool)
        if settings.lora_node is None or adapter.upstream_model is None:
            base = "the workflow's checkpoint"
            return (
                base
                if settings.lora_node is None
                else base + f" (LoRA node {settings.lora_node} taken out)"
            )
        weight = lora_weight(adapter, settings)
        name = f"{settings.lora_name_input}={adapter.upstream_model}"
        return f"node {settings.lora_node} {name} @ {weight:g}"

    def variant(self, adapter: AdapterSpec, pool: PoolSpec) -> str | None:
        # The workflow's content, where our values go, and the LoRA's weight.
        settings = _settings(pool)
        mapping = settings.model_dump(
            mode="json", exclude={"workflow", "busy_queue", "poll_first_s", "poll_max_s"}
        )
        text = json.dumps(
            [settings.digest, mapping, lora_weight(adapter, settings)], sort_keys=True
        )
        return "comfyui:" + hashlib.sha256(text.encode()).hexdigest()[:16]


async def abandon(
    session: aiohttp.ClientSession,
    base_url: str,
    worker: str,
    headers: Mapping[str, str],
    prompt_id: str,
) -> None:
    """Take a prompt that no try waits for any more off the worker: out of its queue,
    or interrupted if it runs. Best effort, within CLEANUP_S; never raises."""
    timeout = aiohttp.ClientTimeout(total=CLEANUP_S)

    refused: list[str] = []  # what the worker did not answer 200 to

    async def post(route: str, body: Mapping[str, Any]) -> None:
        answer = await post_json(
            session,
            base_url + route,
            body,
            worker=worker,
            timeout=timeout,
            headers=headers,
            max_bytes=_JSON_MAX_BYTES,
        )
        if answer.status != 200:
            refused.append(f"POST {route}: HTTP {answer.status}")

    fields = {"worker": worker, "prompt_id": prompt_id}
    try:
        async with asyncio.timeout(CLEANUP_S):
            await post("/queue", {"delete": [prompt_id]})
            queue = await get_json(
                session,
                base_url + "/queue",
                worker=worker,
                timeout=timeout,
                headers=headers,
                max_bytes=_JSON_MAX_BYTES,
            )
            if queue.status != 200:
                refused.append(f"GET /queue: HTTP {queue.status}")
            running = prompt_id in running_ids(queue.body)
            if running:
                await post("/interrupt", {"prompt_id": prompt_id})
    except (UpstreamError, TimeoutError, aiohttp.ClientError, RuntimeError) as exc:
        # RuntimeError: the session closed under it (the gateway stopping).
        why = exc.detail if isinstance(exc, UpstreamError) else None
        log.warning(
            "comfyui: could not take an abandoned prompt off its worker: %s",
            why or f"{type(exc).__name__} within {CLEANUP_S:g}s",
            extra={"fields": fields},
        )
        return
    if refused:
        log.warning(
            "comfyui: the worker refused to take an abandoned prompt off: %s",
            "; ".join(refused),
            extra={"fields": fields},
        )
        return
    done = "interrupted" if running else "taken out of the queue (if it still waited)"
    log.info("comfyui: abandoned prompt %s", done, extra={"fields": fields})


def running_ids(body: bytes) -> set[str]:
    """The ids of the prompts running in `GET /queue`'s answer (each item is
    [number, prompt_id, prompt, extra_data, outputs])."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return set()
    running = data.get("queue_running") if isinstance(data, dict) else None
    items = running if isinstance(running, list) else []
    return {str(item[1]) for item in items if isinstance(item, list) and len(item) > 1}


def _settings(pool: PoolSpec) -> ComfyuiSettings:
    settings = pool.comfyui
    if settings is None:  # refused at load (gateway.registry._cross_check)
        raise AssertionError("a comfyui pool without its comfyui block")
    return settings


def lora_weight(adapter: AdapterSpec, settings: ComfyuiSettings) -> float:
    return settings.lora_weight if adapter.lora_weight is None else adapter.lora_weight


def workflow(settings: ComfyuiSettings, job: WorkerRequest, adapter: AdapterSpec) -> dict[str, Any]:
    """The pool's workflow with the job's values in it (a copy: the template stays)."""
    # Each node and its inputs copied, nothing deeper: what changes below is an input
    # replaced, never a value changed in place (a deepcopy cost ~1 ms a request).
    graph = {
        node_id: {**node, "inputs": dict(node["inputs"])}
        for node_id, node in settings.template.items()
    }
    graph[settings.prompt_node]["inputs"][settings.prompt_input] = job.prompt
    sampler = graph[settings.sampler_node]["inputs"]
    sampler[settings.steps_input] = job.num_inference_steps
    sampler[settings.cfg_input] = job.guidance_scale
    # Always explicit: ComfyUI draws with exactly this seed (no "random" value exists in
    # the API format: "control_after_generate" is the web UI's, not the server's).
    graph[settings.seed_node or settings.sampler_node]["inputs"][settings.seed_input] = job.seed
    if settings.lora_node is not None:
        if job.model is None:
            _bypass(graph, settings.lora_node)
        else:
            lora = graph[settings.lora_node]["inputs"]
            lora[settings.lora_name_input] = job.model
            for name in settings.lora_strength_inputs:
                lora[name] = lora_weight(adapter, settings)
    return graph


_LORA_OUTPUTS = ("model", "clip")  # a LoraLoader's outputs 0 and 1 are these inputs, changed


def _bypass(graph: dict[str, Any], node_id: str) -> None:
    """Take the LoRA node out: every link to its output i goes to its input _LORA_OUTPUTS[i]."""
    inputs = graph.pop(node_id)["inputs"]
    for node in graph.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) == node_id:
                index = value[1]
                if isinstance(index, int) and 0 <= index < len(_LORA_OUTPUTS):
                    node["inputs"][name] = inputs.get(_LORA_OUTPUTS[index], value)


def _left(call: Call, deadline: float) -> aiohttp.ClientTimeout:
    """What is left of the try's deadline, for the next exchange; none left: TIMEOUT."""
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        total = call.timeout.total or 0.0
        raise UpstreamError(
            Cause.TIMEOUT, f"worker {call.worker}", f"no answer within {round(total, 1):g}s"
        )
    return aiohttp.ClientTimeout(total=left, sock_connect=call.timeout.sock_connect)


def _ok(answer: Answer, worker: str, route: str) -> None:
    """/history and /view answer 200; anything else is the worker's fault, never the
    client's (a 404 on /view is a file the worker said it wrote)."""
    if answer.status != 200:
        cause = status_cause(answer.status, answer.retry_after)
        if cause is Cause.HTTP_429 or cause is Cause.HTTP_503_BUSY or cause is Cause.HTTP_503:
            cause = Cause.HTTP_5XX  # it accepted the job: "busy" no longer fits
        raise UpstreamError(
            cause, f"worker {worker}", f"answered {route} with HTTP {answer.status}"
        )


def queued_id(body: bytes, worker: str) -> str:
    data = _json(body)
    prompt_id = data.get("prompt_id") if isinstance(data, dict) else None
    # It goes into a URL path: a uuid's characters only.
    if not isinstance(prompt_id, str) or not _PROMPT_ID.match(prompt_id):
        raise _bad(worker, "/prompt with no prompt_id")
    return prompt_id


def history_entry(body: bytes, prompt_id: str, worker: str) -> Mapping[str, Any] | None:
    """The prompt's history entry once it has one (it is done), else None."""
    data = _json(body)
    if not isinstance(data, dict):
        raise _bad(worker, "/history with JSON that is not a history")
    entry = data.get(prompt_id)
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise _bad(worker, "/history with an entry that is not an object")
    return entry


def output_image(entry: Mapping[str, Any], output_node: str | None, worker: str) -> dict[str, str]:
    """Where the finished prompt's image is, as /view's query; an execution error is
    Cause.JOB_FAILED, a finished prompt without an image Cause.BAD_ANSWER."""
    status = entry.get("status")
    if isinstance(status, dict) and status.get("status_str") == "error":
        raise UpstreamError(Cause.JOB_FAILED, f"worker {worker}", "the workflow failed")
    outputs = entry.get("outputs")
    if not isinstance(outputs, dict):
        raise _bad(worker, "/history without outputs")
    nodes = [output_node] if output_node is not None else list(outputs)
    for node in nodes:
        images = (
            outputs.get(node, {}).get("images") if isinstance(outputs.get(node), dict) else None
        )
        if isinstance(images, list) and images and isinstance(images[0], dict):
            image = images[0]
            if isinstance(image.get("filename"), str):
                return {
                    "filename": image["filename"],
                    "subfolder": str(image.get("subfolder", "")),
                    "type": str(image.get("type", "output")),
                }
    raise _bad(worker, "/history with no image in its outputs")


def queue_pending(body: bytes) -> int | None:
    """How many prompts wait in `GET /queue`'s answer; None when it is not one."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    pending = data.get("queue_pending") if isinstance(data, dict) else None
    return len(pending) if isinstance(pending, list) else None


def rejection(
    body: bytes, settings: ComfyuiSettings, worker: str
) -> UpstreamRejected | UpstreamError:
    """A 400 from /prompt: the client's 422 when every node error is on an input the
    client's values fill; else the workflow's fault (Cause.WORKFLOW_REJECTED)."""
    ours = {
        (settings.prompt_node, settings.prompt_input): "prompt",
        (settings.sampler_node, settings.steps_input): "num_inference_steps",
        (settings.sampler_node, settings.cfg_input): "guidance_scale",
        (settings.seed_node or settings.sampler_node, settings.seed_input): "seed",
    }
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        return UpstreamError(Cause.WORKFLOW_REJECTED, f"worker {worker}")
    client, other = [], []
    node_errors = data.get("node_errors")
    for node_id, entry in node_errors.items() if isinstance(node_errors, dict) else ():
        for error in entry.get("errors", []) if isinstance(entry, dict) else ():
            if not isinstance(error, dict):
                continue
            extra = error.get("extra_info")
            name = extra.get("input_name") if isinstance(extra, dict) else None
            message = str(error.get("message", "invalid"))
            field = ours.get((str(node_id), str(name)))
            if field is not None:
                client.append(f"{field}: {message}")
            else:
                other.append(
                    f"node {node_id} ({entry.get('class_type', '?')}) {name or ''}: {message}"
                )
    if client and not other:
        return UpstreamRejected(422, "worker rejected the request: " + one_line("; ".join(client)))
    if not other:
        error = data.get("error")
        said = error.get("message") if isinstance(error, dict) else error
        other.append(str(said or "no reason given"))
    what = "refused the workflow: " + one_line("; ".join(other))
    return UpstreamError(Cause.WORKFLOW_REJECTED, f"worker {worker}", what)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _bad(worker: str, what: str) -> UpstreamError:
    return UpstreamError(Cause.BAD_ANSWER, f"worker {worker}", f"answered {what}")
