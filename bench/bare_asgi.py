"""The floor under the gateway: a bare ASGI app served the way `gateway serve` serves
(gateway.server's uvicorn config: uvloop, httptools with the head/body/connection
bounds, no access log), answering every POST with the same bytes and nothing else.

    python -m bench.bare_asgi --port P --body-file response.json

bench/overhead.py --yardstick loads it beside nginx and the gateway: what the server
and the kernel cost a request before any of the gateway's own work.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.server import uvicorn_config


def bare_app(body: bytes) -> ASGIApp:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    start: Message = {"type": "http.response.start", "status": 200, "headers": headers}
    answer: Message = {"type": "http.response.body", "body": body}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        while (await receive()).get("more_body"):
            pass
        await send(start)
        await send(answer)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body-file", required=True)
    args = parser.parse_args()
    app = bare_app(Path(args.body_file).read_bytes())
    uvicorn.Server(uvicorn_config(app, log_level="warning", port=args.port)).run()


if __name__ == "__main__":
    main()
