"""The HTTP/1.1 protocol the gateway is served with: uvicorn's httptools protocol with
a bound on the size of a request's head (request line plus headers).

httptools itself sets none: measured here, uvicorn 0.54 with httptools 0.9 took a
2 MB header and passed it to the app, buffering it all on the way (uvicorn's
`h11_max_incomplete_event_size` bounds only its slower h11 protocol). Two checks,
both answering 431 and closing the connection:

- a head that arrives whole is measured when its headers are complete (URL plus
  header names and values), once per request;
- a head still unfinished after a read is counted read by read, so one endless
  header cannot grow the buffer past the limit plus one read.

It also answers requests httptools cannot parse in the gateway's JSON error shape
(uvicorn's own 400 is plain text).
"""

from __future__ import annotations

import json
import os

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import HeadersTooLarge


class _HeadTooLarge(Exception):
    """Raised in a parser callback to stop parsing; uvicorn then calls send_400_response."""


ENV_MAX_HEAD_BYTES = "GATEWAY_MAX_HEADER_BYTES"
DEFAULT_MAX_HEAD_BYTES = 16 * 1024
# What `gateway serve` names to uvicorn: an import string, because `--workers N`
# sends its config to fresh processes, which import this class and read the bound
# from the environment `bound_head_size` set.
SERVED_PROTOCOL = "gateway.server:BoundedHttpToolsProtocol"


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes = int(os.environ.get(ENV_MAX_HEAD_BYTES, DEFAULT_MAX_HEAD_BYTES))

    _in_head = False  # a request's head has begun and is not complete
    _begun = 0  # requests begun on this connection
    _unfinished = 0  # bytes of reads that began and ended inside the current head
    _too_large = False

    def data_received(self, data: bytes) -> None:
        begun = self._begun
        super().data_received(data)
        # Only a read that began and ended inside one head is counted: every byte of
        # it is head. The read a head starts in (which may end another request's
        # body) is not: that leaves the buffer bounded by the limit plus one read.
        if self._in_head and self._begun == begun and not self.transport.is_closing():
            self._unfinished += len(data)
            if self._unfinished > self.max_head_bytes:
                self._refuse_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._unfinished = True, 0
        self._begun += 1

    def on_headers_complete(self) -> None:
        self._in_head = False
        size = len(self.url) + sum(len(name) + len(value) for name, value in self.headers)
        if size > self.max_head_bytes:
            self._too_large = True
            raise _HeadTooLarge
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if self._too_large:
            self._refuse_head()
        else:
            self._answer_and_close(400, "Bad Request", msg)

    def _refuse_head(self) -> None:
        exc = HeadersTooLarge(self.max_head_bytes)
        self._answer_and_close(exc.status_code, "Request Header Fields Too Large", exc.detail)

    def _answer_and_close(self, status: int, reason: str, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        self.transport.close()


def bound_head_size(max_head_bytes: int) -> None:
    """The bound for SERVED_PROTOCOL, in this process and the ones it starts."""
    os.environ[ENV_MAX_HEAD_BYTES] = str(max_head_bytes)
    BoundedHttpToolsProtocol.max_head_bytes = max_head_bytes


def bounded_protocol(max_head_bytes: int) -> type[BoundedHttpToolsProtocol]:
    """A protocol class for one in-process server (uvicorn takes a class, not an
    instance): the demo's, and tests' that run several bounds side by side."""

    class Bounded(BoundedHttpToolsProtocol):
        pass

    Bounded.max_head_bytes = max_head_bytes
    return Bounded
