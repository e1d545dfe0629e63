"""``callingest serve webhooks``: the intake (Kafka -> deliveries) and the dispatcher (HTTP).

One process runs both; they share only MongoDB and a wake-up signal, so a slow receiver
never holds up the consumer and a consumer rebalance never holds up deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib

from callingest import infra, mongo
from callingest.logging import configure, get_logger
from callingest.secretbox import load_keyring
from callingest.service import EXIT_FAILED, install_stop_handlers, ops_server, settle_heap
from callingest.settings import Settings
from services.webhooks.dispatch import Dispatcher
from services.webhooks.intake import Intake

log = get_logger(__name__)


async def serve(settings: Settings) -> None:
    load_keyring(settings)  # a missing SECRET_KEYS stops the service before it starts anything
    configure("webhooks", settings.log_level)
    client = mongo.open_client(settings)
    db = mongo.database(client, settings)
    wake = asyncio.Event()
    intake = Intake(settings, db, wake)
    dispatcher = Dispatcher(settings, db, wake)
    stop_requested = asyncio.Event()
    install_stop_handlers(stop_requested.set)
    infrastructure = asyncio.Event()

    async def ready() -> dict[str, bool]:
        if not infrastructure.is_set():
            return {"infrastructure": False}
        return {"kafka_consumer": intake.ready, "mongodb": await mongo.reachable(client)}

    try:
        async with ops_server("webhooks", settings, ready):
            # `callingest admin init` creates the topics and indexes; wait for them.
            checks = [infra.topics_check(settings, intake.subscriptions()),
                      infra.indexes_check(db)]
            try:
                await infra.wait_for(checks, "webhooks", settings.infra_retry_seconds)
            except infra.InfrastructureUnavailable as exc:
                log.error("service failed; exiting with code 1",
                          extra={"service": "webhooks", "reason": str(exc)})
                raise SystemExit(EXIT_FAILED) from None
            settle_heap("webhooks")
            infrastructure.set()
            tasks = {asyncio.create_task(intake.run()), asyncio.create_task(dispatcher.run())}
            stop_task = asyncio.create_task(stop_requested.wait())
            await asyncio.wait({*tasks, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            intake.stop()
            dispatcher.stop()
            stop_task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)
                      and not isinstance(r, asyncio.CancelledError)]
            if failed:
                log.error("webhooks component stopped with an error",
                          extra={"error": type(failed[0]).__name__})
                raise failed[0]
            log.info("stopped cleanly", extra={"service": "webhooks"})
    finally:
        with contextlib.suppress(Exception):
            await client.close()
