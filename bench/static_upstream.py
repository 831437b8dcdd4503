"""A static responder that costs almost no CPU: the upstream for measuring the
gateway's own overhead. Answers every request with the same image response, keep-alive
(bench/overhead.py writes a real JPEG's: the gateway checks it like any answer), or,
given routes, each route with its own precomputed answer: the shape of a server that
answers in several exchanges (ComfyUI: /prompt, /history/{id}, /view; Cog:
/predictions, /health-check).

    python -m bench.static_upstream --port P --body-file response.json
    python -m bench.static_upstream --port P --routes routes.json [--body-file F]

routes.json maps "METHOD /path" to [body file, content type]; a path ending in `*`
matches every path it begins (`GET /history/*`); the query string is not read. A
request no route matches gets --body-file's answer, or a 404 without one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Mapping
from pathlib import Path

import uvloop

NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


class Routes:
    """Each route's whole HTTP response, built once: a request costs a lookup."""

    def __init__(self, answers: Mapping[str, bytes], default: bytes | None) -> None:
        self.exact = {key.encode(): r for key, r in answers.items() if not key.endswith("*")}
        self.prefixes = [(key[:-1].encode(), r) for key, r in answers.items() if key.endswith("*")]
        self.default = NOT_FOUND if default is None else default

    def response(self, request_line: bytes) -> bytes:
        method, _, rest = request_line.partition(b" ")
        key = method + b" " + rest.partition(b" ")[0].partition(b"?")[0]
        found = self.exact.get(key)
        if found is not None:
            return found
        return next((r for prefix, r in self.prefixes if key.startswith(prefix)), self.default)


class StaticHTTP(asyncio.Protocol):
    def __init__(self, routes: Routes) -> None:
        self.routes = routes
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
            request_line = self.buffer[: self.buffer.find(b"\r\n")]
            self.buffer = self.buffer[end + 4 + length :]
            assert self.transport is not None
            self.transport.write(self.routes.response(request_line))


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def http_response(body: bytes, content_type: str = "application/json") -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def read_routes(path: Path) -> dict[str, bytes]:
    """routes.json's routes as whole responses."""
    table = json.loads(path.read_text())
    return {
        key: http_response(Path(file).read_bytes(), kind) for key, (file, kind) in table.items()
    }


async def serve(port: int, routes: Routes) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StaticHTTP(routes), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body-file", help="the answer to every request no route matches")
    parser.add_argument("--routes", type=Path, help="JSON: 'METHOD /path' -> [file, type]")
    args = parser.parse_args()
    if args.body_file is None and args.routes is None:
        parser.error("give --body-file, --routes or both")
    default = None if args.body_file is None else http_response(Path(args.body_file).read_bytes())
    answers = {} if args.routes is None else read_routes(args.routes)
    uvloop.run(serve(args.port, Routes(answers, default)))


if __name__ == "__main__":
    main()
