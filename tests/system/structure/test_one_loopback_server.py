"""One loopback HTTP server helper for tests (issue 13): recording servers and webhook
receivers alike are ``tests.helpers.serve_recordings``."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from aiohttp import web

from tests.conftest import ROOT
from tests.helpers import serve_recordings

#: Servers of their own for a reason: a fixed port a real Prometheus scrapes.
OWN_SERVER_ALLOWED = {"tests/helpers.py", "tests/system/obs/test_live_observability.py"}


def test_no_test_starts_an_http_server_of_its_own() -> None:
    own = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "tests").rglob("*.py")
                 if path != Path(__file__) and "web.TCPSite(" in path.read_text(encoding="utf-8"))
    assert set(own) <= OWN_SERVER_ALLOWED, own


async def test_a_webhook_receiver_on_the_helper() -> None:
    received: list[bytes] = []

    async def hook(request: web.Request) -> web.StreamResponse:
        received.append(await request.read())
        return web.Response(status=204)

    runner, base = await serve_recordings(hook, 0.5, prefix="", method="POST")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/hook", data=b"{}") as answer:
                assert answer.status == 204
            async with http.get(f"{base}/hook") as answer:
                assert answer.status == 405
    finally:
        await runner.cleanup()
    assert received == [b"{}"]
