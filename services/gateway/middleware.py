"""Middlewares: metrics per route template, and every refusal as the spec's errors body."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from pymongo.errors import PyMongoError

from callingest import metrics
from callingest.logging import get_logger
from services.gateway.errors import (
    ApiError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    TooManyRequests,
)

log = get_logger(__name__)
SERVICE = "gateway"


def route_label(request: web.Request) -> str:
    """The matched route template (bounded label set), or ``unmatched``."""
    route = request.match_info.route
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every request by method, route template and status."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        key = (request.method, route_label(request), status)
        children = _CHILDREN.get(key)
        if children is None:
            children = _CHILDREN[key] = (
                metrics.HTTP_REQUESTS.labels(SERVICE, key[0], key[1], str(status)),
                metrics.HTTP_REQUEST_DURATION.labels(SERVICE, key[0], key[1]),
            )
        children[0].inc()
        children[1].observe(time.perf_counter() - started)


# Labelled metric children by (method, route template, status): a bounded set
# (route templates, not paths), looked up once instead of on every request.
_CHILDREN: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def error_response(error: ApiError) -> web.Response:
    """The errors body with the error's status (and Retry-After for 429 and 503)."""
    response = web.json_response(error.body(), status=error.status)
    if isinstance(error, ServiceUnavailable | TooManyRequests):
        response.headers["Retry-After"] = str(error.retry_after)
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ApiError and aiohttp's own HTTP errors -> errors body; anything else -> logged 500."""
    try:
        return await handler(request)
    except ApiError as error:
        response = error_response(error)
        if request.content.exception() is not None:
            # The body broke off (a Content-Encoding that does not decode): the rest of this
            # connection's stream cannot be read, so answer and close it, without aiohttp
            # draining the broken body afterwards (an "Unhandled exception" and a reset).
            request.content.feed_eof()
            response.force_close()
        return response
    except web.HTTPRequestEntityTooLarge:
        return error_response(PayloadTooLarge("The request body is larger than 1 MiB."))
    except web.HTTPNotFound:
        return error_response(NotFound("No such resource."))
    except web.HTTPMethodNotAllowed as exc:
        response = error_response(MethodNotAllowed(f"Method {request.method} is not allowed here."))
        response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error_class = exc.reason.replace(" ", "")
        return error_response(ApiError(exc.reason, error_class=error_class, status=exc.status))
    except PyMongoError as exc:
        log.warning("MongoDB unavailable", extra={"error": type(exc).__name__, "detail": str(exc)[:300]})
        return error_response(ServiceUnavailable("The call store is unavailable; retry later."))
    except Exception:
        log.exception("unhandled error", extra={"route": route_label(request)})
        return error_response(ApiError("Internal error.", error_class="InternalError", status=500))
