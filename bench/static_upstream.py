"""A static responder that costs almost no CPU: the upstream for measuring the
gateway's own overhead. Answers every POST with the same image response, keep-alive
(bench/overhead.py writes a real JPEG's: the gateway checks it like any answer).

    python -m bench.static_upstream --port P --body-file response.json
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import uvloop


class StaticHTTP(asyncio.Protocol):
    def __init__(self, response: bytes) -> None:
        self.response = response
        self.buffer = b""
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not an asyncio.Transport subclass, but it writes.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            length = _content_length(self.buffer[:end])
            if len(self.buffer) < end + 4 + length:
                return  # the body is still arriving
            self.buffer = self.buffer[end + 4 + length :]
            assert self.transport is not None
            self.transport.write(self.response)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def http_response(body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def serve(port: int, body: bytes) -> None:
    loop = asyncio.get_running_loop()
    response = http_response(body)
    server = await loop.create_server(lambda: StaticHTTP(response), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body-file", required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port, Path(args.body_file).read_bytes()))


if __name__ == "__main__":
    main()
