"""The consumer loop's offsets: in flight per partition, committed in offset order, lag.

An offset counts as unfinished from the moment its event is read (queued or running); a
partition's committed position is the lowest unfinished offset, or one past the highest
finished one, so nothing is ever committed past unfinished work (at-least-once).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from callingest import metrics
from callingest.logging import get_logger

log = get_logger(__name__)

LAG_INTERVAL_SECONDS = 5.0


class PartitionTracker:
    """Offsets in flight for one partition; tells the highest offset safe to commit."""

    def __init__(self) -> None:
        self.in_flight: list[int] = []
        self.highest_done: int | None = None

    def add(self, offset: int) -> None:
        bisect.insort(self.in_flight, offset)

    def done(self, offset: int) -> None:
        self.in_flight.remove(offset)
        if self.highest_done is None or offset > self.highest_done:
            self.highest_done = offset

    def commit_position(self) -> int | None:
        """The next offset to consume such that everything before it is done."""
        if self.in_flight:
            return self.in_flight[0]
        if self.highest_done is not None:
            return self.highest_done + 1
        return None


class Offsets:
    """The offsets of one consumer's partitions."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.trackers: dict[TopicPartition, PartitionTracker] = {}
        self.committed: dict[TopicPartition, int] = {}

    def tracker(self, tp: TopicPartition) -> PartitionTracker:
        return self.trackers.setdefault(tp, PartitionTracker())

    def forget(self, tp: TopicPartition) -> None:
        """A revoked partition: its next owner commits from here on."""
        self.trackers.pop(tp, None)
        self.committed.pop(tp, None)

    async def commit(self, consumer: AIOKafkaConsumer | None) -> None:
        """Commit every partition's position that moved; a failed commit is retried next time."""
        if consumer is None:
            return
        offsets: dict[TopicPartition, int] = {}
        for tp, tracker in self.trackers.items():
            position = tracker.commit_position()
            if position is not None and self.committed.get(tp) != position:
                offsets[tp] = position
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:
            log.warning("commit failed; will retry", extra={"error": type(exc).__name__})
            return
        self.committed.update(offsets)

    async def report_lag(self, consumer: AIOKafkaConsumer) -> None:
        """Set the consumer-lag gauge of every assigned partition, every few seconds, forever."""
        while True:
            await asyncio.sleep(LAG_INTERVAL_SECONDS)
            for tp in consumer.assignment():
                highwater = consumer.highwater(tp)
                if highwater is None:
                    continue
                committed = self.committed.get(tp)
                if committed is None:
                    with contextlib.suppress(KafkaError):
                        committed = await consumer.committed(tp)
                lag = max(0, highwater - (committed or 0))
                metrics.CONSUMER_LAG.labels(self.service, tp.topic, str(tp.partition)).set(lag)
