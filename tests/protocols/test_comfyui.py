"""The comfyui protocol: the workflow file checked at load, our values into it and its
history and images out, a full request through a served gateway to a sim ComfyUI
worker, node errors, execution errors, health and busy, and the cache key's variant."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web

from gateway.causes import Cause
from gateway.errors import ConfigError, UpstreamError, UpstreamRejected
from gateway.protocols import Call, protocol_for
from gateway.protocols import comfyui as comfyui_module
from gateway.protocols.comfyui import output_image, rejection, workflow
from gateway.protocols.imaging import sniff
from gateway.registry import (
    AdapterSpec,
    ComfyuiSettings,
    PoolSpec,
    load_registry,
    parse_registry,
)
from gateway.schema import WorkerRequest
from gateway.testing import registry_yaml, served_gateway
from tests.protocols.servers import json_answer, scripted, sim_server
from tests.support import body, dead_url, eventually, make_registry

PATH = "/v1/images/generations"
NO_STORE = {"Cache-Control": "no-store"}
EXAMPLE = Path(__file__).parent.parent.parent / "examples" / "comfyui-sd15-lora.json"
NODES = {"prompt_node": "6", "sampler_node": "3", "lora_node": "10", "output_node": "9"}
SETTINGS = ComfyuiSettings(workflow=str(EXAMPLE), **NODES)
JOB = WorkerRequest(
    prompt="a fox",
    num_inference_steps=4,
    guidance_scale=7.5,
    model="ink.safetensors",
    response_format="jpeg",
    seed=0,
)
ADAPTERS: list[dict[str, Any]] = [
    {"name": "ink", "pool": "p", "upstream_model": "ink.safetensors", "lora_weight": 0.8},
    {"name": "base", "pool": "p", "default": True},
]


def _pool(**options: Any) -> dict[str, Any]:
    return {"protocol": "comfyui", "comfyui": {"workflow": str(EXAMPLE), **NODES, **options}}


# -- the workflow file, checked at load -----------------------------------------------------


def test_a_relative_workflow_path_is_the_registry_file_s(tmp_path: Path) -> None:
    (tmp_path / "flows").mkdir()
    shutil.copy(EXAMPLE, tmp_path / "flows" / "txt2img.json")
    text = registry_yaml(
        {"p": [dead_url()]},
        protocol="comfyui",
        comfyui={"workflow": "flows/txt2img.json", **NODES},
    )
    (tmp_path / "adapters.yaml").write_text(text)
    pool = load_registry(tmp_path / "adapters.yaml").pools["p"]
    assert pool.comfyui is not None
    assert pool.comfyui.workflow == str(tmp_path / "flows" / "txt2img.json")
    assert pool.comfyui.template["3"]["class_type"] == "KSampler"


@pytest.mark.parametrize(
    ("content", "options", "message"),
    [
        (None, {}, "cannot read the workflow"),
        ("{not json", {}, "is not JSON"),
        ('{"nodes": [], "links": []}', {}, "UI format: export it with 'Save \\(API\\)'"),
        ('{"1": {"inputs": {}}}', {}, "not an API-format workflow"),
        (EXAMPLE.read_text(), {"prompt_node": "60"}, "node '60' is not in the workflow"),
        (
            EXAMPLE.read_text(),
            {"seed_input": "noise_seed"},
            r"node '3' \(KSampler\) .* 'noise_seed'",
        ),
        (EXAMPLE.read_text(), {"lora_node": "7"}, r"node '7' \(CLIPTextEncode\) .* 'lora_name'"),
    ],
)
def test_a_bad_workflow_is_refused_at_load_with_its_line(
    tmp_path: Path, content: str | None, options: dict[str, Any], message: str
) -> None:
    path = tmp_path / "flow.json"
    if content is not None:
        path.write_text(content)
    comfy = {"workflow": str(path), **NODES, **options}
    text = registry_yaml({"p": [dead_url()]}, protocol="comfyui", comfyui=comfy)
    with pytest.raises(ConfigError, match=rf":\d+: pools\.p\.comfyui: .*{message}"):
        parse_registry(text)


def test_a_comfyui_pool_needs_its_block_and_a_lora_node_for_a_lora() -> None:
    with pytest.raises(ConfigError, match="needs a 'comfyui' block"):
        make_registry({"p": [dead_url()]}, protocol="comfyui")
    no_lora = {**_pool()["comfyui"], "lora_node": None}
    with pytest.raises(ConfigError, match=r"adapters\.0\.upstream_model: .* no lora_node"):
        make_registry({"p": [dead_url()]}, ADAPTERS, protocol="comfyui", comfyui=no_lora)


# -- our request into the workflow -------------------------------------------------------


def test_the_values_go_into_the_named_nodes_and_the_template_stays() -> None:
    adapter = AdapterSpec(name="ink", pool="p", upstream_model="ink.safetensors", lora_weight=0.8)
    graph = workflow(SETTINGS, JOB, adapter)
    assert graph["6"]["inputs"]["text"] == "a fox"
    sampler = graph["3"]["inputs"]
    assert (sampler["seed"], sampler["steps"], sampler["cfg"]) == (0, 4, 7.5)
    lora = graph["10"]["inputs"]
    assert lora == {
        **lora,
        "lora_name": "ink.safetensors",
        "strength_model": 0.8,
        "strength_clip": 0.8,
    }
    assert SETTINGS.template["6"]["inputs"]["text"] == ""  # the template is untouched


def test_the_base_model_takes_the_lora_node_out_of_the_graph() -> None:
    graph = workflow(
        SETTINGS, JOB.model_copy(update={"model": None}), AdapterSpec(name="b", pool="p")
    )
    assert "10" not in graph
    assert graph["3"]["inputs"]["model"] == ["4", 0]  # was ["10", 0]
    assert graph["6"]["inputs"]["clip"] == ["4", 1]  # was ["10", 1]
    assert graph["7"]["inputs"]["clip"] == ["4", 1]
    # The template is untouched: the next request's graph is made from it again.
    assert SETTINGS.template == json.loads(EXAMPLE.read_text())


# -- ComfyUI's answers as ours -------------------------------------------------------------


def _node_errors(node: str, kind: str, name: str, message: str, details: str) -> bytes:
    # the shape of execution.validate_prompt's node_errors, as server.py's 400 sends it
    error = {
        "type": "value_error",
        "message": message,
        "details": details,
        "extra_info": {"input_name": name},
    }
    failed = {
        "type": "prompt_outputs_failed_validation",
        "message": "Prompt outputs failed validation",
        "details": "",
        "extra_info": {},
    }
    return json.dumps(
        {
            "error": failed,
            "node_errors": {
                node: {"errors": [error], "dependent_outputs": ["9"], "class_type": kind}
            },
        }
    ).encode()


def test_a_node_error_on_the_client_s_value_is_the_client_s_422() -> None:
    answer = _node_errors("3", "KSampler", "steps", "Value 60 bigger than max of 50", "steps")
    error = rejection(answer, SETTINGS, "comfy-0")
    assert isinstance(error, UpstreamRejected)
    assert error.status_code == 422
    assert (
        error.detail
        == "worker rejected the request: num_inference_steps: Value 60 bigger than max of 50"
    )


def test_a_node_error_on_the_workflow_is_the_worker_s_and_hides_its_files() -> None:
    details = "lora_name: 'ink.safetensors' not in ['private-client-lora.safetensors']"
    answer = _node_errors("10", "LoraLoader", "lora_name", "Value not in list", details)
    error = rejection(answer, SETTINGS, "comfy-0")
    assert isinstance(error, UpstreamError)
    assert error.cause is Cause.WORKFLOW_REJECTED
    assert "node 10 (LoraLoader) lora_name: Value not in list" in error.detail
    assert "private" not in error.detail
    no_outputs = {
        "error": {
            "type": "prompt_no_outputs",
            "message": "Prompt has no outputs",
            "details": "",
            "extra_info": {},
        },
        "node_errors": [],
    }
    error = rejection(json.dumps(no_outputs).encode(), SETTINGS, "comfy-0")
    assert isinstance(error, UpstreamError)
    assert "Prompt has no outputs" in error.detail


HISTORY_OK: dict[str, Any] = {
    "prompt": [0, "id", {}, {}, ["9"]],
    "outputs": {
        "9": {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]}
    },
    "status": {"status_str": "success", "completed": True, "messages": []},
}


def test_a_history_entry_names_the_image_to_view() -> None:
    where = output_image(HISTORY_OK, "9", "w")
    assert where == {"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}
    old = {k: v for k, v in HISTORY_OK.items() if k != "status"}  # before ComfyUI had one
    assert output_image(old, None, "w") == where
    with pytest.raises(UpstreamError) as caught:
        output_image(HISTORY_OK, "8", "w")
    assert caught.value.cause is Cause.BAD_ANSWER
    failed = {
        **HISTORY_OK,
        "outputs": {},
        "status": {
            "status_str": "error",
            "completed": False,
            "messages": [["execution_error", {"exception_message": "OOM"}]],
        },
    }
    with pytest.raises(UpstreamError) as caught:
        output_image(failed, "9", "w")
    assert caught.value.cause is Cause.JOB_FAILED
    assert "OOM" not in caught.value.detail


# -- through a served gateway ------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "kind"), [("jpeg", "JPEG"), ("raw", "PNG")])
async def test_a_request_through_the_gateway_to_a_sim_comfyui_worker(fmt: str, kind: str) -> None:
    async with sim_server("comfyui", adapters=("ink.safetensors",)) as (url, worker):
        registry = make_registry({"p": [url]}, ADAPTERS, **_pool(poll_first_s=0.01))
        async with served_gateway(registry) as gw, httpx.AsyncClient(base_url=gw) as client:
            first = await client.post(PATH, json=body(model="ink", seed=11, response_format=fmt))
            again = await client.post(PATH, json=body(model="ink", seed=11, response_format=fmt))
            other = await client.post(PATH, json=body(model="ink", seed=12, response_format=fmt))
            base = await client.post(PATH, json=body(seed=11, response_format=fmt))
    assert [a.status_code for a in (first, again, other, base)] == [200] * 4
    assert sniff(base64.b64decode(first.json()["image"])) == kind  # JPEG: re-encoded
    assert first.headers["x-seed"] == "11"
    assert [first.headers["x-cache"], again.headers["x-cache"]] == ["miss", "hit"]
    assert other.json() != first.json()  # the seed reached the sampler
    assert worker.stats.requests_by_adapter == {"ink.safetensors": 2, "": 1}


async def test_a_lora_the_worker_lacks_is_502_workflow_rejected() -> None:
    async with sim_server("comfyui", adapters=("other.safetensors",)) as (url, _):
        registry = make_registry({"p": [url]}, ADAPTERS, **_pool(poll_first_s=0.01))
        async with served_gateway(registry) as gw, httpx.AsyncClient(base_url=gw) as client:
            answer = await client.post(PATH, json=body(model="ink"))
            metrics = (await client.get("/metrics")).text
    assert answer.status_code == 502
    assert "refused the workflow: node 10 (LoraLoader) lora_name" in answer.json()["detail"]
    assert 'reason="workflow_rejected"' in metrics


async def test_a_failed_execution_is_502_job_failed() -> None:
    async with sim_server("comfyui", fail_rate=1.0) as (url, _):
        registry = make_registry(
            {"p": [url]}, ADAPTERS[1:], max_accepted_retries=0, **_pool(poll_first_s=0.01)
        )
        async with served_gateway(registry) as gw, httpx.AsyncClient(base_url=gw) as client:
            answer = await client.post(PATH, json=body())
    assert answer.status_code == 502
    assert "the workflow failed" in answer.json()["detail"]


# -- a try that ends early takes its prompt off the worker -------------------------------


async def sim_queue(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        data: dict[str, Any] = (await client.get(url + "/queue")).json()
    return data


async def test_timed_out_tries_leave_nothing_in_the_worker_s_queue() -> None:
    # One GPU, two prompts of 8 s each: when both tries time out, one runs, one waits.
    async with sim_server("comfyui", step_ms=2000.0, concurrency=1) as (url, worker):
        registry = make_registry(
            {"p": [{"url": url, "max_concurrency": 2}]},
            ADAPTERS[1:],
            timeout_s=0.5,
            max_retries=0,
            max_accepted_retries=0,
            **_pool(poll_first_s=0.01),
        )
        async with served_gateway(registry) as gw, httpx.AsyncClient(base_url=gw) as client:
            answers = await asyncio.gather(
                *(client.post(PATH, json=body(seed=s), headers=NO_STORE) for s in (1, 2))
            )
            assert [a.status_code for a in answers] == [504, 504]
            await eventually(lambda: worker.stats.interrupts + worker.stats.queue_deletes == 2)
            queue = await sim_queue(url)
    assert queue == {"queue_running": [], "queue_pending": []}
    assert (worker.stats.interrupts, worker.stats.queue_deletes) == (1, 1)
    assert worker.stats.generations == 0


async def test_a_cancelled_try_interrupts_its_running_prompt() -> None:
    async with (
        sim_server("comfyui", step_ms=2000.0, concurrency=1) as (url, worker),
        aiohttp.ClientSession() as session,
    ):
        comfy = protocol_for("comfyui")
        call = Call(
            session=session,
            base_url=url,
            worker="w-0",
            timeout=aiohttp.ClientTimeout(total=60),
            headers={},
            max_bytes=2**24,
            job=JOB.model_copy(update={"model": None}),
            adapter=AdapterSpec(name="base", pool="p"),
            pool=PoolSpec.model_validate(_pool(poll_first_s=0.01)),
        )
        try_ = asyncio.create_task(comfy.generate(call))
        await eventually(lambda: worker.stats.in_flight == 1)  # it runs
        try_.cancel()
        await eventually(lambda: worker.stats.interrupts == 1)
        queue = await sim_queue(url)
    assert queue == {"queue_running": [], "queue_pending": []}
    assert try_.cancelled()


def stuck_comfyui(
    released: asyncio.Event, seen: list[tuple[str, Any]]
) -> dict[tuple[str, str], Any]:
    """A ComfyUI whose prompt never finishes and whose POST /queue answers only once
    `released` is set; `seen` records the queue edits."""

    async def post_queue(request: web.Request) -> web.StreamResponse:
        seen.append(("queue", await request.json()))
        await released.wait()
        return web.Response()

    async def interrupt(request: web.Request) -> web.StreamResponse:
        seen.append(("interrupt", await request.json()))
        return web.Response()

    return {
        ("POST", "/prompt"): json_answer({"prompt_id": "p-1", "number": 0, "node_errors": {}}),
        ("GET", "/history/p-1"): json_answer({}),
        ("POST", "/queue"): post_queue,
        ("GET", "/queue"): json_answer(
            {"queue_running": [[0, "p-1", {}, {}, ["9"]]], "queue_pending": []}
        ),
        ("POST", "/interrupt"): interrupt,
        ("GET", "/system_stats"): json_answer({"system": {}, "devices": []}),
    }


def _stuck_registry(url: str) -> Any:
    return make_registry(
        {"p": [url]},
        ADAPTERS[1:],
        timeout_s=0.3,
        max_retries=0,
        max_accepted_retries=0,
        **_pool(poll_first_s=0.01),
    )


async def test_the_client_s_answer_never_waits_for_the_removal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.protocols.comfyui")
    released, seen = asyncio.Event(), list[tuple[str, Any]]()
    async with (
        scripted(stuck_comfyui(released, seen)) as url,
        served_gateway(_stuck_registry(url)) as gw,
        httpx.AsyncClient() as client,
    ):
        try:
            answer = await client.post(gw + PATH, json=body(), timeout=30)
            # The client has its answer while the worker still holds the delete.
            assert answer.status_code == 504
            await eventually(lambda: seen == [("queue", {"delete": ["p-1"]})])
            released.set()
            await eventually(lambda: "abandoned prompt interrupted" in caplog.text)
        finally:
            released.set()  # the server stops only once its handlers have answered
    assert seen[1] == ("interrupt", {"prompt_id": "p-1"})


async def test_a_removal_the_worker_does_not_answer_gives_up_in_time(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(comfyui_module, "CLEANUP_S", 0.2)
    caplog.set_level(logging.INFO, logger="gateway.protocols.comfyui")
    released, seen = asyncio.Event(), list[tuple[str, Any]]()
    comfy = protocol_for("comfyui")
    assert isinstance(comfy, comfyui_module.ComfyUI)
    async with (
        scripted(stuck_comfyui(released, seen)) as url,
        served_gateway(_stuck_registry(url)) as gw,
        httpx.AsyncClient() as client,
    ):
        try:
            answer = await client.post(gw + PATH, json=body(), timeout=30)
            await eventually(lambda: "could not take an abandoned prompt" in caplog.text)
            await eventually(lambda: not comfy.cleanups)  # given up: nothing left running
        finally:
            released.set()  # the server stops only once its handlers have answered
    assert answer.status_code == 504
    assert "within 0.2s" in caplog.text
    assert seen == [("queue", {"delete": ["p-1"]})]  # no interrupt after the give-up


@pytest.mark.parametrize(("pending", "probe"), [(2, "ok"), (3, "busy")])
async def test_a_long_queue_is_busy(pending: int, probe: str) -> None:
    # server.py's /queue: running and pending prompts, [number, id, prompt, extra, outputs]
    queue = {
        "queue_running": [[0, "a", {}, {}, ["9"]]],
        "queue_pending": [[i, f"p{i}", {}, {}, ["9"]] for i in range(pending)],
    }
    routes = {
        ("GET", "/system_stats"): json_answer({"system": {}, "devices": []}),
        ("GET", "/queue"): json_answer(queue),
    }
    pool = PoolSpec.model_validate(_pool(busy_queue=2))
    async with scripted(routes) as url, aiohttp.ClientSession() as session:
        said = await protocol_for("comfyui").probe(
            session, url, timeout=aiohttp.ClientTimeout(total=2), headers={}, pool=pool
        )
    assert said == probe


async def test_no_system_stats_is_down() -> None:
    routes = {("GET", "/system_stats"): json_answer({}, 500)}
    async with scripted(routes) as url, aiohttp.ClientSession() as session:
        said = await protocol_for("comfyui").probe(
            session,
            url,
            timeout=aiohttp.ClientTimeout(total=2),
            headers={},
            pool=PoolSpec.model_validate(_pool()),
        )
    assert said == "down"


# -- the cache key ------------------------------------------------------------------------


def test_the_variant_separates_workflows_mappings_and_weights(tmp_path: Path) -> None:
    comfy = protocol_for("comfyui")
    adapter = AdapterSpec(name="ink", pool="p", upstream_model="ink.safetensors")
    pool = PoolSpec.model_validate(_pool())
    edited = tmp_path / "flow.json"
    edited.write_text(EXAMPLE.read_text().replace('"euler"', '"dpmpp_2m"'))
    other_flow = PoolSpec.model_validate(
        {**_pool(), "comfyui": {**_pool()["comfyui"], "workflow": str(edited)}}
    )
    variants = {
        comfy.variant(adapter, pool),
        comfy.variant(adapter.model_copy(update={"lora_weight": 0.5}), pool),
        comfy.variant(adapter, other_flow),
        comfy.variant(adapter, PoolSpec.model_validate(_pool(output_node="8"))),
    }
    assert len(variants) == 4
    assert comfy.variant(adapter, PoolSpec.model_validate(_pool(poll_max_s=5))) == comfy.variant(
        adapter, pool
    )  # how it polls draws nothing
