"""Running a service: settings, logging, connections, ops endpoints and SIGTERM handling."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from callingest import infra, kafka, mongo, stages
from callingest.http import add_ops_routes
from callingest.infra import prepare_infrastructure
from callingest.kafka import Producer
from callingest.logging import configure, get_logger
from callingest.pipeline import ConsumerFailed, StageRunner
from callingest.settings import Settings
from callingest.steps import Resources, Stage, Step
from callingest.topics import Topics

log = get_logger(__name__)

EXIT_FAILED = 1
"""Exit code of a consumer that failed (crash-only: Kubernetes restarts it)."""

__all__ = ["EXIT_FAILED", "ops_server", "port_of", "prepare_infrastructure", "run_stage_service",
           "settle_heap"]

GC_THRESHOLDS = (10_000, 10, 10)
"""The collector's thresholds in a running service (CPython's default: 700, 10, 10).

A request or message leaves a few thousand containers alive for a moment; at 700 the
gateway collected its youngest generation about 150 times a second under load (12-18 us of
CPU per submission), at 10,000 a few times a second with tracing on, hardly ever with it off
(under 0.2 us; 5-7 us traced; docs/benchmarks.md, cost of tracing)."""


def settle_heap(service: str) -> None:
    """Call when ``service`` has started (imports done, app and clients built): collect once,
    move what is left (modules, the app, clients: it lives as long as the process) out of the
    collector's reach with :func:`gc.freeze`, so that full collections walk only what requests
    leave behind, and collect young objects less often (:data:`GC_THRESHOLDS`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    log.info("start-up heap frozen", extra={"service": service, "frozen_objects": gc.get_freeze_count(),
                                            "gc_thresholds": list(gc.get_threshold())})


def port_of(service: str, settings: Settings) -> int:
    return settings.http_port if settings.http_port is not None else stages.SERVICE_PORTS[service]


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


async def run_stage_service(service: str, step: Step[Any], settings: Settings) -> None:
    """Run the stage ``service`` of the stage graph with ``step`` until SIGTERM/SIGINT;
    drains in-flight work before returning.

    Its topics, events, status, retry policy and port come from :data:`callingest.stages.STAGES`;
    its resources are the type the graph names, opened for the life of the service. Not
    ready until the infrastructure ``callingest admin init`` creates exists (the resources'
    ``checks`` add their own, e.g. the bucket). Crash-only: if the consumer fails
    (:class:`~callingest.pipeline.ConsumerFailed`, or the infrastructure cannot be reached for
    ``INFRA_RETRY_SECONDS``), finished work is committed and the process exits with code 1.
    """
    configure(service, settings.log_level)
    spec = stages.stage(service)
    resources_type = spec.resources_type()
    if not issubclass(resources_type, Resources):
        raise TypeError(f"{spec.resources} is not a callingest.steps.Resources")
    topics = Topics(settings.topic_prefix, retry_tiers=len(settings.retry_delays_seconds))
    client = mongo.open_client(settings)
    db = mongo.database(client, settings)
    producer = Producer(settings.kafka_bootstrap_servers, service,
                        options=kafka.client_options(settings))
    stop_requested = asyncio.Event()
    install_stop_handlers(stop_requested.set)
    runner: StageRunner | None = None
    infrastructure_ok = False

    async def ready() -> dict[str, bool]:
        if not infrastructure_ok or runner is None:
            return {"infrastructure": False}
        return {"infrastructure": runner.infrastructure_ok, "kafka_consumer": runner.ready,
                "kafka_producer": producer.started, "mongodb": await mongo.reachable(client)}

    failed = False
    try:
        async with ops_server(service, settings, ready), \
                resources_type.open(settings) as resources:
            stage = Stage(spec, step, resources)
            checks = [infra.topics_check(settings, topics.all()), infra.indexes_check(db),
                      *resources.checks(settings)]
            waiting = asyncio.create_task(infra.wait_for(checks, service,
                                                          settings.infra_retry_seconds))
            stop_task = asyncio.create_task(stop_requested.wait())
            await asyncio.wait({waiting, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():
                waiting.cancel()
                return
            waiting.result()
            infrastructure_ok = True
            await producer.start()
            runner = StageRunner(stage, settings, db, producer, service)
            settle_heap(service)
            run_task = asyncio.create_task(runner.run())
            await asyncio.wait({run_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            runner.stop()
            stop_task.cancel()
            await run_task
            log.info("stopped cleanly", extra={"service": service})
    except (ConsumerFailed, infra.InfrastructureUnavailable) as exc:
        log.error("service failed; exiting with code 1", extra={"service": service,
                                                                "reason": str(exc)})
        failed = True
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), 15.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 5.0)
    if failed:
        raise SystemExit(EXIT_FAILED)
