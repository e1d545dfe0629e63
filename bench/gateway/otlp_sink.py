"""A loopback OTLP/HTTP trace receiver for benchmarks: answers every export, parses nothing.

Usage: python bench/gateway/otlp_sink.py PORT   (prints the export count and bytes on SIGTERM)
"""

from __future__ import annotations

import sys

from aiohttp import web

received = {"exports": 0, "bytes": 0}


async def export(request: web.Request) -> web.Response:
    body = await request.read()
    received["exports"] += 1
    received["bytes"] += len(body)
    return web.Response(body=b"", content_type="application/x-protobuf")


async def report(_: web.Application) -> None:
    print(f"exports={received['exports']} bytes={received['bytes']}", flush=True)


if __name__ == "__main__":
    app = web.Application()
    app.router.add_post("/v1/traces", export)
    app.on_shutdown.append(report)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
