"""The deliverer's Kafka side: call outcome events in, pending deliveries out (MongoDB).

It consumes, in its own consumer group, the topics the pipeline already writes:

* ``recordings.normalized`` -> ``call.normalized``;
* ``calls.failed`` -> ``call.failed``;
* ``retry.<stage>.<tier>`` of the call stages -> ``call.retrying`` (a message there is a
  transient failure the stage will try again; the deliverer reads it at once, it does
  not wait for the retry to be due).

For each event and each of the network's webhooks subscribed to its type it inserts one
delivery (``webhook_deliveries``, id ``<event id>/<webhook id>``) holding the frozen body,
then commits the offset. Redelivered events insert nothing new (same ids), so the intake
is idempotent and at-least-once; it never waits on a receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError

from callingest import avro, metrics, tracing
from callingest.callview import call_view, format_utc
from callingest.kafka import client_options
from callingest.logging import get_logger
from callingest.retry_tiers import DEFERRED_HEADER, failed_tries, header
from callingest.settings import Settings
from callingest.stages import CALL_STAGES
from callingest.topics import Topics
from callingest.webhooks import event_id

log = get_logger(__name__)


class Intake:
    """Turns call outcome events into pending deliveries; :meth:`run` until :meth:`stop`."""

    def __init__(self, settings: Settings, db: AsyncDatabase[dict[str, Any]],
                 wake: asyncio.Event | None = None) -> None:
        self.settings = settings
        self.db = db
        self.topics = Topics(settings.topic_prefix, retry_tiers=len(settings.retry_delays_seconds))
        self.retry_topics = {self.topics.retry(stage, tier): stage for stage in CALL_STAGES
                             for tier in range(self.topics.retry_tiers)}
        self.wake = wake or asyncio.Event()
        self.ready = False
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    def subscriptions(self) -> list[str]:
        return [self.topics.normalized, self.topics.failed, *self.retry_topics]

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers,
            **client_options(self.settings),
            group_id=f"{self.settings.topic_prefix}callingest-webhooks",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id="callingest-webhooks",
            session_timeout_ms=10000,
            heartbeat_interval_ms=3000,
        )
        consumer.subscribe(self.subscriptions())
        await consumer.start()
        self.ready = True
        try:
            while not self._stopping.is_set():
                try:
                    batches = await consumer.getmany(timeout_ms=300, max_records=100)
                except KafkaError as exc:
                    log.warning("fetch failed, retrying", extra={"error": type(exc).__name__})
                    await asyncio.sleep(1.0)
                    continue
                if not batches:
                    continue
                for records in batches.values():
                    for record in records:
                        await self._handle_until_done(record)
                with contextlib.suppress(KafkaError):
                    await consumer.commit()
                    await self._report_lag(consumer)
        finally:
            self.ready = False
            with contextlib.suppress(Exception):
                await consumer.commit()
            await consumer.stop()

    async def _report_lag(self, consumer: AIOKafkaConsumer) -> None:
        """callingest_consumer_lag_messages for the intake (the consumer-lag alert covers it)."""
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is not None:
                lag = max(0, highwater - await consumer.position(tp))
                metrics.CONSUMER_LAG.labels("webhooks", tp.topic, str(tp.partition)).set(lag)

    async def _handle_until_done(self, record: ConsumerRecord) -> None:
        delay = 0.5
        while True:
            try:
                with tracing.consumer_span("webhooks", record.topic, record.headers):
                    await self.handle(record)
                return
            except PyMongoError as exc:
                log.warning("MongoDB unavailable, retrying in place",
                            extra={"topic": record.topic, "offset": record.offset,
                                   "error": type(exc).__name__})
                await asyncio.sleep(delay + random.uniform(0, delay))
                delay = min(delay * 2, 10.0)
            except Exception:
                # A poison event (a call document the view cannot be built from) must not
                # stop every other network's webhooks: logged, counted, skipped.
                log.exception("event could not be turned into webhooks; skipped",
                              extra={"topic": record.topic, "offset": record.offset})
                metrics.WEBHOOK_EVENTS.labels("skipped").inc()
                return

    async def handle(self, record: ConsumerRecord) -> int:
        """Insert the deliveries of one Kafka message; returns how many were new."""
        try:
            _name, event = avro.decode(record.value)
        except avro.UndecodableMessage as exc:
            log.warning("undecodable message skipped", extra={"topic": record.topic,
                                                              "offset": record.offset,
                                                              "reason": str(exc)})
            return 0
        cuid = str(event["cuid"])
        tracing.set_cuid(cuid)
        attempt = int(event.get("attempt", 1))
        occurred = event.get("occurred_at")
        if record.topic == self.topics.normalized:
            event_type, detail = "call.normalized", ""
        elif record.topic == self.topics.failed:
            event_type, detail = "call.failed", ""
        elif record.topic in self.retry_topics:
            if header(record, DEFERRED_HEADER):
                return 0  # deferred untried (host busy): not a failed try, nothing to tell
            event_type = "call.retrying"
            detail = f"{self.retry_topics[record.topic]}_{failed_tries(record)}"
            occurred = datetime.fromtimestamp(record.timestamp / 1000.0, UTC)
        else:
            return 0
        network = await self.db.networks.find_one({"_id": event["network_id"]}, {"webhooks": 1})
        endpoints = [w for w in (network or {}).get("webhooks") or [] if event_type in w["events"]]
        if not endpoints:
            return 0
        call = await self.db.calls.find_one({"_id": cuid})
        if call is None:
            log.warning("event for an unknown call; no webhook", extra={"cuid": cuid})
            return 0
        if not isinstance(occurred, datetime):
            occurred = datetime.now(UTC)
        msg_id = event_id(event_type, cuid, attempt, detail)
        body = json.dumps({"type": event_type, "timestamp": format_utc(occurred),
                           "data": call_view(call)}, separators=(",", ":"), ensure_ascii=False)
        now = datetime.now(UTC)
        created = 0
        for endpoint in endpoints:
            try:
                await self.db.webhook_deliveries.insert_one({
                    "_id": f"{msg_id}/{endpoint['id']}",
                    "event_id": msg_id,
                    "type": event_type,
                    "cuid": cuid,
                    "network_id": event["network_id"],
                    "webhook_id": endpoint["id"],
                    "endpoint": f"{event['network_id']}/{endpoint['id']}",
                    "body": body,
                    "occurred_at": occurred,
                    "created_at": now,
                    "status": "pending",
                    "next_attempt_at": now,
                    "attempts_made": 0,
                    "attempts": [],
                    # the call's trace, continued by each attempt's traceparent header
                    "trace_context": tracing.current_carrier(),
                })
                created += 1
                metrics.WEBHOOK_EVENTS.labels(event_type).inc()
            except DuplicateKeyError:
                continue
        if created:
            self.wake.set()
            log.info("webhook deliveries queued", extra={"cuid": cuid, "event_id": msg_id,
                                                         "type": event_type, "count": created})
        return created

