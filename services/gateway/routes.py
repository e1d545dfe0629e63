"""URL map of the gateway."""

from __future__ import annotations

from aiohttp import web

from services.gateway import views

V = views.API_VERSION


def setup_routes(app: web.Application) -> None:
    """The API routes of version 2022-03-01, and a 400 for every other version."""
    app.router.add_post(f"/api/{V}/calls.json", views.submit_call)
    app.router.add_put(f"/api/{V}/calls.json", views.submit_call)
    app.router.add_get(f"/api/{V}/calls.json", views.list_calls)
    app.router.add_post(f"/api/{V}/calls/{{cuid}}/retry.json", views.retry_call)
    app.router.add_get(f"/api/{V}/calls/{{cuid}}.json", views.get_call)
    app.router.add_get(f"/api/{V}/calls/{{cuid}}/recording.wav", views.get_recording)
    app.router.add_get(f"/api/{V}/openapi.json", views.openapi)
    app.router.add_route("*", r"/api/{version:(?!" + V + r"/)[^/]+}/{tail:.*}", views.other_api_version)
    # Another version with nothing after it (``/api/2020-10-01``) is the same mistake.
    app.router.add_route("*", r"/api/{version:(?!" + V + r"$)[^/]+}", views.other_api_version)
