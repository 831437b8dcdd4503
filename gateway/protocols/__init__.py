"""Worker protocols: how the gateway talks to one kind of image server.

Clients always send the one Friendli Container body; each pool of adapters.yaml says
(`protocol:`) what its workers speak. A protocol turns one try of a `WorkerRequest`
into HTTP exchanges with one worker, and the worker's answer into the client's body,
`{"image": "<base64>"}` in the format asked (JPEG for `jpeg`, PNG for `raw`), checked
by `gateway.answers`; or into a `gateway.errors.UpstreamError` (a `Cause`) or an
`UpstreamRejected` (the worker's 4xx: the client's input). It knows nothing of the
cache, the balancer or the client; one module per protocol.

The interface (a `typing.Protocol`: a protocol class subclasses nothing):

    name: str                   the `protocol:` value in adapters.yaml (a key of PROTOCOLS
                                and a member of gateway.registry.ProtocolName)
    takes_control_images: bool  whether the server can take Friendli's control images
    deterministic_seeds: bool   whether its servers draw the same image for the same seed
    async generate(call) -> bytes
        One try (`Call`: session, base_url, worker, timeout, headers, max_bytes, job,
        adapter, pool). Send every header of `call.headers` (the pool's credentials and
        X-Request-ID) and the seed explicitly (`call.job.seed`, 0..2**32-1: never a
        server's "random" value); read at most `call.max_bytes`; return the client's
        body, checked. Errors: `gateway.protocols.http.refusal` maps a non-200.
    async probe(session, base_url, *, timeout, headers, pool) -> Probe
        One health probe: "ok", "busy" (in service, full: never a reason to eject) or
        "down". Never raises.
    honours_seed(pool) -> bool
        Whether this pool's requests send the seed and its servers draw with it
        (`deterministic_seeds`, unless the pool's settings say it sends no seed).
    selection(adapter, pool) -> str
        How the adapter is chosen on the worker, in words for `gateway check`, e.g.
        "model=pixel-art" or "prompt + <lora:pixel-art:0.8>".
    variant(adapter, pool) -> str | None
        What besides the request decides the image on this protocol's workers (the
        pool's settings that shape it, the adapter's LoRA weight), as text for the
        cache key; None when the request alone does (then the key is what it was
        before protocols existed).

The shared parts: `gateway.protocols.http` (the exchange: `post_json`, `get_json`, a
bounded read, aiohttp's exceptions and non-200 answers as causes, error bodies read into
one line), `gateway.protocols.imaging` (base64 or bytes of any format -> the client's
body, re-encoded only when the format differs, in a thread) and `call` (`Call`, `Probe`).

Adding a protocol: a module here with its class; its name in `PROTOCOLS` below and in
`gateway.registry.ProtocolName`; its settings block (a `_Frozen` model named
`<Name>Settings`) on `PoolSpec`, with its key in `gateway.registry.SETTINGS_BLOCKS`;
`gateway sim-worker --protocol NAME` in `gateway.simworker`; docs/protocols.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import aiohttp

from gateway.protocols.a1111 import A1111
from gateway.protocols.call import Call, Probe
from gateway.protocols.cog import Cog
from gateway.protocols.comfyui import ComfyUI
from gateway.protocols.friendli_container import FriendliContainer
from gateway.protocols.openai_images import OpenAIImages
from gateway.registry import AdapterSpec, PoolSpec

__all__ = [
    "PROTOCOLS",
    "Call",
    "Probe",
    "WorkerProtocol",
    "deterministic",
    "open_worker_session",
    "protocol_for",
]


class WorkerProtocol(Protocol):
    name: str
    takes_control_images: bool
    deterministic_seeds: bool

    async def generate(self, call: Call) -> bytes: ...

    async def probe(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        timeout: aiohttp.ClientTimeout,
        headers: Mapping[str, str],
        pool: PoolSpec,
    ) -> Probe: ...

    def honours_seed(self, pool: PoolSpec) -> bool: ...

    def selection(self, adapter: AdapterSpec, pool: PoolSpec) -> str: ...

    def variant(self, adapter: AdapterSpec, pool: PoolSpec) -> str | None: ...


_ALL: tuple[WorkerProtocol, ...] = (
    FriendliContainer(),
    OpenAIImages(),
    A1111(),
    ComfyUI(),
    Cog(),
)
PROTOCOLS: Mapping[str, WorkerProtocol] = {protocol.name: protocol for protocol in _ALL}


def protocol_for(name: str) -> WorkerProtocol:
    return PROTOCOLS[name]


def deterministic(adapter: AdapterSpec, pool: PoolSpec) -> bool:
    """Does this adapter draw the same image for the same inputs? The adapter's own
    `deterministic` when set, else whether its pool's protocol honours the seed."""
    if adapter.deterministic is not None:
        return adapter.deterministic
    return protocol_for(pool.protocol).honours_seed(pool)


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
        # Workers set no cookies the gateway should send back: no jar to look up per request.
        cookie_jar=aiohttp.DummyCookieJar(),
    )
