"""Baseline (c): the HTTP ceiling. A bare aiohttp + uvloop handler that decodes the body with
msgspec and answers 202, nothing else. Run as its own process:
``python -m bench.bare --port P [--socket PATH]``."""

from __future__ import annotations

import argparse
import asyncio
import os

import msgspec
from aiohttp import web

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.encode


async def post_events(request: web.Request) -> web.Response:
    body = await request.read()
    if request.content_type == "application/x-ndjson":
        events = [_decode(line) for line in body.splitlines() if line.strip()]
    else:
        doc = _decode(body)
        events = doc if isinstance(doc, list) else [doc]
    return web.Response(body=_encode({"accepted": len(events)}), status=202,
                        content_type="application/json")


async def otlp_sink(request: web.Request) -> web.Response:
    """An OTLP/HTTP trace receiver that keeps nothing: what exporting spans costs the agent
    (the scenario "tracing on") without a collector's own work in the measurement."""
    await request.read()
    return web.Response(body=b"", status=200, content_type="application/x-protobuf")


async def serve(port: int, socket: str | None) -> None:
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/v1/events", post_events)
    app.router.add_post("/v1/traces", otlp_sink)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    if socket:
        if os.path.exists(socket):
            os.unlink(socket)
        await web.UnixSite(runner, socket).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--socket", default=None)
    args = p.parse_args()
    import uvloop

    uvloop.run(serve(args.port, args.socket))


if __name__ == "__main__":
    main()
