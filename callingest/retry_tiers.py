"""Delayed retries through tiered retry topics (``retry.<stage>.<tier>``).

A transient failure sends the event to the tier of its retry number (growing delays,
``RETRY_DELAYS_SECONDS``) with headers that say how many tries failed and when the next is
due; the consumer loop pauses a retry partition until its head is due. A deferral (the
step never ran) goes to tier 0 (or the tier its ``retry_after`` asks for) and is marked as
such. Every retry message also carries when the event first went to a retry tier: its
retry deadline (:func:`past_deadline`) is that time plus the sum of the tiers' delays, the
time a call failing every try would have taken through all of them. The webhooks intake reads the same
headers to tell clients about scheduled retries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

RETRY_ATTEMPT_HEADER = "callingest-retry"
NOT_BEFORE_HEADER = "callingest-not-before"
#: On a retry-tier message that is a deferral (the step never ran), not a failed try.
DEFERRED_HEADER = "callingest-deferred"
#: Unix time (ms) the event first went to a retry tier of this stage.
FIRST_RETRY_HEADER = "callingest-first-retry"


def header(record: ConsumerRecord, name: str) -> bytes | None:
    for key, value in record.headers or ():
        if key == name:
            return bytes(value)
    return None


def failed_tries(record: ConsumerRecord) -> int:
    """How many tries of this event failed before (0 on a stage's input topic)."""
    return int((header(record, RETRY_ATTEMPT_HEADER) or b"0").decode())


def seconds_until_due(record: ConsumerRecord) -> float:
    """How long a retry message must still wait (<= 0: due; not a retry message: 0)."""
    not_before = header(record, NOT_BEFORE_HEADER)
    if not_before is None:
        return 0.0
    return float(not_before.decode()) / 1000.0 - time.time()


def first_retry(record: ConsumerRecord) -> float | None:
    """Unix time (seconds) the event first went to a retry tier (None: it never did)."""
    value = header(record, FIRST_RETRY_HEADER)
    return None if value is None else float(value.decode()) / 1000.0


def past_deadline(record: ConsumerRecord, delays: list[float]) -> bool:
    """Whether the event's retry deadline (its first retry plus the sum of ``delays``) has
    passed; never for an event that has not been retried."""
    first = first_retry(record)
    return first is not None and time.time() > first + sum(delays)


@dataclass(frozen=True)
class RetryPlan:
    """Where and when the next try of an event goes."""

    tier: int
    delay: float
    due: float
    """Unix time (seconds) the next try is due."""
    headers: list[tuple[str, bytes]]


def plan(delays: list[float], retry: int, counted: bool = True,
         at_least: float | None = None, first: float | None = None) -> RetryPlan:
    """The tier of a counted retry after ``retry`` failed tries, or tier 0 for a deferral;
    ``at_least`` (a Retry-After) moves it to the first later tier that waits that long (at
    most the last: a tier's messages wait alike, so none waits longer than its tier).
    ``first``: when the event first went to a retry tier (None: now, this is the first)."""
    tier = min(retry - 1, len(delays) - 1) if counted else 0
    while at_least is not None and delays[tier] < at_least and tier < len(delays) - 1:
        tier += 1
    delay = delays[tier]
    now = time.time()
    due = now + delay
    headers = [(RETRY_ATTEMPT_HEADER, str(retry).encode()),
               (NOT_BEFORE_HEADER, str(int(due * 1000)).encode()),
               (FIRST_RETRY_HEADER, str(int((now if first is None else first) * 1000)).encode())]
    if not counted:
        headers.append((DEFERRED_HEADER, b"1"))
    return RetryPlan(tier, delay, due, headers)


class Pauses:
    """Retry partitions paused until their head message is due."""

    def __init__(self) -> None:
        self._until: dict[TopicPartition, float] = {}

    def due(self, consumer: AIOKafkaConsumer, tp: TopicPartition, record: ConsumerRecord) -> bool:
        """False for a retry message whose delay has not passed: its partition is rewound to
        it and paused until then."""
        wait = seconds_until_due(record)
        if wait <= 0:
            return True
        consumer.seek(tp, record.offset)
        consumer.pause(tp)
        self._until[tp] = time.monotonic() + wait
        return False

    def resume_due(self, consumer: AIOKafkaConsumer) -> None:
        t = time.monotonic()
        for tp, until in list(self._until.items()):
            if until <= t:
                del self._until[tp]
                consumer.resume(tp)

    def forget(self, tp: TopicPartition) -> None:
        self._until.pop(tp, None)
