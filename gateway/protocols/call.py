"""What one try on one worker is given (`Call`), and what a probe says (`Probe`).

Its own small module, not the package's `__init__`, so that every protocol module can
import it while the package imports every protocol module (the `PROTOCOLS` table).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import aiohttp

from gateway.registry import AdapterSpec, PoolSpec
from gateway.schema import WorkerRequest

Probe = Literal["ok", "busy", "down"]
"""One health probe's word: `ok` in service; `busy` in service but full (a server that
says it runs as much as it can now): never a reason to take it out; `down` not fit."""


@dataclass(frozen=True, slots=True)
class Call:
    """One try of one generation on one worker."""

    session: aiohttp.ClientSession  # the process's one client session
    base_url: str  # the worker's URL, no trailing slash
    worker: str  # its name, for messages: never its address
    timeout: aiohttp.ClientTimeout  # this try's: what is left of the request's deadline
    headers: Mapping[str, str]  # the pool's credentials and X-Request-ID: send them all
    max_bytes: int  # the pool's max_response_bytes: refuse a larger answer as it comes
    job: WorkerRequest  # the six inputs, every one decided (the seed is explicit)
    adapter: AdapterSpec  # job.model is its upstream_model
    pool: PoolSpec  # the protocol's settings block, jpeg_quality, ...
