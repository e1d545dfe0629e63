"""The gateway's aiohttp application: ``init_app`` wires resources, middlewares and routes.

Resources (MongoDB client, Kafka producer, S3 client, the background
republisher) are opened and closed in ``cleanup_ctx`` generators, in that
order, and closed in reverse order on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from callingest import infra, mongo, s3, tracing
from callingest.http import add_ops_routes
from callingest.kafka import PublishError, TopicScanner, client_options
from callingest.logging import get_logger
from callingest.settings import Settings, ip_networks
from callingest.tasks import cancel_and_wait
from callingest.topics import Topics
from services.gateway import keys
from services.gateway.auth import FailureThrottle, TokenAuthenticator
from services.gateway.calls import CallService, ConfigCache
from services.gateway.middleware import error_middleware, metrics_middleware, route_label
from services.gateway.openapi import build_openapi
from services.gateway.publisher import CallPublisher, gateway_producer
from services.gateway.republisher import Republisher
from services.gateway.routes import setup_routes
from services.gateway.views import MAX_BODY_BYTES
from services.gateway.writer import CallWriter

log = get_logger(__name__)


async def mongo_ctx(app: web.Application) -> AsyncIterator[None]:
    """MongoDB client and database (their indexes: ``callingest admin init``, see infra_ctx)."""
    settings = app[keys.SETTINGS]
    client = mongo.open_client(settings)
    db = mongo.database(client, settings)
    app[keys.MONGO_CLIENT] = client
    app[keys.DB] = db
    app[keys.AUTHENTICATOR] = TokenAuthenticator(db, settings.auth_cache_seconds)
    app[keys.AUTH_THROTTLE] = FailureThrottle(settings.auth_failure_threshold,
                                              settings.auth_failure_window_seconds,
                                              ip_networks(settings.trusted_proxies))
    writer = CallWriter(db)
    writer.start()
    app[keys.WRITER] = writer
    yield
    await writer.stop()
    await client.close()


async def kafka_ctx(app: web.Application) -> AsyncIterator[None]:
    """The Kafka producer (started lazily: the gateway serves 503s while Kafka is down)."""
    settings = app[keys.SETTINGS]
    producer = gateway_producer(settings.kafka_bootstrap_servers, client_options(settings))
    with contextlib.suppress(PublishError):
        await producer.ensure_started()
    publisher = CallPublisher(app[keys.DB], app[keys.WRITER], producer, Topics(settings.topic_prefix),
                              TopicScanner(settings.kafka_bootstrap_servers, "gateway",
                                           options=client_options(settings)))
    app[keys.PRODUCER] = producer
    app[keys.PUBLISHER] = publisher
    app[keys.CALL_SERVICE] = CallService(
        app[keys.DB],
        app[keys.WRITER],
        ConfigCache(app[keys.DB], settings.auth_cache_seconds),
        publisher,
        frozenset(settings.s3_allowed_source_buckets),
    )
    yield
    await producer.stop()
    await publisher.close()


async def s3_ctx(app: web.Application) -> AsyncIterator[None]:
    """The S3 client that serves normalized recordings."""
    async with s3.s3_client(app[keys.SETTINGS]) as client:
        app[keys.S3_CLIENT] = client
        yield


async def infra_ctx(app: web.Application) -> AsyncIterator[None]:
    """Verifies in the background that ``callingest admin init`` created the topics, indexes
    (idempotency relies on the unique one) and bucket; not ready until then."""
    settings = app[keys.SETTINGS]
    present = asyncio.Event()
    app[keys.INFRASTRUCTURE] = present
    checks = [infra.topics_check(settings, [Topics(settings.topic_prefix).submitted]),
              infra.indexes_check(app[keys.DB]),
              infra.bucket_check(app[keys.S3_CLIENT], settings.s3_bucket)]

    async def verify() -> None:
        await infra.wait_for(checks, "gateway", float("inf"))
        present.set()

    task = asyncio.create_task(verify())
    yield
    await cancel_and_wait(task, "gateway infrastructure check")


async def republisher_ctx(app: web.Application) -> AsyncIterator[None]:
    """Background task publishing calls left unpublished (Kafka was down when they came)."""
    after = app[keys.SETTINGS].republish_after_seconds
    republisher = Republisher(app[keys.DB], app[keys.PUBLISHER])
    task = asyncio.create_task(republisher.run(
        max(after / 2, 0.5), after, scans=app[keys.SCANS_UNPUBLISHED]))
    yield
    republisher.stop()  # its loop ends even if the cancellation below is swallowed
    await cancel_and_wait(task, "gateway republisher")


def init_app(settings: Settings, *, with_metrics: bool = True,
             scans_unpublished: bool = True) -> web.Application:
    """The gateway application for ``settings`` (``with_metrics=False`` only for benchmarks).

    ``scans_unpublished=False``: this process only retries its own failed publications and
    leaves the scans for calls of stopped gateways to another (one worker of several).
    """
    middlewares: list[Any] = [tracing.http_server_middleware(route_label)]
    if with_metrics:
        middlewares.append(metrics_middleware)
    middlewares.append(error_middleware)
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[keys.SETTINGS] = settings
    app[keys.SCANS_UNPUBLISHED] = scans_unpublished
    app[keys.OPENAPI] = build_openapi(settings.public_base_url)
    app.cleanup_ctx.extend([mongo_ctx, kafka_ctx, s3_ctx, infra_ctx, republisher_ctx])
    setup_routes(app)

    async def ready() -> dict[str, bool]:
        mongo_ok = await mongo.reachable(app[keys.MONGO_CLIENT])
        kafka_ok = app[keys.PRODUCER].started
        if not kafka_ok:
            with contextlib.suppress(PublishError):
                await app[keys.PRODUCER].ensure_started()
                kafka_ok = True
        return {"infrastructure": app[keys.INFRASTRUCTURE].is_set(), "mongodb": mongo_ok,
                "kafka_producer": kafka_ok}

    add_ops_routes(app, ready)
    return app
