"""The physical limit of this front door: one aiohttp process that parses the JSON and answers 201.

Usage: python bench/gateway/bare_server.py PORT
"""

from __future__ import annotations

import json
import sys

from aiohttp import web


async def submit(request: web.Request) -> web.Response:
    body = json.loads(await request.read())
    return web.json_response({"cuid": str(len(body))}, status=201)


def main() -> None:
    app = web.Application()
    app.router.add_post("/api/2022-03-01/calls.json", submit)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
