"""Running the gateway: ``serve(settings)`` is what ``callingest serve gateway`` calls.

With ``GATEWAY_WORKERS`` > 1 the parent process starts that many worker
processes that each bind the port with SO_REUSEPORT (the kernel spreads
connections) and share metrics through ``PROMETHEUS_MULTIPROC_DIR``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import tempfile

from aiohttp import web

from callingest.logging import configure, get_logger
from callingest.service import install_stop_handlers, port_of, settle_heap
from callingest.settings import Settings
from services.gateway.app import init_app

log = get_logger(__name__)


async def serve(settings: Settings, *, with_metrics: bool = True, scans_unpublished: bool = True) -> None:
    """Serve the gateway until SIGTERM/SIGINT; with several workers, supervise them.
    ``scans_unpublished=False`` (benchmarks only): no process scans for unpublished calls."""
    configure("gateway", settings.log_level)
    if settings.gateway_workers > 1:
        await _supervise(settings, with_metrics, scans_unpublished)
    else:
        await serve_one(settings, with_metrics=with_metrics, scans_unpublished=scans_unpublished)


async def serve_one(settings: Settings, *, with_metrics: bool = True, reuse_port: bool = False,
                    scans_unpublished: bool = True) -> None:
    """One gateway process on ``http_host:port``; returns after a graceful shutdown."""
    app = init_app(settings, with_metrics=with_metrics, scans_unpublished=scans_unpublished)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = port_of("gateway", settings)
    site = web.TCPSite(runner, settings.http_host, port, reuse_port=reuse_port or None)
    await site.start()
    settle_heap("gateway")
    log.info("gateway listening", extra={"host": settings.http_host, "port": port, "pid": os.getpid()})
    stop = asyncio.Event()
    install_stop_handlers(stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        log.info("gateway stopped", extra={"pid": os.getpid()})


def _worker(settings: Settings, with_metrics: bool, scans_unpublished: bool) -> None:
    configure("gateway", settings.log_level)
    asyncio.run(serve_one(settings, with_metrics=with_metrics, reuse_port=True,
                          scans_unpublished=scans_unpublished))


async def _supervise(settings: Settings, with_metrics: bool, scans_unpublished: bool) -> None:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="callingest-gateway-metrics-")
    context = multiprocessing.get_context("spawn")
    workers = [
        # One worker scans for calls other gateways left unpublished; every worker retries its own.
        context.Process(target=_worker, args=(settings, with_metrics, scans_unpublished and i == 0),
                        name=f"gateway-{i}")
        for i in range(settings.gateway_workers)
    ]
    for worker in workers:
        worker.start()
    stop = asyncio.Event()
    install_stop_handlers(stop.set)
    loop = asyncio.get_running_loop()
    watch = [loop.run_in_executor(None, w.join) for w in workers]
    done = asyncio.ensure_future(asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED))
    await asyncio.wait([done, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    for worker in workers:
        if worker.is_alive() and worker.pid is not None:
            os.kill(worker.pid, signal.SIGTERM)
    await asyncio.gather(*watch)
    log.info("gateway workers stopped")
