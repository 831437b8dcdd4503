"""Worker protocols: how the gateway talks to one kind of GPU worker.

A protocol turns a `WorkerRequest` into an HTTP exchange with one worker and its
answer into image-response bytes or a `gateway.errors.UpstreamError`; bytes only once
it has checked that they hold an image of the format asked for, within the pool's
`max_response_bytes` (a 200 that fails is a `BadAnswer`). It knows nothing of the
cache, the balancer or the client; one module per protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import aiohttp

from gateway.protocols.friendli_container import FriendliContainer
from gateway.schema import ResponseFormat


class WorkerProtocol(Protocol):
    name: str
    health_path: str

    async def generate(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        payload: bytes,
        *,
        worker: str,
        timeout: aiohttp.ClientTimeout,
        headers: Mapping[str, str],
        response_format: ResponseFormat,
        max_bytes: int,
    ) -> bytes: ...

    async def healthy(
        self, session: aiohttp.ClientSession, base_url: str, *, timeout: aiohttp.ClientTimeout
    ) -> bool: ...


PROTOCOLS: Mapping[str, WorkerProtocol] = {FriendliContainer.name: FriendliContainer()}


def protocol_for(name: str) -> WorkerProtocol:
    return PROTOCOLS[name]


def open_worker_session(*, slots: int) -> aiohttp.ClientSession:
    """The one client session of the process, shared by every worker of every pool.

    Keep-alive connections are pooled per worker; the pool is sized for `slots` (every
    slot of every worker, `Registry.worker_slots`) twice over, so a reload that adds
    workers still finds room.
    """
    connector = aiohttp.TCPConnector(limit=max(100, 2 * slots), limit_per_host=0)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # the worker's bytes go to the client as they came
        trust_env=False,  # never route worker traffic through an environment proxy
        skip_auto_headers=("User-Agent",),
    )
