"""Kafka producer shared by every service: Avro-encoded, acks=all, idempotent."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, OutOfOrderSequenceNumber, UnknownProducerId

from callingest import avro, metrics

EVENT_NAMESPACE = uuid.UUID("6f1c8e0a-6a43-4d7e-9b0e-2f7a3c1d5e01")


def event_id(cuid: str, stage: str, attempt: int) -> str:
    """Deterministic event id: a redelivered step republishes the same id."""
    return str(uuid.uuid5(EVENT_NAMESPACE, f"{cuid}/{stage}/{attempt}"))


class PublishError(Exception):
    """Kafka did not acknowledge the event (broker unavailable or timed out)."""


class Producer:
    """Publishes events and returns only once Kafka acknowledged them (acks=all)."""

    def __init__(self, bootstrap_servers: str, service: str, request_timeout_ms: int = 10000) -> None:
        self.service = service
        self._options = {
            "bootstrap_servers": bootstrap_servers,
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": 2,
            "request_timeout_ms": request_timeout_ms,
            "retry_backoff_ms": 200,
            "client_id": f"callingest-{service}",
        }
        self._producer = AIOKafkaProducer(**self._options)
        self._started = False
        self._restart_lock = asyncio.Lock()
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
        if self._started:
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
        """Publish already-encoded bytes; same acknowledgement contract as :meth:`send`."""
        if self._started and self._sender_dead():
            try:
                await self._restart()
            except KafkaError as exc:
                metrics.EVENTS_PRODUCED.labels(self.service, topic, "error").inc()
                raise PublishError(f"Kafka producer restart failed: {type(exc).__name__}") from exc
        try:
            fut = await self._producer.send(topic, value=value, key=key.encode(), headers=list(headers))
            if timeout is None:
                await fut
            else:
                await asyncio.wait_for(fut, timeout)
        except (TimeoutError, KafkaError) as exc:
            if isinstance(exc, OutOfOrderSequenceNumber | UnknownProducerId):
                self._broken = True
            metrics.EVENTS_PRODUCED.labels(self.service, topic, "error").inc()
            raise PublishError(f"Kafka did not acknowledge the event on {topic}: "
                               f"{type(exc).__name__}") from exc
        metrics.EVENTS_PRODUCED.labels(self.service, topic, "ok").inc()
