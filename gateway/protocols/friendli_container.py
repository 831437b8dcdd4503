"""The Friendli Container image API: `POST /v1/images/generations` -> `{"image": b64}`.

The worker takes the gateway's own request body (`WorkerRequest`, the client's six
fields with the seed decided and `model` the adapter's `upstream_model`, plus
`control_images` and `controlnet_weights` when the client gave them) and answers
the client's own response body. So its 200 passes through byte for byte: checked
(`gateway.answers`), never parsed into objects, decoded or re-encoded.
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from gateway.answers import problem
from gateway.causes import Cause
from gateway.errors import UpstreamError
from gateway.protocols.call import Call, Probe
from gateway.protocols.http import Answer, Check, post_json, probe_get, refusal
from gateway.registry import AdapterSpec, PoolSpec
from gateway.schema import ResponseFormat


class FriendliContainer:
    name = "friendli-container"
    path = "/v1/images/generations"
    health_path = "/health"
    takes_control_images = True
    deterministic_seeds = True

    async def generate(self, call: Call) -> bytes:
        """The worker's success body, untouched, once `gateway.answers` found an image
        of the requested format in it; every failure as an UpstreamError."""
        job = call.job
        answer = await post_json(
            call.session,
            call.base_url + self.path,
            job.to_json(),
            worker=call.worker,
            timeout=call.timeout,
            headers=call.headers,
            max_bytes=call.max_bytes,
            check=_image_of(job.response_format, call.worker),
        )
        if answer.status != 200:
            raise refusal(answer, call.worker)
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
        """`GET /health` answered 200: ok; anything else, a failure included: down."""
        answer = await probe_get(
            session, base_url + self.health_path, timeout=timeout, headers=headers, pool=pool
        )
        return "ok" if answer is not None and answer.status == 200 else "down"

    def honours_seed(self, pool: PoolSpec) -> bool:
        return self.deterministic_seeds

    def selection(self, adapter: AdapterSpec, pool: PoolSpec) -> str:
        model = adapter.upstream_model
        return f"model={model}" if model is not None else "model=null (the base model)"

    def variant(self, adapter: AdapterSpec, pool: PoolSpec) -> str | None:
        return None  # the worker draws from the request alone


def _image_of(response_format: ResponseFormat, worker: str) -> Check:
    def check(answer: Answer) -> None:
        if (wrong := problem(answer.body, response_format)) is not None:
            raise UpstreamError(Cause.BAD_ANSWER, f"worker {worker}", f"answered 200 {wrong}")

    return check
