"""Undecodable bytes go to the dead-letter topic with their origin in headers.

Too many in a row (:data:`MAX_CONSECUTIVE_DEAD_LETTERS`) is fatal for the consumer: bad
code or a foreign producer should stop it rather than flood the topic (arroyo's DlqLimit).
"""

from __future__ import annotations

from collections.abc import Iterable

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from callingest import metrics
from callingest.kafka import Producer
from callingest.logging import get_logger

log = get_logger(__name__)

MAX_CONSECUTIVE_DEAD_LETTERS = 100


class DeadLetters:
    """One consumer's dead letters, and how many came in a row."""

    def __init__(self, producer: Producer, topic: str, service: str,
                 sources: Iterable[str]) -> None:
        self.producer = producer
        self.topic = topic
        self.service = service
        self.consecutive = 0
        """Reset by the consumer whenever a message decodes."""
        for source in sources:
            # Exported at 0 from the start: the alert's increase() sees the first dead letter
            # (a counter child created at 1 has no increase).
            metrics.DEAD_LETTERS.labels(service, source)

    def admit(self) -> bool:
        """Count one more undecodable message; False once that is more than the limit."""
        self.consecutive += 1
        return self.consecutive <= MAX_CONSECUTIVE_DEAD_LETTERS

    async def send(self, tp: TopicPartition, record: ConsumerRecord, reason: str) -> None:
        """Produce ``record`` as it came to the dead-letter topic, its origin in headers."""
        headers = [
            ("callingest-origin-topic", tp.topic.encode()),
            ("callingest-origin-partition", str(tp.partition).encode()),
            ("callingest-origin-offset", str(record.offset).encode()),
            ("callingest-error", reason.encode()[:500]),
        ]
        await self.producer.send_raw(self.topic, record.value or b"",
                                     key=(record.key or b"").decode(errors="replace"),
                                     headers=headers)
        metrics.DEAD_LETTERS.labels(self.service, tp.topic).inc()
        metrics.EVENTS_CONSUMED.labels(self.service, tp.topic, "dead_letter").inc()
        log.error("undecodable message sent to the dead-letter topic",
                  extra={"topic": tp.topic, "partition": tp.partition, "offset": record.offset,
                         "reason": reason})
