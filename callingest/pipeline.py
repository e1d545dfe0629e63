"""The one consumer loop every pipeline service runs.

A stage is a step function ``async def step(event, ctx) -> StepResult``; this
module is the plumbing around it, written once (arroyo's RunTask -> Produce ->
CommitOffsets):

* consumer group, manual commits, at-least-once: an offset is committed only
  after the step's MongoDB update is written and its output event is
  acknowledged by Kafka;
* a bounded number of messages in flight, commits in offset order per
  partition, events of one call (one key) processed one after another;
* idempotent per (cuid, stage, attempt): the outcome of a step is stored on
  the call; a redelivered event republishes that stored outcome (same event
  id) instead of running the step again;
* :class:`~callingest.errors.TransientError` -> delayed retry through tiered
  retry topics (``retry.<stage>.<tier>``, growing delays, survives restarts);
  after ``MAX_PROCESSING_ATTEMPTS`` the call fails with ``retryable=true``;
* :class:`~callingest.errors.PermanentError` -> call marked failed and
  CallFailed published to ``calls.failed``;
* undecodable bytes -> dead-letter topic with their origin in headers; too many
  in a row stops the consumer (bad code should not flood the DLQ);
* infrastructure trouble (MongoDB or Kafka unavailable) -> the message is
  retried in place with backoff and nothing is committed past it;
* SIGTERM: stop taking messages, let in-flight work finish within the grace
  period, commit what is done, close.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from callingest import avro, metrics, tracing
from callingest.errors import PermanentError, TransientError
from callingest.kafka import Producer, PublishError, event_id
from callingest.logging import get_logger
from callingest.settings import Settings
from callingest.topics import Topics

log = get_logger(__name__)

RETRY_ATTEMPT_HEADER = "callingest-retry"
NOT_BEFORE_HEADER = "callingest-not-before"
MAX_CONSECUTIVE_DEAD_LETTERS = 100


@dataclass
class StepResult:
    """What a step produced: the next event (if any) and the fields to set on the call."""

    next_event: dict[str, Any] | None = None
    call_update: dict[str, Any] = field(default_factory=dict)
    status: str | None = None
    terminal: bool = False


@dataclass
class StageContext:
    """What a step may use: settings, the database, the topics, the call as stored (or None)."""

    settings: Settings
    db: AsyncDatabase[dict[str, Any]]
    topics: Topics
    call: dict[str, Any] | None
    retry: int
    resources: dict[str, Any]


Step = Callable[[dict[str, Any], StageContext], Awaitable[StepResult]]


@dataclass
class Stage:
    """A pipeline stage: its name, input topic, step, and output."""

    name: str
    input_topic: str
    step: Step
    output_topic: str | None = None
    output_event: str | None = None
    resources: dict[str, Any] = field(default_factory=dict)
    retry_forever: bool = False
    """Transient failures never exhaust (the notifier: a notification is never dropped)."""


def now() -> datetime:
    return datetime.now(UTC)


class _PartitionTracker:
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


class StageRunner:
    """Runs one :class:`Stage` until :meth:`stop` is called."""

    def __init__(self, stage: Stage, settings: Settings, db: AsyncDatabase[dict[str, Any]],
                 producer: Producer, service: str | None = None) -> None:
        self.stage = stage
        self.settings = settings
        self.db = db
        self.producer = producer
        self.service = service or stage.name
        self.topics = Topics(settings.topic_prefix, retry_tiers=len(settings.retry_delays_seconds))
        self.retry_topics = self.topics.retry_topics(stage.name)
        self._stopping = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._trackers: dict[TopicPartition, _PartitionTracker] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._key_tails: dict[bytes, asyncio.Task[None]] = {}
        self._paused_until: dict[TopicPartition, float] = {}
        self._consecutive_dead_letters = 0
        self.ready = False

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to stop taking messages; :meth:`run` then drains and returns."""
        self._stopping.set()

    async def run(self) -> None:
        """Consume until stopped; commits everything finished before returning."""
        runner = self

        class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
                await runner._drain(runner.settings.shutdown_grace_seconds)
                await runner._commit()
                for tp in revoked:
                    runner._trackers.pop(tp, None)
                    runner._committed.pop(tp, None)
                    runner._paused_until.pop(tp, None)

            async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
                return None

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers,
            group_id=f"{self.settings.topic_prefix}callingest-{self.stage.name}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id=f"callingest-{self.service}",
            max_poll_interval_ms=600000,
            session_timeout_ms=10000,
            heartbeat_interval_ms=3000,
        )
        consumer.subscribe([self.stage.input_topic, *self.retry_topics], listener=Listener())
        self._consumer = consumer
        await consumer.start()
        self.ready = True
        lag_task = asyncio.create_task(self._report_lag())
        try:
            await self._loop(consumer)
        finally:
            self.ready = False
            lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lag_task
            await self._drain(self.settings.shutdown_grace_seconds)
            with contextlib.suppress(Exception):
                await self._commit()
            await consumer.stop()

    async def _loop(self, consumer: AIOKafkaConsumer) -> None:
        while not self._stopping.is_set():
            self._resume_due(consumer)
            free = self.settings.max_in_flight - len(self._tasks)
            if free <= 0:
                await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED, timeout=1.0)
                await self._commit()
                continue
            try:
                batches = await consumer.getmany(timeout_ms=200, max_records=free)
            except KafkaError as exc:
                log.warning("fetch failed, retrying", extra={"error": type(exc).__name__})
                await asyncio.sleep(1.0)
                continue
            for tp, records in batches.items():
                for record in records:
                    if self._stopping.is_set():
                        # Not started: rewind so the next owner gets it.
                        consumer.seek(tp, record.offset)
                        break
                    if not self._due(consumer, tp, record):
                        break
                    self._start(tp, record)
            await self._commit()

    # -- retries ---------------------------------------------------------------------------

    def _due(self, consumer: AIOKafkaConsumer, tp: TopicPartition, record: ConsumerRecord) -> bool:
        """False for a retry message whose delay has not passed: pause its partition until then."""
        not_before = _header(record, NOT_BEFORE_HEADER)
        if not_before is None:
            return True
        due = float(not_before.decode()) / 1000.0
        wait = due - time.time()
        if wait <= 0:
            return True
        consumer.seek(tp, record.offset)
        consumer.pause(tp)
        self._paused_until[tp] = time.monotonic() + wait
        return False

    def _resume_due(self, consumer: AIOKafkaConsumer) -> None:
        t = time.monotonic()
        for tp, until in list(self._paused_until.items()):
            if until <= t:
                del self._paused_until[tp]
                consumer.resume(tp)

    # -- one message -----------------------------------------------------------------------

    def _start(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        tracker = self._trackers.setdefault(tp, _PartitionTracker())
        tracker.add(record.offset)
        previous = self._key_tails.get(record.key) if record.key else None
        task = asyncio.create_task(self._process(tp, record, previous))
        self._tasks.add(task)
        metrics.EVENTS_IN_FLIGHT.labels(self.service).set(len(self._tasks))
        if record.key:
            self._key_tails[record.key] = task

        def finished(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            metrics.EVENTS_IN_FLIGHT.labels(self.service).set(len(self._tasks))
            if record.key and self._key_tails.get(record.key) is t:
                del self._key_tails[record.key]
            if not t.cancelled() and t.exception() is None:
                tracker.done(record.offset)

        task.add_done_callback(finished)

    async def _process(self, tp: TopicPartition, record: ConsumerRecord,
                       previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(previous)
        delay = 0.5
        while True:
            try:
                await self._handle(tp, record)
                return
            except (PyMongoError, KafkaError, PublishError) as exc:
                if self._stopping.is_set():
                    raise
                log.warning(
                    "infrastructure unavailable, retrying in place",
                    extra={"topic": tp.topic, "offset": record.offset,
                           "error": f"{type(exc).__name__}: {exc}"[:300]},
                )
                await asyncio.sleep(delay + random.uniform(0, delay))
                delay = min(delay * 2, 10.0)

    async def _handle(self, tp: TopicPartition, record: ConsumerRecord) -> None:
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
        self._consecutive_dead_letters = 0
        cuid = event["cuid"]
        tracing.set_cuid(cuid)
        attempt = int(event.get("attempt", 1))
        extra = {"cuid": cuid, "event_id": str(event.get("event_id")), "stage": self.stage.name}
        call = await self.db.calls.find_one({"_id": cuid})
        if call is not None and int(call.get("attempt", 1)) > attempt:
            log.info("stale event from an earlier attempt, skipped", extra=extra)
            metrics.EVENTS_CONSUMED.labels(self.service, tp.topic, "skipped").inc()
            return
        stored = (call or {}).get("outputs", {}).get(self.stage.name)
        if stored is not None and int(stored.get("attempt", 0)) == attempt:
            await self._publish_stored(stored, cuid)
            metrics.EVENTS_CONSUMED.labels(self.service, tp.topic, "duplicate").inc()
            log.info("redelivered event, stored outcome republished", extra=extra)
            return
        retry = int((_header(record, RETRY_ATTEMPT_HEADER) or b"0").decode())
        ctx = StageContext(self.settings, self.db, self.topics, call, retry, self.stage.resources)
        try:
            result = await self.stage.step(event, ctx)
        except PermanentError as exc:
            await self._fail(event, exc.failure_class, exc.message, retryable=False)
            self._observe(tp, started, "failed")
            return
        except (PyMongoError, KafkaError, PublishError):
            raise
        except Exception as exc:
            if isinstance(exc, TransientError):
                transient = exc
            else:
                log.exception("step raised unexpectedly; treated as transient", extra=extra)
                transient = TransientError(f"internal error: {type(exc).__name__}", "InternalError")
            if (retry + 1 >= self.settings.max_processing_attempts
                    and not self.stage.retry_forever):
                await self._fail(event, transient.failure_class,
                                 f"{transient.message} (gave up after {retry + 1} attempts)",
                                 retryable=True)
                self._observe(tp, started, "failed")
            else:
                await self._schedule_retry(record, retry + 1, transient, extra)
                self._observe(tp, started, "retry")
            return
        await self._succeed(event, result)
        if result.terminal and result.status == "normalized" and call is not None:
            metrics.observe_normalized(call)
        self._observe(tp, started, "ok")
        log.info("step done", extra={**extra, "status": result.status})

    def _observe(self, tp: TopicPartition, started: float, outcome: str) -> None:
        metrics.EVENTS_CONSUMED.labels(self.service, tp.topic, outcome).inc()
        metrics.STAGE_DURATION.labels(self.stage.name, outcome).observe(time.perf_counter() - started)

    async def _succeed(self, event: dict[str, Any], result: StepResult) -> None:
        cuid = event["cuid"]
        attempt = int(event.get("attempt", 1))
        output: dict[str, Any] = {"attempt": attempt}
        if result.next_event is not None and self.stage.output_event and self.stage.output_topic:
            record = {
                "event_id": event_id(cuid, self.stage.name, attempt),
                "cuid": cuid,
                "occurred_at": now(),
                "schema_version": avro.LATEST[self.stage.output_event].version,
                "network_id": event["network_id"],
                "attempt": attempt,
                **result.next_event,
            }
            output.update(topic=self.stage.output_topic, event=self.stage.output_event,
                          record=record)
        update: dict[str, Any] = {"$set": {**result.call_update, f"outputs.{self.stage.name}": output}}
        if result.status:
            update["$set"]["status"] = result.status
            update["$push"] = {"history": {"stage": self.stage.name, "status": result.status,
                                           "at": now()}}
        await self.db.calls.update_one({"_id": cuid}, update)
        if result.terminal and result.status:
            metrics.CALLS_TERMINAL.labels(result.status).inc()
        await self._publish_stored(output, cuid)

    async def _fail(self, event: dict[str, Any], failure_class: str, message: str,
                    retryable: bool) -> None:
        cuid = event["cuid"]
        attempt = int(event.get("attempt", 1))
        record = {
            "event_id": event_id(cuid, self.stage.name, attempt),
            "cuid": cuid,
            "occurred_at": now(),
            "schema_version": avro.LATEST["CallFailed"].version,
            "network_id": event["network_id"],
            "attempt": attempt,
            "stage": self.stage.name,
            "failure_class": failure_class,
            "message": message,
            "retryable": retryable,
        }
        output = {"attempt": attempt, "topic": self.topics.failed, "event": "CallFailed",
                  "record": record}
        at = now()
        await self.db.calls.update_one(
            {"_id": cuid},
            {
                "$set": {
                    "status": "failed",
                    "failure": {"stage": self.stage.name, "class": failure_class,
                                "message": message, "retryable": retryable, "attempt": attempt,
                                "at": at},
                    f"outputs.{self.stage.name}": output,
                },
                "$push": {"history": {"stage": self.stage.name, "status": "failed", "at": at}},
            },
        )
        metrics.FAILURES.labels(self.stage.name, failure_class).inc()
        metrics.CALLS_TERMINAL.labels("failed").inc()
        log.warning("call failed", extra={"cuid": cuid, "event_id": record["event_id"],
                                          "stage": self.stage.name,
                                          "failure_class": failure_class, "reason": message})
        await self._publish_stored(output, cuid)

    async def _publish_stored(self, output: dict[str, Any], cuid: str) -> None:
        if output.get("topic") and output.get("event"):
            record = dict(output["record"])
            record["event_id"] = str(record["event_id"])
            await self.producer.send(output["topic"], output["event"], record, key=cuid)

    async def _schedule_retry(self, record: ConsumerRecord, retry: int, exc: TransientError,
                              extra: dict[str, Any]) -> None:
        delays = self.settings.retry_delays_seconds
        tier = min(retry - 1, len(delays) - 1)
        delay = delays[tier]
        not_before = int((time.time() + delay) * 1000)
        headers = [(RETRY_ATTEMPT_HEADER, str(retry).encode()),
                   (NOT_BEFORE_HEADER, str(not_before).encode())]
        await self.producer.send_raw(self.topics.retry(self.stage.name, tier), record.value,
                                     key=(record.key or b"").decode(), headers=headers)
        metrics.RETRIES.labels(self.stage.name).inc()
        log.warning("transient failure, retry scheduled",
                    extra={**extra, "retry": retry, "delay_seconds": delay,
                           "reason": exc.message})

    async def _dead_letter(self, tp: TopicPartition, record: ConsumerRecord, reason: str) -> None:
        self._consecutive_dead_letters += 1
        if self._consecutive_dead_letters > MAX_CONSECUTIVE_DEAD_LETTERS:
            self.stop()
            raise RuntimeError("too many undecodable messages in a row; stopping the consumer")
        headers = [
            ("callingest-origin-topic", tp.topic.encode()),
            ("callingest-origin-partition", str(tp.partition).encode()),
            ("callingest-origin-offset", str(record.offset).encode()),
            ("callingest-error", reason.encode()[:500]),
        ]
        await self.producer.send_raw(self.topics.dead_letter, record.value or b"",
                                     key=(record.key or b"").decode(errors="replace"),
                                     headers=headers)
        metrics.DEAD_LETTERS.labels(self.service, tp.topic).inc()
        metrics.EVENTS_CONSUMED.labels(self.service, tp.topic, "dead_letter").inc()
        log.error("undecodable message sent to the dead-letter topic",
                  extra={"topic": tp.topic, "partition": tp.partition, "offset": record.offset,
                         "reason": reason})

    # -- commits, drain, lag ---------------------------------------------------------------

    async def _commit(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        offsets: dict[TopicPartition, int] = {}
        for tp, tracker in self._trackers.items():
            position = tracker.commit_position()
            if position is not None and self._committed.get(tp) != position:
                offsets[tp] = position
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:
            log.warning("commit failed; will retry", extra={"error": type(exc).__name__})
            return
        self._committed.update(offsets)

    async def _drain(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for all in-flight work, then cancel it."""
        tasks = set(self._tasks)
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2.0)
            log.warning("abandoned in-flight events at shutdown; they will be redelivered",
                        extra={"count": len(pending)})

    async def _report_lag(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            consumer = self._consumer
            if consumer is None:
                continue
            for tp in consumer.assignment():
                highwater = consumer.highwater(tp)
                if highwater is None:
                    continue
                committed = self._committed.get(tp)
                if committed is None:
                    with contextlib.suppress(KafkaError):
                        committed = await consumer.committed(tp)
                lag = max(0, highwater - (committed or 0))
                metrics.CONSUMER_LAG.labels(self.service, tp.topic, str(tp.partition)).set(lag)


def _header(record: ConsumerRecord, name: str) -> bytes | None:
    for key, value in record.headers or ():
        if key == name:
            return bytes(value)
    return None
