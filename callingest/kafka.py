"""Kafka producer shared by every service: Avro-encoded, acks=all, idempotent."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, OutOfOrderSequenceNumber, UnknownProducerId
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import DefaultPartitioner

from callingest import avro, metrics, tracing
from callingest.logging import get_logger
from callingest.settings import Settings

log = get_logger(__name__)

EVENT_NAMESPACE = uuid.UUID("6f1c8e0a-6a43-4d7e-9b0e-2f7a3c1d5e01")


def event_id(cuid: str, stage: str, attempt: int) -> str:
    """Deterministic event id: a redelivered step republishes the same id."""
    return str(uuid.uuid5(EVENT_NAMESPACE, f"{cuid}/{stage}/{attempt}"))


def client_options(settings: Settings) -> dict[str, Any]:
    """Security options for every Kafka client (producer, consumer, admin) of ``settings``:
    ``KAFKA_SECURITY_PROTOCOL`` PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL; SASL PLAIN or
    SCRAM-SHA-256/512 with ``KAFKA_SASL_USERNAME``/``KAFKA_SASL_PASSWORD``; TLS verified
    against ``KAFKA_SSL_CAFILE`` or the system's CAs."""
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(cafile=settings.kafka_ssl_cafile)
    if protocol.startswith("SASL_"):
        options.update(sasl_mechanism=settings.kafka_sasl_mechanism,
                       sasl_plain_username=settings.kafka_sasl_username,
                       sasl_plain_password=settings.kafka_sasl_password.get_secret_value())
    return options


class PublishError(Exception):
    """Kafka did not acknowledge the event (broker unavailable or timed out).

    ``pending`` is the delivery future of a send that was handed to the producer
    but not answered within the caller's timeout: the producer may still deliver
    it, and only once it is done is the outcome known (it is never cancelled).
    """

    def __init__(self, message: str, pending: asyncio.Future[Any] | None = None) -> None:
        super().__init__(message)
        self.pending = pending


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a delivery future's outcome as seen (nobody may be waiting for it any more)."""
    if not fut.cancelled():
        fut.exception()


class Producer:
    """Publishes events and returns only once Kafka acknowledged them (acks=all).

    :meth:`start` connects at once (a service that cannot work without Kafka);
    :meth:`ensure_started` starts it on first use instead and again after a failed start or
    a dead sender, at most once per ``restart_interval`` seconds (the gateway, which must
    come up and answer 503 while Kafka is down). ``options``: the security options
    (:func:`client_options`).
    """

    def __init__(self, bootstrap_servers: str, service: str, request_timeout_ms: int = 10000,
                 restart_interval: float = 1.0, options: dict[str, Any] | None = None) -> None:
        self.service = service
        self._options = {
            **(options or {}),
            "bootstrap_servers": bootstrap_servers,
            "acks": "all",
            "enable_idempotence": True,
            # linger 2 ms measured ~3 ms per acknowledged send (p50); with 0, sends that arrive while a
            # request is in flight still batch (aiokafka keeps one request in flight per broker)
            "linger_ms": 0,
            "request_timeout_ms": request_timeout_ms,
            "retry_backoff_ms": 200,
            "client_id": f"callingest-{service}",
        }
        self._producer = AIOKafkaProducer(**self._options)
        self._started = False
        self._restart_lock = asyncio.Lock()
        self._broken = False
        self._restart_interval = restart_interval
        self._start_timeout = request_timeout_ms / 1000
        self._last_start = -restart_interval

    async def ensure_started(self) -> None:
        """Make sure the producer runs; raises :class:`PublishError` if Kafka cannot be
        reached within the request timeout (or a start was tried less than
        ``restart_interval`` seconds ago)."""
        if self.started:
            return
        async with self._restart_lock:
            if self.started:
                return
            if time.monotonic() - self._last_start < self._restart_interval:
                raise PublishError("Kafka is unavailable")
            self._last_start = time.monotonic()
            old, self._producer = self._producer, AIOKafkaProducer(**self._options)
            self._started = False
            # Closed whatever it was (never started, failed to start, or its sender died after a
            # broker restart): an unclosed AIOKafkaProducer is reported as an error when collected.
            with contextlib.suppress(Exception):
                await old.stop()
            try:
                await asyncio.wait_for(self._producer.start(), self._start_timeout)
            except Exception as exc:  # aiokafka raises several types on bootstrap failure
                with contextlib.suppress(Exception):
                    await self._producer.stop()
                log.warning("Kafka producer cannot start", extra={"error": type(exc).__name__})
                raise PublishError(f"Kafka producer cannot start: {type(exc).__name__}") from None
            self._started = True
            self._broken = False

    async def start(self) -> None:
        await self._producer.start()
        self._started = True

    def _sender_dead(self) -> bool:
        """True once the producer cannot recover by itself: aiokafka's sender task died, or
        the broker rejected its idempotence sequence (OutOfOrderSequenceNumber after a
        broker restart), after which every send fails; the producer must be rebuilt."""
        if self._broken:
            return True
        sender = getattr(self._producer, "_sender", None)
        task = getattr(sender, "sender_task", None)
        return task is not None and task.done()

    async def _restart(self) -> None:
        """Replace a producer whose sender died with a fresh one (new idempotence epoch)."""
        async with self._restart_lock:
            if not self._sender_dead():
                return
            old = self._producer
            self._producer = AIOKafkaProducer(**self._options)
            try:
                await old.stop()
            except Exception:  # the old producer is broken; nothing to save
                pass
            await self._producer.start()
            self._broken = False

    async def stop(self) -> None:
        """Close the producer, started or not (closing twice does nothing)."""
        self._started = False
        await self._producer.stop()

    @property
    def started(self) -> bool:
        """Started and able to send (readiness): False while the sender is dead."""
        return self._started and not self._sender_dead()

    async def send(
        self,
        topic: str,
        event: str,
        record: dict[str, Any],
        key: str,
        headers: Sequence[tuple[str, bytes]] = (),
        timeout: float | None = None,
    ) -> None:
        """Encode ``record`` as ``event`` and wait for the broker's acknowledgement.

        Raises :class:`PublishError` if Kafka does not acknowledge within ``timeout``
        (or the producer's request timeout).
        """
        await self.send_raw(topic, avro.encode(event, record), key, headers, timeout)

    async def send_raw(
        self,
        topic: str,
        value: bytes,
        key: str,
        headers: Sequence[tuple[str, bytes]] = (),
        timeout: float | None = None,
    ) -> None:
        """Publish already-encoded bytes; same acknowledgement contract as :meth:`send`.

        The current trace context is added to ``headers`` (W3C ``traceparent``).
        """
        if self._started and self._sender_dead():
            try:
                await self._restart()
            except KafkaError as exc:
                metrics.EVENTS_PRODUCED.labels(self.service, topic, "error").inc()
                raise PublishError(f"Kafka producer restart failed: {type(exc).__name__}") from exc
        fut: asyncio.Future[Any] | None = None
        try:
            fut = await self._producer.send(topic, value=value, key=key.encode(),
                                           headers=tracing.kafka_headers(headers))
            # Shielded: a timeout must not cancel the delivery future, since cancelling it does
            # not take the message back; the caller gets it as ``PublishError.pending``.
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except (TimeoutError, KafkaError) as exc:
            if isinstance(exc, OutOfOrderSequenceNumber | UnknownProducerId):
                self._broken = True
            metrics.EVENTS_PRODUCED.labels(self.service, topic, "error").inc()
            pending = fut if fut is not None and not fut.done() else None
            if pending is not None:
                pending.add_done_callback(_retrieve)
            raise PublishError(f"Kafka did not acknowledge the event on {topic}: "
                               f"{type(exc).__name__}", pending=pending) from exc
        metrics.EVENTS_PRODUCED.labels(self.service, topic, "ok").inc()


class TopicScanner:
    """Reads the records of some keys on a topic, from a point in time to its current end.

    Whether a send whose outcome is unknown (timed out, or its sender crashed after the
    broker's acknowledgement) reached the topic is answered by the topic itself: before
    such an event is published again, the partitions of its keys are read from the time
    of the first attempt. One consumer outside any group, started on first use, used by
    one scan at a time and rebuilt after an error.
    """

    def __init__(self, bootstrap_servers: str, service: str, timeout: float = 10.0,
                 options: dict[str, Any] | None = None) -> None:
        self._bootstrap_servers = bootstrap_servers
        self._security = options or {}
        self._client_id = f"callingest-{service}-scanner"
        self._timeout = timeout
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()

    async def find(self, topic: str, keys: Collection[str], since: datetime) -> list[tuple[str, bytes]]:
        """``(key, value)`` of every record of ``topic`` with one of ``keys`` and a timestamp
        at or after ``since``, up to the end of the topic when the scan started.

        Raises :class:`PublishError` if Kafka cannot be read within the scanner's timeout.
        """
        if not keys:
            return []
        async with self._lock:
            try:
                return await asyncio.wait_for(self._scan(topic, set(keys), since), self._timeout)
            except (TimeoutError, KafkaError) as exc:
                await self.close()
                raise PublishError(f"cannot read {topic}: {type(exc).__name__}") from exc

    async def _scan(self, topic: str, keys: set[str], since: datetime) -> list[tuple[str, bytes]]:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(bootstrap_servers=self._bootstrap_servers, group_id=None,
                                        **self._security,
                                        enable_auto_commit=False, client_id=self._client_id,
                                        auto_offset_reset="earliest", fetch_max_wait_ms=100)
            await consumer.start()
            self._consumer = consumer
        consumer = self._consumer
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:  # consumer.topics() does not keep what it fetched; the client's does
            cluster = await consumer._client.fetch_all_metadata()
            partitions = cluster.partitions_for_topic(topic)
        if not partitions:
            raise KafkaError(f"unknown topic {topic}")
        ordered = sorted(partitions)
        wanted = {TopicPartition(topic, DefaultPartitioner()(k.encode(), ordered, ordered)) for k in keys}
        consumer.assign(list(wanted))
        since_ms = int(since.timestamp() * 1000)
        starts = await consumer.offsets_for_times({tp: since_ms for tp in wanted})
        ends = await consumer.end_offsets(list(wanted))
        remaining: dict[TopicPartition, int] = {}
        for tp in wanted:
            start = starts.get(tp)
            if start is not None and start.offset < ends[tp]:
                consumer.seek(tp, start.offset)
                remaining[tp] = ends[tp]
        found: list[tuple[str, bytes]] = []
        while remaining:
            batches = await consumer.getmany(*remaining, timeout_ms=200)
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= remaining.get(tp, -1):
                        continue
                    key = record.key.decode() if record.key is not None else None
                    if key in keys and record.value is not None:
                        found.append((key, record.value))
            for tp in list(remaining):
                if await consumer.position(tp) >= remaining[tp]:
                    del remaining[tp]
        return found

    async def close(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            with contextlib.suppress(Exception):
                await consumer.stop()
