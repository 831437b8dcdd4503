"""Why a request got no image from a worker: the one vocabulary.

Every way a try on a worker (or a request's stay in a pool) can end without an image
is one `Cause`. Everything that reacts to a failure reads it from there and nowhere
else:

- the retry decision: its `stage` (how far the worker got with the job) and, for a
  job the worker may have run, the `retry_on` word of adapters.yaml that allows
  another try (`gateway.balancer.Attempt`);
- the health verdict on the worker: `failed` counts towards ejection, `busy` and
  `answered` do not (`gateway.balancer.Pool.release`, `gateway.health`);
- the metric label: its `label` (`reason` of `gateway_upstream_errors_total` and
  `gateway_retries_total`);
- what the client is told: the HTTP `status`, and `says` in the error's detail
  (`gateway.errors.UpstreamError`).

The translation of the HTTP client's exceptions into causes is one table,
`gateway.protocols.client_errors`. This module imports nothing of the gateway's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal


class Stage(enum.Enum):
    """How far the worker got with the job when the try ended."""

    UNSENT = "unsent"  # it never got the request (no connection): retried, costs nothing
    REFUSED = "refused"  # it turned the request away before running it: retried
    ACCEPTED = "accepted"  # it may have run the job: retried only as `retry_on` says
    FINAL = "final"  # retrying cannot help (the client's input, no worker, no time left)


Verdict = Literal["failed", "busy", "answered", "none"]


@dataclass(frozen=True)
class _Facts:
    label: str
    stage: Stage
    verdict: Verdict
    status: int  # what the client gets when it is the last word (0: the worker's own)
    says: str  # the detail's words after "worker NAME: " when the raiser adds none
    retry_on: str | None = None  # the `retry_on` word that allows a retry (ACCEPTED)


U, R, A, F = Stage.UNSENT, Stage.REFUSED, Stage.ACCEPTED, Stage.FINAL


class Cause(enum.Enum):
    DNS = _Facts("dns", U, "failed", 502, "its host name did not resolve")
    TLS = _Facts("tls", U, "failed", 502, "the TLS handshake failed")
    CONNECT = _Facts("connect", U, "failed", 502, "cannot connect")
    CONNECT_TIMEOUT = _Facts("connect_timeout", U, "failed", 502, "connect timed out")
    RESET = _Facts("reset", R, "failed", 502, "connection lost")
    HTTP_429 = _Facts("http_429", R, "busy", 502, "HTTP 429")
    HTTP_503_BUSY = _Facts("http_503_busy", R, "busy", 502, "HTTP 503 (busy: Retry-After)")
    HTTP_503 = _Facts("http_503", R, "failed", 502, "HTTP 503")
    TRUNCATED = _Facts(
        "truncated", A, "failed", 502, "connection lost while reading the answer", "truncated"
    )
    TIMEOUT = _Facts("timeout", A, "failed", 504, "no answer in time", "timeout")
    HTTP_5XX = _Facts("http_5xx", A, "failed", 502, "HTTP 5xx", "5xx")
    BAD_ANSWER = _Facts("bad_answer", A, "failed", 502, "answered without an image", "bad_answer")
    TOO_LARGE = _Facts("too_large", A, "failed", 502, "answered too much", "bad_answer")
    # -- comfyui and cog --
    # Cog's 409: every prediction slot in use; it ran nothing.
    BUSY = _Facts("busy", R, "busy", 502, "busy (all its slots in use)")
    # ComfyUI's 400 on a workflow it cannot run for reasons not the client's (a LoRA or
    # checkpoint file this worker lacks, a node it does not have): another may have it.
    WORKFLOW_REJECTED = _Facts("workflow_rejected", R, "failed", 502, "refused the workflow")
    # The worker ran the job and says it failed (Cog's status "failed", ComfyUI's
    # execution error): retried as a 5xx is.
    JOB_FAILED = _Facts("job_failed", A, "failed", 502, "the job failed", "5xx")

    REJECTED = _Facts("rejected", F, "answered", 0, "rejected the request")
    NO_WORKER = _Facts("no_worker", F, "none", 502, "no healthy worker")
    DEADLINE = _Facts("deadline", F, "none", 504, "no worker in time")

    @property
    def label(self) -> str:
        return self.value.label

    @property
    def stage(self) -> Stage:
        return self.value.stage

    @property
    def verdict(self) -> Verdict:
        return self.value.verdict

    @property
    def status(self) -> int:
        return self.value.status

    @property
    def says(self) -> str:
        return self.value.says

    @property
    def retry_on(self) -> str | None:
        return self.value.retry_on

    @property
    def budgeted(self) -> bool:
        """Does a retry after it count against the pool's retry budget? Not when the
        worker never got the request: that cost no worker anything."""
        return self.stage is not Stage.UNSENT


RETRY_ON_WORDS = frozenset(cause.retry_on for cause in Cause if cause.retry_on is not None)
