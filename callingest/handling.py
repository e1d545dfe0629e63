"""What happens to one message of a stage: the part of the consumer loop between
reading an event and committing it (:mod:`callingest.pipeline` does the reading,
scheduling and committing).

Decode it (undecodable: :mod:`callingest.dead_letters`); skip it if the call moved on to a
later attempt; republish the stored outcome if this attempt is done already; else run the
step and route its outcome: success -> the call updated and the output event produced;
:class:`~callingest.errors.PermanentError` -> the call failed and CallFailed produced;
:class:`~callingest.errors.TransientError` (or an unexpected exception, as
``InternalError``) -> the next retry tier, or the call failed ``retryable=true`` once
``MAX_PROCESSING_ATTEMPTS`` are used up (a :attr:`~callingest.stages.Retry.FOREVER` stage
never gives up); :class:`~callingest.errors.Deferred` -> tier 0, no attempt used;
:class:`~callingest.errors.Refused` -> likewise until the event's retry deadline has passed
(:func:`~callingest.retry_tiers.past_deadline`), then the call failed ``retryable=true``.
MongoDB and Kafka errors propagate: the loop retries the message in place.
Every write of the call document goes through :class:`~callingest.call_store.CallStore`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from callingest import avro, metrics, retry_tiers, tracing
from callingest.call_store import CallStore, Outcome, stale, stored_outcome
from callingest.dead_letters import DeadLetters
from callingest.errors import Deferred, PermanentError, Refused, TransientError
from callingest.kafka import Producer, PublishError
from callingest.logging import get_logger
from callingest.settings import Settings
from callingest.stages import Retry
from callingest.steps import Stage, StageContext, StepResult
from callingest.topics import Topics

log = get_logger(__name__)


class DeadLetterLimit(Exception):
    """More undecodable messages in a row than the limit: the consumer must stop."""


class MessageHandler:
    """Handles the messages of one stage, one at a time each (many at once in all)."""

    def __init__(self, stage: Stage[Any], settings: Settings, db: AsyncDatabase[dict[str, Any]],
                 producer: Producer, topics: Topics, service: str, consumed: list[str]) -> None:
        self.stage = stage
        self.spec = stage.spec
        self.settings = settings
        self.db = db
        self.producer = producer
        self.topics = topics
        self.service = service
        self.calls = CallStore(db, self.spec, topics)
        self._dead_letters = DeadLetters(producer, topics.dead_letter, service, consumed)

    async def handle(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        """One message in a span that continues the trace in its headers."""
        with tracing.consumer_span(self.stage.name, tp.topic, record.headers):
            await self._handle_traced(tp, record)

    async def _handle_traced(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        started = time.perf_counter()
        try:
            _event_name, event = avro.decode(record.value)
        except avro.UndecodableMessage as exc:
            await self._dead_letter(tp, record, str(exc))
            return
        self._dead_letters.consecutive = 0
        cuid = event["cuid"]
        tracing.set_cuid(cuid)
        extra = {"cuid": cuid, "event_id": str(event.get("event_id")), "stage": self.stage.name}
        call = await self.calls.load(cuid)
        if stale(call, event):
            log.info("stale event from an earlier attempt, skipped", extra=extra)
            metrics.EVENTS_CONSUMED.labels(self.service, tp.topic, "skipped").inc()
            return
        stored = stored_outcome(call, self.stage.name, event)
        if stored is not None:
            await self._publish(stored, cuid)
            metrics.EVENTS_CONSUMED.labels(self.service, tp.topic, "duplicate").inc()
            log.info("redelivered event, stored outcome republished", extra=extra)
            return
        retry = retry_tiers.failed_tries(record)
        overdue = retry_tiers.past_deadline(record, self.settings.retry_delays_seconds)
        ctx = StageContext(self.settings, self.db, self.topics, call, retry, self.stage.resources,
                           overdue)
        try:
            result = await self.stage.step(event, ctx)
        except PermanentError as exc:
            await self._fail(event, exc.failure_class, exc.message, retryable=False)
            self._observe(tp, started, "failed")
            return
        except (PyMongoError, KafkaError, PublishError):
            raise
        except Refused as exc:
            if overdue and self.spec.retry is Retry.BOUNDED:
                await self._fail(event, exc.failure_class,
                                 f"{exc.message} (gave up at the retry deadline after "
                                 f"{_attempts(retry)})", retryable=True)
                self._observe(tp, started, "failed")
            else:
                await self._schedule_retry(record, event, retry, exc, extra, counted=False)
                self._observe(tp, started, "deferred")
            return
        except Deferred as exc:
            await self._schedule_retry(record, event, retry, exc, extra, counted=False)
            self._observe(tp, started, "deferred")
            return
        except Exception as exc:
            if isinstance(exc, TransientError):
                transient = exc
            else:
                log.exception("step raised unexpectedly; treated as transient", extra=extra)
                transient = TransientError(f"internal error: {type(exc).__name__}", "InternalError")
            if (retry + 1 >= self.settings.max_processing_attempts
                    and self.spec.retry is Retry.BOUNDED):
                await self._fail(event, transient.failure_class,
                                 f"{transient.message} (gave up after {_attempts(retry + 1)})",
                                 retryable=True)
                self._observe(tp, started, "failed")
            else:
                await self._schedule_retry(record, event, retry + 1, transient, extra)
                self._observe(tp, started, "retry")
            return
        await self._succeed(event, result)
        if self.spec.terminal and call is not None:
            metrics.observe_normalized(call)
        self._observe(tp, started, "ok")
        log.info("step done", extra={**extra, "status": self.spec.status})

    def _observe(self, tp: TopicPartition, started: float, outcome: str) -> None:
        metrics.EVENTS_CONSUMED.labels(self.service, tp.topic, outcome).inc()
        metrics.STAGE_DURATION.labels(self.stage.name, outcome).observe(time.perf_counter() - started)

    async def _succeed(self, event: dict[str, Any], result: StepResult) -> None:
        output = await self.calls.succeeded(event, result)
        if self.spec.terminal and self.spec.status:
            metrics.CALLS_TERMINAL.labels(self.spec.status).inc()
        await self._publish(output, event["cuid"])

    async def _fail(self, event: dict[str, Any], failure_class: str, message: str,
                    retryable: bool) -> None:
        output = await self.calls.failed(event, failure_class, message, retryable)
        metrics.FAILURES.labels(self.stage.name, failure_class).inc()
        metrics.CALLS_TERMINAL.labels("failed").inc()
        log.warning("call failed", extra={"cuid": event["cuid"],
                                          "event_id": output["record"]["event_id"],
                                          "stage": self.stage.name,
                                          "failure_class": failure_class, "reason": message})
        await self._publish(output, event["cuid"])

    async def _publish(self, output: Outcome, cuid: str) -> None:
        """Produce a stored outcome's event (if it has one); returns once Kafka acknowledged it."""
        if output.get("topic") and output.get("event"):
            record = dict(output["record"])
            record["event_id"] = str(record["event_id"])
            await self.producer.send(output["topic"], output["event"], record, key=cuid)

    async def _schedule_retry(self, record: ConsumerRecord, event: dict[str, Any], retry: int,
                              exc: TransientError, extra: dict[str, Any],
                              counted: bool = True) -> None:
        """Send the event to its delayed-retry tier; the slot is free as soon as this returns.

        ``retry`` is the number of failed tries so far (the header the next try reads).
        A counted retry is recorded on the call first (:meth:`CallStore.retrying`), so the
        status API says where the call stands before the retry can run. A deferral
        (``counted=False``) goes to the first tier (or the one its ``retry_after`` asks for)
        and records nothing, unless it is a refusal by an open circuit
        (:meth:`CallStore.refused`: the call may wait on it until its retry deadline).
        """
        plan = retry_tiers.plan(self.settings.retry_delays_seconds, retry, counted, exc.retry_after,
                                retry_tiers.first_retry(record))
        due = datetime.fromtimestamp(plan.due, UTC)
        if counted:
            await self.calls.retrying(event["cuid"], retry, due, exc.failure_class, exc.message)
        elif isinstance(exc, Refused):
            await self.calls.refused(event["cuid"], retry, due, exc.failure_class, exc.message)
        await self.producer.send_raw(self.topics.retry(self.stage.name, plan.tier), record.value,
                                     key=(record.key or b"").decode(), headers=plan.headers)
        if not counted:
            metrics.DEFERRALS.labels(self.stage.name).inc()
            log.info("deferred, resource busy",
                     extra={**extra, "delay_seconds": plan.delay, "reason": exc.message})
            return
        metrics.RETRIES.labels(self.stage.name).inc()
        log.warning("transient failure, retry scheduled",
                    extra={**extra, "retry": retry, "delay_seconds": plan.delay,
                           "failure_class": exc.failure_class, "reason": exc.message})

    async def _dead_letter(self, tp: TopicPartition, record: ConsumerRecord, reason: str) -> None:
        if not self._dead_letters.admit():
            raise DeadLetterLimit(reason)
        await self._dead_letters.send(tp, record, reason)


def _attempts(tries: int) -> str:
    return f"{tries} attempt{'' if tries == 1 else 's'}"
