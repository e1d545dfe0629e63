"""Running a service: settings, logging, connections, ops endpoints and SIGTERM handling."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from aiohttp import web
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from callingest import mongo
from callingest.http import add_ops_routes
from callingest.kafka import Producer
from callingest.logging import configure, get_logger
from callingest.pipeline import Stage, StageRunner
from callingest.settings import DEFAULT_PORTS, Settings
from callingest.topics import Topics, ensure_topics

log = get_logger(__name__)

StageFactory = Callable[[Settings, AsyncDatabase[dict[str, Any]], Topics],
                        AbstractAsyncContextManager[Stage]]


def port_of(service: str, settings: Settings) -> int:
    return settings.http_port if settings.http_port is not None else DEFAULT_PORTS[service]


async def prepare_infrastructure(settings: Settings) -> None:
    """Create every topic, index and the bucket the platform needs; idempotent."""
    topics = Topics(settings.topic_prefix, retry_tiers=len(settings.retry_delays_seconds))
    await ensure_topics(settings.kafka_bootstrap_servers, topics.all(),
                        settings.topic_partitions, settings.topic_replication_factor)
    client = mongo.open_client(settings)
    try:
        await mongo.ensure_indexes(mongo.database(client, settings))
    finally:
        await client.close()
    from callingest import s3

    async with s3.s3_client(settings) as s3c:
        await s3.ensure_bucket(s3c, settings.s3_bucket)


@contextlib.asynccontextmanager
async def ops_server(service: str, settings: Settings, ready: Any) -> AsyncIterator[web.AppRunner]:
    """Serve /healthz, /readyz and /metrics on the service's port while the block runs."""
    app = web.Application()
    add_ops_routes(app, ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, port_of(service, settings))
    await site.start()
    try:
        yield runner
    finally:
        await runner.cleanup()


def install_stop_handlers(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)


async def run_stage_service(service: str, factory: StageFactory, settings: Settings) -> None:
    """Run one pipeline service until SIGTERM/SIGINT; drains in-flight work before returning."""
    configure(service, settings.log_level)
    await prepare_infrastructure(settings)
    topics = Topics(settings.topic_prefix, retry_tiers=len(settings.retry_delays_seconds))
    client = mongo.open_client(settings)
    db = mongo.database(client, settings)
    producer = Producer(settings.kafka_bootstrap_servers, service)
    await producer.start()
    stop_requested = asyncio.Event()
    install_stop_handlers(stop_requested.set)
    try:
        async with factory(settings, db, topics) as stage:
            runner = StageRunner(stage, settings, db, producer, service)

            async def ready() -> dict[str, bool]:
                mongo_ok = True
                try:
                    await asyncio.wait_for(client.admin.command("ping"), 2.0)
                except (TimeoutError, PyMongoError):
                    mongo_ok = False
                return {"kafka_consumer": runner.ready, "kafka_producer": producer.started,
                        "mongodb": mongo_ok}

            async with ops_server(service, settings, ready):
                run_task = asyncio.create_task(runner.run())
                stop_task = asyncio.create_task(stop_requested.wait())
                await asyncio.wait({run_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
                runner.stop()
                stop_task.cancel()
                await run_task
                log.info("stopped cleanly", extra={"service": service})
    finally:
        await producer.stop()
        await client.close()
