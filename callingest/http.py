"""The operational endpoints every service serves: /healthz, /readyz, /metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from callingest import metrics

ReadyCheck = Callable[[], Awaitable[dict[str, bool]]]


def add_ops_routes(app: web.Application, ready: ReadyCheck) -> None:
    """Add /healthz (the process is alive), /readyz (every dependency answers) and /metrics."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        checks = await ready()
        ok = all(checks.values())
        return web.json_response({"status": "ready" if ok else "not ready", "checks": checks},
                                 status=200 if ok else 503)

    async def metrics_view(_: web.Request) -> web.Response:
        body, content_type = metrics.render_latest()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
